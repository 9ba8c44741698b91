"""What the compiled train step communicates and how much memory it needs, per device.

Compiles the real train step for a config and a mesh (from abstract shapes: nothing is
allocated), lists every collective of the optimised HLO with the mesh axis it runs over and
the bytes each device receives, and sets them beside the bytes the paper's pattern implies:
all-gathers of the inputs of conv3, fc6, fc7, fc8 over `model` (and their transposes,
reduce-scatters, in the backward pass) and one all-reduce of the gradients over `data`.

Bytes received per device, for a group of n devices and a buffer of S bytes (the full,
gathered or reduced size): all-gather and reduce-scatter (n-1)/n * S; all-reduce
2 (n-1)/n * S (ring: a reduce-scatter then an all-gather); all-to-all (n-1)/n * S;
collective-permute S.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from alexnet_jax import parallel, steps
from alexnet_jax.batch import Batch
from alexnet_jax.model import AlexNet

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_SHAPE = re.compile(r"\b(?P<dtype>pred|[fsu]\d+|bf16)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


@dataclasses.dataclass
class Collective:
    kind: str
    axis: str  # 'data', 'model', 'data+model' or 'none'
    shapes: list[tuple[str, tuple[int, ...]]]  # the result buffers
    group_size: int
    role: str = ""  # what the paper pattern calls it, filled by label()

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def size_bytes(self) -> int:
        return sum(math.prod(s) * _dtype_bytes(d) for d, s in self.shapes)

    @property
    def bytes_received(self) -> float:
        return self._received(self.size_bytes)

    @property
    def array_bytes_received(self) -> float:
        """Leaving out scalar buffers (XLA merges metric psums into the gradient tuple)."""
        return self._received(
            sum(math.prod(s) * _dtype_bytes(d) for d, s in self.shapes if math.prod(s) > 1)
        )

    def _received(self, s: float) -> float:
        n = self.group_size
        if self.kind == "reduce-scatter":
            s *= n  # the result is one n-th of the reduced buffer
        if self.kind == "collective-permute":
            return float(s)
        return (2.0 if self.kind == "all-reduce" else 1.0) * (n - 1) / n * s


def _dtype_bytes(dtype: str) -> int:
    return _BYTES.get(dtype, max(int(dtype[1:]) // 8, 1))


def _groups(rest: str) -> list[list[int]]:
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", rest)
    if m:
        return [
            [int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d, ]*)\}", m.group(1))
        ]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if m:  # iota form: reshape(dims) -> transpose(perm) -> reshape(groups)
        shape = [int(i) for i in m.group(1).split(",")]
        dims = [int(i) for i in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(i) for i in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", m.group(0))]
    return []


def _axis(groups: list[list[int]], mesh: Mesh) -> str:
    varying = set()
    for g in groups:
        coords = np.array(np.unravel_index(g, mesh.devices.shape))
        varying |= {mesh.axis_names[a] for a in range(coords.shape[0]) if len(set(coords[a])) > 1}
    return "+".join(a for a in mesh.axis_names if a in varying) or "none"


def collectives(hlo: str, mesh: Mesh) -> list[Collective]:
    """Every collective of an optimised, partitioned HLO module (logical ids = mesh order)."""
    found = []
    for line in hlo.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        shapes = [
            (s["dtype"], tuple(int(d) for d in s["dims"].split(",") if d))
            for s in _SHAPE.finditer(m["type"])
        ]
        if m["start"] and m["kind"] == "all-gather":
            shapes = shapes[-1:]  # async start: (operand, result); keep the result
        groups = _groups(m["rest"])
        size = max((len(g) for g in groups), default=1)
        if m["kind"] == "collective-permute":
            size = 2
        found.append(Collective(m["kind"], _axis(groups, mesh), shapes, size))
    return found


@dataclasses.dataclass
class Expected:
    """The paper's pattern for one config and mesh: what crosses between towers and replicas."""

    gathers: dict[str, tuple[int, ...]]  # layer -> global-channel input shape per data shard
    gather_bytes: float  # per device per step, forward and backward together
    gradient_bytes: float  # per device per step, the data-axis all-reduce
    batch_per_shard: int


def expected(
    model: AlexNet, image_size: int, batch_size: int, mesh: Mesh, params: dict
) -> Expected:
    n, d = mesh.shape[parallel.MODEL], mesh.shape[parallel.DATA]
    b = batch_size // d
    maps = dict(model.feature_shapes(image_size))
    fc = model.fc_features()
    gathers = (
        {
            "conv3": (b, *maps["conv2_pool"]),
            "fc6": (b, *maps["conv5_pool"]),
            "fc7": (b, fc),
            "fc8": (b, fc),
        }
        if n > 1
        else {}
    )
    act = jnp.dtype(model.dtype).itemsize
    gather_bytes = 2 * sum((n - 1) / n * math.prod(s) * act for s in gathers.values())
    specs = parallel.param_specs(model, params, mesh)
    local = sum(
        math.prod(p.shape) * 4 // (n if parallel.MODEL in tuple(s) else 1)
        for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs), strict=True)
    )
    return Expected(gathers, gather_bytes, 2 * (d - 1) / d * local, b)


def label(found: list[Collective], exp: Expected, n_model: int) -> None:
    """Name each collective by the paper pattern; unexplained ones keep role 'UNEXPECTED'."""
    forward = list(exp.gathers)  # conv3, fc6, fc7, fc8: fc7 and fc8 inputs look alike,
    backward = forward[::-1]  # so each match is used once, in execution order
    for c in found:
        shape = c.shapes[0][1] if len(c.shapes) == 1 else None
        c.role = "UNEXPECTED"
        if c.axis == "none":
            c.role = "no-op (a group of one device)"
        elif c.axis == "model":
            for layer in list(forward if c.kind == "all-gather" else backward):
                full = exp.gathers[layer]
                if c.kind == "all-gather" and shape == full:
                    c.role = f"{layer} input, forward"
                    forward.remove(layer)
                    break
                if c.kind == "reduce-scatter" and shape == (*full[:-1], full[-1] // n_model):
                    c.role = f"{layer} input gradient, backward"
                    backward.remove(layer)
                    break
            if (
                c.role == "UNEXPECTED"
                and c.kind == "all-reduce"
                and all(len(s) <= 1 and math.prod(s) <= exp.batch_per_shard for _, s in c.shapes)
            ):
                c.role = "loss/metrics (per example, over class shards)"
        elif c.axis == "data" and c.kind == "all-reduce":
            small = all(math.prod(s) <= 1 for _, s in c.shapes)
            c.role = "loss/metrics (scalars)" if small else "gradients"
        elif c.axis == "data+model" and c.kind == "all-reduce":
            if all(math.prod(s) <= 1 for _, s in c.shapes):
                c.role = "loss/metrics (scalars)"


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple:
    trainer = steps.Trainer(config, mesh)
    s = config.input.image_size
    shard = parallel.batch_sharded(mesh)
    batch = Batch(
        images=jax.ShapeDtypeStruct((config.batch_size, s, s, 3), jnp.float32, sharding=shard),
        labels=jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=shard),
    )
    return trainer.train_step.lower(trainer.abstract_state, batch).compile(), trainer


def peak_bytes(compiled) -> dict[str, int]:
    """XLA's memory analysis of one device's program. On CPU peak_memory_in_bytes counts only
    the arguments, so the peak here is arguments + outputs - aliased (donated) + temporaries:
    everything live at once, an upper bound on the buffer assignment's true peak."""
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "peak": peak,
    }


def report(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[str, list, Expected, dict]:
    """The printed report, the labelled collectives, the expected pattern and the memory."""
    compiled, trainer = compile_train_step(config, mesh)
    found = collectives(compiled.as_text(), mesh)
    exp = expected(
        trainer.model,
        config.input.image_size,
        config.batch_size,
        mesh,
        trainer.abstract_state.params,
    )
    label(found, exp, mesh.shape[parallel.MODEL])
    mem = peak_bytes(compiled)
    rows = [
        f"train step, mesh {dict(mesh.shape)}, global batch {config.batch_size}, "
        f"{config.model.variant} model, width {config.model.width}, {config.model.dtype}",
        f"{'kind':<15}{'axis':<11}{'shape':<34}{'received/device':>16}  role",
    ]
    for c in found:
        shape = ", ".join(f"{d}{list(s)}" for d, s in c.shapes)
        shape = shape if len(shape) <= 32 else f"{len(c.shapes)} buffers, {c.elements:,} elems"
        rows.append(f"{c.kind:<15}{c.axis:<11}{shape:<34}{c.bytes_received:>16,.0f}  {c.role}")
    by = lambda pred: sum(c.bytes_received for c in found if pred(c))
    model_act = by(lambda c: c.axis == "model" and "input" in c.role)
    grads = sum(c.array_bytes_received for c in found if c.role == "gradients")
    rows += [
        f"model axis, tower activations: {model_act:,.0f} bytes/device "
        f"(paper pattern: {exp.gather_bytes:,.0f})",
        f"data axis, gradients: {grads:,.0f} bytes/device "
        f"(paper pattern: {exp.gradient_bytes:,.0f})",
        f"other (loss and metric reductions): "
        f"{by(lambda c: c.role != 'UNEXPECTED') - model_act - grads:,.0f} bytes/device",
        f"unexpected collectives: {sum(c.role == 'UNEXPECTED' for c in found)}",
        "memory per device (XLA memory_analysis; peak = arguments + outputs - aliased + "
        "temporaries, since on CPU peak_memory_in_bytes counts only the arguments): "
        + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in mem.items()),
    ]
    return "\n".join(rows), found, exp, mem
