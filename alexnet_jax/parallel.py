"""Every sharding decision: the ('data', 'model') mesh, parameter PartitionSpecs, global batches,
and the forward pass, loss and metrics under `jax.shard_map`.

With mesh.model = 2 each device keeps one tower's slice of every layer (the last axis of each
kernel and bias) and the towers talk only where the paper's GPUs did: the model all-gathers its
input at conv3, fc6, fc7 and fc8. Loss and metrics are computed inside the shard_map from
class-sharded logits with per-example reductions, so they add no traffic beyond small psums.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.errors import UsageError
from alexnet_jax.model import AlexNet

T = TypeVar("T")  # a batch: batch.Batch, or any pytree of arrays with rows first

DATA, MODEL = "data", "model"


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
    """(data, model) with data = -1 filled by the devices left after `model`."""
    if data == -1:
        data = max(num_devices // model, 1)
    return data, model


def check_mesh(
    data: int,
    model: int,
    towers: int,
    batch_size: int,
    num_devices: int,
    process_count: int = 1,
) -> None:
    """Raise a UsageError naming the problem and the fix; called before anything compiles."""
    if model != 1 and towers == 1:
        raise UsageError(
            f"mesh.model={model} is not possible with model.towers=1: one tower cannot be split "
            "over devices. Use --config.mesh.model=1."
        )
    if model not in (1, towers):
        raise UsageError(
            f"mesh.model={model} is not possible with model.towers={towers}: use 1 (each device "
            f"holds all towers) or {towers} (one tower per device, as the paper)."
        )
    if data != -1 and data < 1:
        raise UsageError(f"mesh.data={data} must be positive, or -1 to use all devices.")
    d, m = mesh_shape(data, model, num_devices)
    if d * m > num_devices:
        raise UsageError(
            f"mesh (data={d}, model={m}) needs {d * m} devices but {num_devices} are visible: "
            "lower --config.mesh.data or --config.mesh.model."
        )
    if process_count > 1 and d * m != num_devices:
        raise UsageError(
            f"mesh (data={d}, model={m}) must use all {num_devices} devices of a multi-process "
            "run: set --config.mesh.data=-1."
        )
    if batch_size % d:
        raise UsageError(
            f"batch_size={batch_size} is not divisible by mesh.data={d}: every data shard needs "
            f"the same number of examples. Use a multiple of {d}."
        )


def create_mesh(data: int, model: int) -> Mesh:
    """The ('data', 'model') mesh, on the first data*model devices."""
    devices = jax.devices()
    d, m = mesh_shape(data, model, len(devices))
    # Auto axes: shardings are given explicitly where they matter (params, batch, masks).
    return jax.make_mesh(
        (d, m), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2, devices=devices[: d * m]
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """A copy on every device of `mesh`: scalars, the plateau state, metric sums."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Rows split over DATA, replicated over MODEL: images, labels, weights."""
    return NamedSharding(mesh, P(DATA))


def tower_model(model: AlexNet, mesh: Mesh) -> AlexNet:
    """The module as one device of `mesh` runs it: its towers' slice, gathering over MODEL."""
    return model.clone(tower_axis=MODEL, tower_shards=mesh.shape[MODEL])


def param_specs(model: AlexNet, params: Any, mesh: Mesh) -> Any:
    """P(..., MODEL) on the output axis of every layer the device model splits, else P()."""
    local = tower_model(model, mesh)

    def spec(path: tuple, leaf: Any) -> P:
        layer = path[0].key
        if local.tower_shards == 1 or (layer == "fc8" and local.fc8_shards == 1):
            return P()
        return P(*([None] * (len(leaf.shape) - 1)), MODEL)

    return jax.tree_util.tree_map_with_path(spec, params)


def state_shardings(tx: optax.GradientTransformation, state: Any, specs: Any, mesh: Mesh) -> Any:
    """Shardings of a train state: optimizer slots follow their parameters, the rest replicated."""
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    copy = replicated(mesh)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, state.opt_state, named, transform_non_params=lambda _: copy
    )
    return state.replace(
        step=copy,
        params=named,
        opt_state=opt,
        rng=copy,
        plateau=jax.tree.map(lambda _: copy, state.plateau),
    )


def mask_spec(mesh: Mesh) -> P:
    """Dropout masks cover fc6/fc7 features, split over MODEL exactly like those layers."""
    return P(DATA, MODEL) if mesh.shape[MODEL] > 1 else P(DATA)


def split_pairs(mesh: Mesh, batch_size: int) -> bool:
    """Whether the two devices of a tower pair get their rows in halves: where a pair spans
    processes (one process per device and mesh.model = 2), each process then reads and decodes
    half of the pair's rows instead of both reading all of them."""
    spans = any(len({d.process_index for d in pair}) > 1 for pair in mesh.devices)
    return spans and batch_size % (mesh.shape[DATA] * mesh.shape[MODEL]) == 0


def input_sharded(mesh: Mesh, split: bool) -> NamedSharding:
    """How the host's rows reach the devices: as `batch_sharded`, or (`split`) each device of a
    tower pair with its own half of the pair's rows, joined by `global_batch`."""
    return NamedSharding(mesh, P((DATA, MODEL))) if split else batch_sharded(mesh)


def process_rows(
    mesh: Mesh,
    batch_size: int,
    devices: Collection[jax.Device] | None = None,
    split: bool | None = None,
) -> np.ndarray:
    """The global batch rows that `devices` (default: this process's) read, in order: those
    they hold, or with `split` (default: `split_pairs`) their half of each tower pair's."""
    devices = set(mesh.local_devices if devices is None else devices)
    split = split_pairs(mesh, batch_size) if split is None else split
    held = input_sharded(mesh, split).devices_indices_map((batch_size,))
    rows = {r for d, (s,) in held.items() if d in devices for r in range(*s.indices(batch_size))}
    return np.array(sorted(rows), np.int64)


@functools.cache
def _input(mesh: Mesh, batch_size: int) -> tuple[NamedSharding, int, Callable | None]:
    """The input sharding, how many rows this process reads, and (when the pairs' rows come
    in halves) the jitted join that gathers them over MODEL: asked every step, so made once."""
    split = split_pairs(mesh, batch_size)
    join = jax.jit(_identity, out_shardings=batch_sharded(mesh)) if split else None
    return input_sharded(mesh, split), len(process_rows(mesh, batch_size, split=split)), join


def _identity(batch: T) -> T:
    return batch


def global_batch(mesh: Mesh, local: T, batch_size: int) -> T:
    """This process's rows (`process_rows`) of a batch (a batch.Batch, or any pytree of
    arrays) -> global arrays of `batch_size` rows over DATA."""
    sharding, want, join = _input(mesh, batch_size)

    def place(path: Any, v: Any) -> jax.Array:
        if len(v) != want:
            name = jax.tree_util.keystr(path, simple=True)
            raise ValueError(f"{name}: this process holds {len(v)} rows of the batch, not {want}")
        shape = (batch_size, *v.shape[1:])
        return jax.make_array_from_process_local_data(sharding, v, shape)

    out = jax.tree_util.tree_map_with_path(place, local)
    # Halves of the pairs' rows: the devices gather them, outside the train step, whose
    # program (and the paper's communication pattern) stays the same.
    return out if join is None else join(out)


def prefetch(mesh: Mesh, batches: Iterator[T], batch_size: int, size: int = 2) -> Iterator[T]:
    """`global_batch` of each of `batches`, copied to the devices `size` steps ahead, so that
    the next batches travel while the current step runs."""
    queue: deque = deque()

    def enqueue(n: int) -> None:
        for local in itertools.islice(batches, n):
            queue.append(global_batch(mesh, local, batch_size))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def batch_fn(fn: Callable, mesh: Mesh) -> Callable:
    """fn(batch, consts) run by each device on the rows it holds (`consts` replicated): input
    work on the device that needs no communication."""
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(DATA), P()), out_specs=P(DATA))


def _class_reductions(split: bool) -> tuple[Callable, Callable]:
    """psum and pmax over the classes' shards, or no-ops when fc8 is replicated."""
    if not split:
        return (lambda x: x), (lambda x: x)
    return (lambda x: jax.lax.psum(x, MODEL)), (lambda x: jax.lax.pmax(x, MODEL))


def _logsumexp(logits: jax.Array, split: bool) -> jax.Array:
    psum, pmax = _class_reductions(split)
    m = pmax(jax.lax.stop_gradient(logits.max(-1)))
    return m + jnp.log(psum(jnp.exp(logits - m[:, None]).sum(-1)))


def example_stats(logits: jax.Array, labels: jax.Array, split: bool) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy and rank of the true class (0 = top-1) from local logits."""
    psum, _ = _class_reductions(split)
    c = logits.shape[-1]
    first = jax.lax.axis_index(MODEL) * c if split else 0
    onehot = (first + jnp.arange(c))[None, :] == labels[:, None]
    label_logit = psum(jnp.where(onehot, logits, 0.0).sum(-1))
    beaten = jax.lax.stop_gradient(logits) > jax.lax.stop_gradient(label_logit)[:, None]
    nll = _logsumexp(logits, split) - label_logit
    # NaN compares false: without this a diverged model would score 0% error.
    rank = jnp.where(jnp.isfinite(nll), psum(beaten.sum(-1)), jnp.iinfo(jnp.int32).max)
    return nll, rank


def _sums(
    nll: jax.Array, rank: jax.Array, weights: jax.Array, model_copies: int
) -> dict[str, jax.Array]:
    """Weighted sums over the global batch.

    model_copies > 1 when fc8 is replicated over the tower shards: each then holds the same
    numbers, typed as varying (all_gather's output is), so average them over MODEL. The
    transpose gives every shard 1/n of the cotangent, which fc8's replicated kernel gradient
    sums back to the whole.
    """
    sums = {
        "loss": (weights * nll).sum(),
        "top1_errors": (weights * (rank >= 1)).sum(),
        "top5_errors": (weights * (rank >= 5)).sum(),
        "count": weights.sum(),
    }
    sums = jax.lax.psum(sums, DATA)
    if model_copies > 1:
        sums = jax.tree.map(lambda x: jax.lax.psum(x, MODEL) / model_copies, sums)
    return sums


def _local(model: AlexNet, mesh: Mesh) -> tuple[AlexNet, bool, int]:
    """One device's module, whether fc8 is split over MODEL, and how many shards repeat it."""
    local_model = tower_model(model, mesh)
    split = local_model.fc8_shards > 1
    return local_model, split, 1 if split else mesh.shape[MODEL]


def make_loss_fn(model: AlexNet, params: Any, mesh: Mesh) -> Callable:
    """(params, images, labels, masks) -> (mean loss, metric sums), sharded over `mesh`.

    `masks` is () when dropout is off, else the two keep-masks of the global batch.
    """
    local_model, split, copies = _local(model, mesh)

    def local(params, images, labels, masks):
        logits = local_model.apply(
            {"params": params}, images, train=True, dropout_masks=masks or None
        )
        ones = jnp.ones(labels.shape, jnp.float32)
        sums = _sums(*example_stats(logits, labels, split), ones, copies)
        return sums["loss"] / sums["count"], sums

    specs = param_specs(model, params, mesh)
    with_masks = model.dropout_rate > 0
    masks_spec = (mask_spec(mesh),) * 2 if with_masks else ()
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(specs, P(DATA), P(DATA), masks_spec),
        out_specs=(P(), P()),
    )


def make_eval_fn(model: AlexNet, params: Any, mesh: Mesh, ten_crop: bool) -> Callable:
    """(params, images, labels, weights) -> metric sums; ten_crop images are [B, 10, H, W, 3]."""
    local_model, split, copies = _local(model, mesh)

    def local(params, images, labels, weights):
        if ten_crop:
            b, n = images.shape[:2]
            images = images.reshape(b * n, *images.shape[2:])
        logits = local_model.apply({"params": params}, images, train=False)
        if ten_crop:  # average the crops' softmax, as the paper did
            probs = jnp.exp(logits - _logsumexp(logits, split)[:, None])
            logits = jnp.log(probs.reshape(b, n, -1).mean(1))
        return _sums(*example_stats(logits, labels, split), weights, copies)

    specs = param_specs(model, params, mesh)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(specs, P(DATA), P(DATA), P(DATA)), out_specs=P()
    )


def dropout_masks(
    key: jax.Array, model: AlexNet, batch: int, image_size: int, mesh: Mesh
) -> tuple[jax.Array, ...]:
    """Keep-masks for the global batch, the same on every mesh (threefry is partitionable)."""
    if model.dropout_rate == 0:
        return ()
    sharding = NamedSharding(mesh, mask_spec(mesh))
    keys = jax.random.split(key, 2)
    return tuple(
        jax.lax.with_sharding_constraint(
            jax.random.bernoulli(k, 1.0 - model.dropout_rate, (batch, f)), sharding
        )
        for k, f in zip(keys, model.dropout_features(image_size), strict=True)
    )
