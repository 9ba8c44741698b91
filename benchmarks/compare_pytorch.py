"""The real train step against the same model in PyTorch (eager) and TensorFlow (graph, and
graph compiled by XLA), timed interleaved on this machine.

    pip install -e ".[bench]"   # PyTorch's CPU build
    python benchmarks/compare_pytorch.py [--variant=paper] [--batch_size=64] [--rounds=5] [--json]

The three run the identical architecture (benchmarks/torch_alexnet.py for PyTorch: grouped
convolutions for the towers, the paper's LRN within each tower, dropout after fc6 and fc7; the
TensorFlow model below: each tower a convolution of its own, `tf.nn.local_response_normalization`)
with the same weights: before timing, the script checks that the three give the same logits on
the same images (weights converted by torch_alexnet.to_torch) and refuses to time models
that differ. Each framework's step is a whole SGD step (momentum 0.9, weight decay 5e-4 on the
kernels, dropout on) at the same global batch; ours is the step launch.py runs (steps.Trainer
on one device, fed uint8 crops that it normalises on the device), the others take normalised
float images. Every round times --steps steps of each framework in turn (A B C D, A B C D, ...),
after --settle untimed ones, so a slow spell of the machine falls on all of them; the ratios
are per round.

Ours runs in this process, set up as launch.py sets it up (backend.prepare_backend: its XLA
flags, and glibc's malloc keeping freed memory for XLA's CPU buffers); each other framework
runs in a process of its own, idle while the others run, with glibc's malloc as it comes, as
its users run it (--others_malloc=kept gives them ours). Sharing one process, the frameworks'
thread pools and allocations slowed each other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ importable
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_VARIANT = flags.DEFINE_enum("variant", "paper", ["paper", "owt"], "Which AlexNet.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch, the same for every framework.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps of each framework per round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps of each framework first.")
_SETTLE = flags.DEFINE_integer(
    "settle", 1, "Untimed steps of each framework at the start of its turn in every round."
)
_FRAMEWORKS = flags.DEFINE_list(
    "frameworks", "jax,torch,tf,tf_xla", "Which to time: jax, torch, tf, tf_xla."
)
_OTHERS_MALLOC = flags.DEFINE_enum(
    "others_malloc",
    "system",
    ["system", "kept"],
    "The other frameworks' processes: glibc's malloc as it comes, or kept as ours "
    "(backend.keep_freed_memory).",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
NAMES = {
    "jax": "alexnet_jax (steps.Trainer, XLA)",
    "torch": "PyTorch eager",
    "tf": "TensorFlow graph",
    "tf_xla": "TensorFlow graph, jit_compile (XLA)",
}


def _config(variant: str, batch: int):
    from configs import alexnet, owt

    config = (alexnet if variant == "paper" else owt).get_config()
    config.batch_size = batch
    config.mesh.data, config.mesh.model = 1, 1
    return config


class JaxStep:
    """steps.Trainer's step on one device, on a synthetic uint8 batch."""

    def __init__(self, config):
        from train_step import synthetic_batch

        from alexnet_jax import parallel, steps

        mesh = parallel.create_mesh(1, 1)
        self.trainer = steps.Trainer(config, mesh)
        self.state = self.trainer.init_state(config.seed)
        self.batch, self.consts = synthetic_batch(config, mesh, self.trainer)
        self.sums = self.trainer.zero_sums()

    def params(self) -> dict:
        import jax

        return jax.tree.map(np.asarray, jax.device_get(self.state.params))

    def logits(self, params: dict, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.trainer.model.apply({"params": params}, x))

    def __call__(self) -> None:
        import jax

        self.state, out = self.trainer.train_step(self.state, self.batch, self.sums, self.consts)
        jax.block_until_ready(out)

    def timed(self, settle: int, steps: int) -> float:
        return _timed(self, settle, steps)


class TorchStep:
    """benchmarks/torch_alexnet.py with SGD as torch.optim has it (decay on weights only)."""

    def __init__(self, variant: str, params: dict, x: np.ndarray, labels: np.ndarray):
        import torch

        from alexnet_jax import convert_torchvision
        from benchmarks import torch_alexnet

        self.torch = torch
        self.model = torch_alexnet.build(variant)
        keys = convert_torchvision.layer_keys(self.model.state_dict())
        weights = torch_alexnet.to_torch(params, keys)
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        decay = [p for n, p in self.model.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in self.model.named_parameters() if not n.endswith("weight")]
        self.opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest}],
            lr=LR,
            momentum=MOMENTUM,
        )
        self.x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def logits(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        self.model.train()
        return out.numpy()

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.opt.step()


class TFStep:
    """The same model written directly in TensorFlow, NHWC, this project's parameter layout."""

    def __init__(self, variant, params, x, labels, jit_compile: bool):
        import tensorflow as tf

        from alexnet_jax.model import OWT_CONVS, PAPER_CONVS

        self.tf, self.paper = tf, variant == "paper"
        self.convs = PAPER_CONVS if self.paper else OWT_CONVS
        self.towers = 2 if self.paper else 1
        self.vars = {
            (layer, kind): tf.Variable(value)
            for layer, leaves in params.items()
            for kind, value in leaves.items()
        }
        self.velocity = {k: tf.Variable(tf.zeros_like(v)) for k, v in self.vars.items()}
        self.x, self.labels = tf.constant(x), tf.constant(labels.astype(np.int32))
        self.step = tf.function(self._step, jit_compile=jit_compile)
        self.forward = tf.function(lambda x: self._forward(x, False), jit_compile=jit_compile)

    def _forward(self, x, train: bool):
        from alexnet_jax import ops

        tf = self.tf
        for spec in self.convs:
            k, b = self.vars[(spec.name, "kernel")], self.vars[(spec.name, "bias")]
            groups = self.towers if spec.grouped else 1
            pad = [[0, 0], [spec.padding] * 2, [spec.padding] * 2, [0, 0]]
            outs = [
                tf.nn.conv2d(xg, kg, spec.stride, pad)
                for xg, kg in zip(tf.split(x, groups, -1), tf.split(k, groups, -1), strict=True)
            ]
            x = tf.nn.relu((outs[0] if groups == 1 else tf.concat(outs, -1)) + b)
            if spec.lrn and self.paper:  # paper section 3.3 within each tower
                x = tf.concat(
                    [
                        tf.nn.local_response_normalization(
                            t, ops.LRN_N // 2, ops.LRN_K, ops.LRN_ALPHA, ops.LRN_BETA
                        )
                        for t in tf.split(x, self.towers, -1)
                    ],
                    -1,
                )
            if spec.pool:
                x = tf.nn.max_pool2d(x, 3, 2, "VALID")
        x = tf.reshape(x, [tf.shape(x)[0], -1])  # H, W, C order, as ours
        drop = (lambda t: tf.nn.dropout(t, 0.5)) if train else (lambda t: t)

        def dense(name, t):
            return tf.matmul(t, self.vars[(name, "kernel")]) + self.vars[(name, "bias")]

        if self.paper:
            x = drop(tf.nn.relu(dense("fc6", x)))
            x = drop(tf.nn.relu(dense("fc7", x)))
        else:
            x = tf.nn.relu(dense("fc6", drop(x)))
            x = tf.nn.relu(dense("fc7", drop(x)))
        return dense("fc8", x)

    def _step(self):
        tf = self.tf
        keys = list(self.vars)
        with tf.GradientTape() as tape:
            logits = self._forward(self.x, True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(self.labels, logits)
            )
        grads = tape.gradient(loss, [self.vars[k] for k in keys])
        for key, g in zip(keys, grads, strict=True):
            w, v = self.vars[key], self.velocity[key]
            if key[1] == "kernel":
                g = g + WEIGHT_DECAY * w
            v.assign(MOMENTUM * v - LR * g)  # the paper's rule, as optimizer.py has it
            w.assign_add(v)
        return loss

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.forward(self.tf.constant(x)).numpy()

    def __call__(self) -> None:
        self.step().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _timed(step, settle: int, steps: int) -> float:
    """Seconds of `steps` steps after `settle` untimed ones."""
    for _ in range(settle):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def _serve(conn, name: str, variant: str, params, x, labels, kept: bool) -> None:
    """A framework's own process: build its step, then answer the parent's requests."""
    if kept:
        from alexnet_jax import backend

        backend.keep_freed_memory()
    if name == "torch":
        import torch

        step, version = TorchStep(variant, params, x, labels), torch.__version__
    else:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        step, version = TFStep(variant, params, x, labels, name == "tf_xla"), tf.__version__
    del params
    conn.send(version)
    while (request := conn.recv())[0] != "stop":
        kind, arg = request
        conn.send(step.logits(arg) if kind == "logits" else _timed(step, *arg))


class Remote:
    """Another framework's step in a process of its own (spawned: its own malloc settings and
    thread pools), driven over a pipe."""

    def __init__(self, name: str, variant: str, params, x, labels, kept: bool):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, name, variant, params, x, labels, kept)
        self.process = ctx.Process(target=_serve, args=args, daemon=True)
        self.process.start()
        child.close()
        self.version = self.conn.recv()

    def _ask(self, kind: str, arg):
        self.conn.send((kind, arg))
        return self.conn.recv()

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._ask("logits", x)

    def timed(self, settle: int, steps: int) -> float:
        return self._ask("timed", (settle, steps))

    def close(self) -> None:
        self.conn.send(("stop", None))
        self.process.join(timeout=60)


def measure(variant: str, batch: int, frameworks: list[str], others_kept: bool) -> dict:
    import jax

    config = _config(variant, batch)
    size = config.input.image_size
    rng = np.random.default_rng(0)
    # Normalised inputs for the other frameworks, at the scale of mean-subtracted 0-255 RGB
    # (the paper's) or of unit-variance input (owt's).
    scale = 60.0 if config.input.divide_by_std is False else 1.0
    x = (scale * rng.normal(size=(batch, size, size, 3))).astype(np.float32)
    labels = rng.integers(0, config.model.num_classes, batch)

    ours = JaxStep(config)
    params = ours.params()
    others = {
        k: Remote(k, variant, params, x, labels, others_kept) for k in frameworks if k != "jax"
    }
    try:
        # The same function first: logits of a few images from the same weights.
        probe = x[: min(4, batch)]
        want = ours.logits(params, probe)
        agreement = {k: _rel(s.logits(probe), want) for k, s in others.items()}
        bad = {k: v for k, v in agreement.items() if not v < 1e-4}
        if bad:
            raise SystemExit(f"compare_pytorch.py: logits differ from alexnet_jax's: {bad}")

        steps = {k: others.get(k, ours) for k in frameworks}
        for step in steps.values():
            step.timed(_WARMUP.value, 0)
        rates = {k: [] for k in steps}
        for _ in range(_ROUNDS.value):
            for name, step in steps.items():
                # _SETTLE untimed steps: the first step after another framework's is slower.
                seconds = step.timed(_SETTLE.value, _STEPS.value)
                rates[name].append(_STEPS.value * batch / seconds)
    finally:
        for other in others.values():
            other.close()

    def spread(values) -> dict:
        v = np.asarray(values)
        return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}

    ratios = {f"jax/{k}": spread(np.asarray(rates["jax"]) / np.asarray(rates[k])) for k in others}
    return {
        "variant": variant,
        "batch_size": batch,
        "rounds": _ROUNDS.value,
        "steps_per_round": _STEPS.value,
        "settle_steps": _SETTLE.value,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__}
        | {("tensorflow" if k.startswith("tf") else k): s.version for k, s in others.items()},
        "others_malloc": "kept" if others_kept else "system",
        "logits_relative_difference": agreement,
        "images_per_sec": {k: spread(v) for k, v in rates.items()},
        "images_per_sec_per_round": rates,
        "ratios": ratios,
    }


def table(r: dict) -> str:
    lines = [
        f"train step: {r['variant']} model, global batch {r['batch_size']}, {r['backend']} with "
        f"{r['cpu_count']} cores; {r['rounds']} rounds x {r['steps_per_round']} steps each, "
        "interleaved",
        f"versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}",
        "logits vs alexnet_jax (norm-relative): "
        + ", ".join(f"{k} {v:.1e}" for k, v in r["logits_relative_difference"].items()),
        "",
        f"{'':40s} {'images/s median':>16s} {'min':>8s} {'max':>8s}",
    ]
    for k, s in r["images_per_sec"].items():
        lines.append(f"{NAMES[k]:40s} {s['median']:16.1f} {s['min']:8.1f} {s['max']:8.1f}")
    lines.append("")
    for k, s in r["ratios"].items():
        other = NAMES[k.split("/")[1]]
        lines.append(
            f"alexnet_jax / {other}: {s['median']:.2f}x (rounds {s['min']:.2f}-{s['max']:.2f})"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    from alexnet_jax import backend

    # The XLA flags and malloc settings launch.py runs with, before any backend starts.
    backend.prepare_backend()
    frameworks = [f.strip() for f in _FRAMEWORKS.value]
    unknown = set(frameworks) - set(NAMES)
    if unknown or "jax" not in frameworks:
        raise app.UsageError(f"--frameworks: jax and any of {sorted(NAMES)}; got {frameworks}")
    if "torch" in frameworks and importlib.util.find_spec("torch") is None:
        print(
            'compare_pytorch.py: needs PyTorch: pip install -e ".[bench]" (its CPU build), '
            "or leave torch out of --frameworks.",
            file=sys.stderr,
        )
        sys.exit(2)
    result = measure(_VARIANT.value, _BATCH.value, frameworks, _OTHERS_MALLOC.value == "kept")
    print(json.dumps(result) if _JSON.value else table(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
