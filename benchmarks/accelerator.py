"""One command that checks and measures a GPU or TPU host (or this CPU, at tiny sizes) for AlexNet.

    python benchmarks/accelerator.py --out=DIR                     # every part: 5-8 minutes
    python benchmarks/accelerator.py --out=DIR --parts=checks,step # JAX's stack alone
    python benchmarks/accelerator.py --out=DIR --tiny              # any CPU, in seconds

Writes DIR/accelerator.json and DIR/accelerator.md (and prints the table). --parts picks:

- checks: whether this backend computes the model right (benchmarks/device_checks.py): the
  custom LRN and max-pool gradients against XLA's of the plain definitions in float32 and
  bfloat16, bfloat16 steps against float32, and (2+ devices) the towers split over devices
  against one device; PASS/FAIL per check, and the command exits 1 if any fails;
- step: the real train step (steps.Trainer, uint8 crops normalised on the device; mesh.data over
  every local device, towers together) in float32 and bfloat16 at --per_device batches of 128,
  256 and 512: images/s, MFU against the device's published dense peak for that dtype (H100
  and H200 SXM 989 TFLOP/s bfloat16 and 67 float32, A100 312 and 19.5, TPU v4 275, v5e 197;
  otherwise a 4096x4096 matmul timed here), compile time and XLA's memory per device; then,
  in bfloat16 at 256, each choice of custom and plain LRN and pooling gradients
  (model.fast_ops), the fastest of which --record_fast_ops writes into ops.py's table;
- input: the paper-256 input path of one process on all the host's cores (tf.data, and DALI
  where it is installed), on photographs made here (benchmarks/input_pipeline.py's);
- loop: configs/accelerator.py's loop (launch.py's) for --loop_steps steps on in-memory data
  (the digits), at the step's size: images/s and data_wait_fraction, the host's share.

checks and step need only jax, flax, optax, orbax-checkpoint, absl-py, ml-collections and numpy
(docs/clusters.md); input and loop need the project's whole install. Each device's peak memory
as the backend reports it ends the JSON. On a CPU the full sizes would take about 20 GB and most
of an hour: there it runs with --tiny, or --allow_cpu and small --per_device batches.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/, benchmarks/
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


PARTS = ("checks", "step", "input", "loop")


def _define_flags() -> None:
    """Only when run as a script: the tests import this module's functions."""
    flags.DEFINE_string("out", None, "Directory for accelerator.json and accelerator.md.")
    flags.DEFINE_list("parts", list(PARTS), f"What to run, of {', '.join(PARTS)}.")
    flags.DEFINE_bool(
        "record_fast_ops",
        False,
        "step: write the fastest choice of custom LRN and pooling gradients for this backend "
        "into alexnet_jax/fast_ops.json (model.fast_ops=auto's table).",
    )
    flags.DEFINE_bool("tiny", False, "Tiny sizes (1/16 width, 67x67, small batches): CI.")
    flags.DEFINE_bool(
        "allow_cpu", False, "The real model on a CPU on purpose (give small --per_device)."
    )
    flags.DEFINE_list("per_device", ["128", "256", "512"], "Per-device batches.")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
    flags.DEFINE_integer("steps", 10, "Timed train steps per setting.")
    flags.DEFINE_integer("loop_steps", 300, "Steps of the loop run (0: skip).")
    flags.DEFINE_integer("input_images", 384, "Photographs for the input path.")
    flags.mark_flags_as_required(["out"])


# Published dense peaks per device, FLOP/s, by a fragment of jax's device_kind.
PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5e": {"bfloat16": 197e12},
}


def published_peak(kind: str, dtype: str) -> float | None:
    """The published dense peak of one device of `kind` for `dtype`, if known."""
    for fragment, peaks in PEAKS.items():
        if fragment.lower() in kind.lower():
            return peaks.get(dtype)
    return None


def devices() -> dict:
    import jax

    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "host_cores": len(os.sched_getaffinity(0)),
    }


def _config(dtype: str, per_device: int, fast_ops: str = "auto"):
    from configs import accelerator

    config = accelerator.get_config()
    config.model.dtype, config.model.fast_ops = dtype, fast_ops
    config.per_device_batch_size = per_device
    config.mesh.data = -1
    if FLAGS.tiny:
        config.model.width, config.model.num_classes = 1 / 16, 10
        config.input.image_size, config.input.resize_size = 67, 72
    return config


def step_rows() -> list[dict]:
    """The train step per dtype and per-device batch, then plain ops in bfloat16 at 256."""
    import jax

    from benchmarks import train_step

    kind = jax.devices()[0].device_kind
    n = jax.device_count()
    # The peak of all devices per dtype: one device's, published or else a matmul timed here
    # once (512 with --tiny), times the devices. On the CPU the simulated devices share the
    # machine's, and bfloat16 takes float32's: the CPU has no bfloat16 arithmetic (XLA converts),
    # so a bfloat16 matmul times the conversions, not a peak.
    on_cpu = jax.default_backend() == "cpu"
    peaks, measured = {}, set()
    for d in FLAGS.dtypes:
        one = published_peak(kind, d)
        if one is None:
            timed = "float32" if on_cpu else d
            one = train_step.matmul_peak(timed, 512 if FLAGS.tiny else 4096)
            measured.add(d)
        peaks[d] = one if on_cpu else one * n
    settings = [(d, int(b), "auto") for d in FLAGS.dtypes for b in FLAGS.per_device]
    middle = int(FLAGS.per_device[len(FLAGS.per_device) // 2])
    # The other choices of custom and plain gradients beside auto's, at one setting.
    auto = FAST_NAMES[fast_set("auto", jax.default_backend())]
    settings += [(FLAGS.dtypes[-1], middle, f) for f in FAST_NAMES.values() if f != auto]
    rows = []
    for dtype, per_device, fast_ops in settings:
        r = train_step.measure(_config(dtype, per_device, fast_ops), FLAGS.steps, 2, peaks[dtype])
        rows.append(
            {
                "dtype": dtype,
                "per_device_batch": per_device,
                "fast_ops": fast_ops,
                "images_per_sec": r["images_per_sec"],
                "images_per_sec_per_device": r["images_per_sec"] / n,
                "mfu": r["mfu"],
                "peak_from": "matmul here" if dtype in measured else "published",
                "compile_seconds": r["compile_seconds"],
                "memory_bytes_per_device": r["memory_bytes_per_device"]["peak"],
            }
        )
        print(f"step {dtype} {per_device}/device fast_ops={fast_ops}: {rows[-1]}", flush=True)
    return rows


# model.fast_ops by the ops it makes fast (ops.py traces the others plainly).
FAST_NAMES = {
    frozenset({"lrn", "pool"}): "all",
    frozenset({"lrn"}): "lrn",
    frozenset({"pool"}): "pool",
    frozenset(): "none",
}


def fast_set(fast_ops: str, backend: str) -> frozenset[str]:
    """The ops whose custom backward passes run under `fast_ops` on `backend`."""
    from alexnet_jax import ops

    return frozenset(ops.PLAIN_CHOICES) - set(ops.plain_for(fast_ops, backend))


def fast_ops_choice(rows: list[dict], backend: str) -> dict | None:
    """The images/s of each choice of fast ops at the setting where all were timed (auto's row
    stands for the choice auto makes), and the fastest; None unless all four were timed."""
    rates = {}
    for r in rows:
        name = FAST_NAMES[fast_set(r["fast_ops"], backend)]
        rates.setdefault((r["dtype"], r["per_device_batch"]), {})[name] = r["images_per_sec"]
    for (dtype, per_device), by_name in rates.items():
        if len(by_name) == len(FAST_NAMES):
            fastest = max(by_name, key=by_name.get)
            fast = sorted(next(k for k, v in FAST_NAMES.items() if v == fastest))
            return {
                "dtype": dtype,
                "per_device_batch": per_device,
                "images_per_sec": by_name,
                "fastest": fastest,
                "fast": fast,
            }
    return None


def record_fast_ops(choice: dict, backend: str, device_kind: str, path: Path) -> None:
    """Write `choice` (fast_ops_choice) as `backend`'s row of model.fast_ops=auto's table."""
    table = json.loads(path.read_text())
    rates = ", ".join(f"{k} {v:,.0f}" for k, v in choice["images_per_sec"].items())
    table[backend] = {
        "fast": choice["fast"],
        "evidence": (
            f"measured on {device_kind}, {choice['dtype']}, {choice['per_device_batch']} images "
            f"per device, images/s with these ops fast: {rates} (benchmarks/accelerator.py "
            "--parts=step --record_fast_ops)"
        ),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(path)


def input_rows() -> list[dict]:
    """The paper-256 train path of this process on all its cores, tf.data and DALI."""
    import dataclasses

    from alexnet_jax import config_checks, loaders, sources, transforms
    from benchmarks import input_pipeline as bench
    from configs import alexnet

    n, threads = FLAGS.input_images, len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench.synthetic_imagenet(root, n)
        cfg = alexnet.get_config().input
        cfg.dataset, cfg.data_dir = "imagenet2012_paper256", str(root / "data")
        source = sources.create_source(cfg)
        stats = transforms.Stats.from_dict(source.stats, source.mean_image)
        p = transforms.Preprocess(stats, 227, 256, True, 0.1, mean="image", on_device=True)
        batch = min(128, n // 2)
        steps = max(8 * n // batch, 2)
        names = ["tf.data"] + (["dali"] if config_checks.dali_available() else [])
        for loader in names:
            q = dataclasses.replace(p, loader=loader)
            stream = dict(seed=0, batch_size=batch, start_step=0, num_steps=steps, threads=threads)
            rate = bench.iterator_rate(loaders.train_batches(source, q, **stream))
            rows.append({"loader": loader, "threads": threads, "images_per_sec": rate})
            print(f"input {loader}, {threads} threads: {rate:,.0f} images/s", flush=True)
    return rows


def loop_row() -> dict | None:
    """configs/accelerator.py through launch.py's loop on the in-memory digits."""
    from alexnet_jax import metrics, train

    steps = FLAGS.loop_steps
    if not steps:
        return None
    per_device = int(FLAGS.per_device[len(FLAGS.per_device) // 2])
    config = _config(FLAGS.dtypes[-1], per_device)
    config.input.dataset, config.model.num_classes = "digits", 10
    config.num_train_steps = steps
    config.log_every_steps = max(steps // 6, 1)
    config.eval_every_steps = config.checkpoint_every_steps = 10 * steps  # the end only
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        seconds = time.perf_counter() - start
        lines = [m for m in metrics.read_metrics(workdir) if "train/images_per_sec" in m]
    timed = lines[1:] or lines  # the first interval holds the compilation
    row = {
        "steps": steps,
        "per_device_batch": per_device,
        "images_per_sec": float(np.median([m["train/images_per_sec"] for m in timed])),
        "data_wait_fraction": float(np.median([m["train/data_wait_fraction"] for m in timed])),
        "seconds": seconds,
    }
    print(f"loop: {row}", flush=True)
    return row


def memory() -> list[dict]:
    import jax

    out = []
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        out.append({"device": str(d), "peak_bytes_in_use": stats.get("peak_bytes_in_use")})
    return out


def markdown(r: dict) -> str:
    d = r["devices"]
    lines = [
        f"{d['devices']} x {d['device_kind']} ({d['backend']}), {d['processes']} process(es), "
        f"{d['host_cores']} host cores",
    ]
    if "checks" in r:
        lines += ["", "| check | result | difference | at most |", "|---|---|---|---|"]
        for c in r["checks"]:
            verdict = "PASS" if c["passed"] else "**FAIL**"
            lines.append(
                f"| {c['name']} | {verdict} | {c['difference']:.2e} | {c['tolerance']:.0e} |"
            )
    if "train_step" in r:
        lines += [
            "",
            "| dtype | batch per device | fast ops | images/s | per device | MFU | peak from |"
            " compile s | memory per device |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in r["train_step"]:
            lines.append(
                f"| {s['dtype']} | {s['per_device_batch']} | {s['fast_ops']} | "
                f"{s['images_per_sec']:,.0f} | {s['images_per_sec_per_device']:,.0f} | "
                f"{100 * s['mfu']:.1f}% | {s['peak_from']} | {s['compile_seconds']:.1f} | "
                f"{s['memory_bytes_per_device'] / 2**20:,.0f} MiB |"
            )
        if r.get("fast_ops"):
            f = r["fast_ops"]
            lines += [
                "",
                f"fastest LRN and pooling gradients ({f['dtype']}, {f['per_device_batch']} per "
                f"device): fast_ops={f['fastest']}",
            ]
    if "input" in r:
        lines += [
            "",
            "| input path (paper-256, one process) | threads | images/s |",
            "|---|---|---|",
        ]
        for i in r["input"]:
            lines.append(f"| {i['loader']} | {i['threads']} | {i['images_per_sec']:,.0f} |")
    if r.get("loop"):
        lp = r["loop"]
        lines += [
            "",
            f"launch.py's loop, configs/accelerator.py on the digits, {lp['steps']} steps of "
            f"{lp['per_device_batch']} per device: {lp['images_per_sec']:,.0f} images/s, "
            f"waiting for input {100 * lp['data_wait_fraction']:.0f}% of the time",
        ]
    return "\n".join(lines) + "\n"


def refusal(parts: list[str]) -> str | None:
    """One line when the run cannot go on: unknown parts, a recording at tiny sizes, or full
    sizes on a CPU (which would take about 20 GB and most of an hour)."""
    import jax

    from alexnet_jax import UsageError, cluster

    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        return f"--parts={','.join(parts)}: choose from {', '.join(PARTS)}"
    on_cpu = jax.default_backend() == "cpu"
    if FLAGS.record_fast_ops and (FLAGS.tiny or on_cpu or "step" not in parts):
        return (
            "--record_fast_ops records the step part's measurement on a GPU or TPU: not with "
            "--tiny or on the CPU, whose row comes from benchmarks/train_step.py's interleaved "
            "rounds (docs/performance.md)"
        )
    if FLAGS.tiny or FLAGS.allow_cpu or not on_cpu:
        return None
    try:
        cluster.check_backend()  # a GPU or TPU here that JAX did not take: that line
    except UsageError as e:
        return str(e)
    return (
        f"JAX computes on the CPU here ({jax.device_count()} cpu device(s)): at a GPU's sizes "
        "this would take about 20 GB and most of an hour. Run it on a GPU or TPU host, add "
        "--tiny for a CPU's sizes, or --allow_cpu with small --per_device batches."
    )


def checks_config():
    """The model the checks run: the step's (tiny or real), 16 images (4 with --tiny)."""
    config = _config("float32", 1)
    config.per_device_batch_size = None
    config.batch_size = 4 if FLAGS.tiny else 16
    return config


def main(argv: list[str]) -> None:
    del argv
    from alexnet_jax import backend

    backend.prepare_backend()
    import jax

    if FLAGS.tiny:
        jax.config.update("jax_num_cpu_devices", 2)  # a mesh of two, on any CPU
    parts = [p.strip() for p in FLAGS.parts if p.strip()]
    problem = refusal(parts)
    if problem:
        print(f"accelerator.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    result = {"devices": devices(), "parts": parts}
    if "checks" in parts:
        from benchmarks import device_checks

        config = checks_config()
        result["checks"] = [c.row() for c in device_checks.run(config, config.batch_size)]
    if "step" in parts:
        result["train_step"] = step_rows()
        result["fast_ops"] = fast_ops_choice(result["train_step"], jax.default_backend())
        if FLAGS.record_fast_ops and result["fast_ops"]:
            from alexnet_jax import ops

            kind = result["devices"]["device_kind"]
            record_fast_ops(result["fast_ops"], jax.default_backend(), kind, ops.FAST_OPS_TABLE)
            print(f"recorded in {ops.FAST_OPS_TABLE}: {result['fast_ops']['fast']}")
    if "input" in parts:
        result["input"] = input_rows()
    if "loop" in parts:
        result["loop"] = loop_row()
    result["memory"] = memory()
    result["seconds"] = time.perf_counter() - start
    out = Path(FLAGS.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "accelerator.md").write_text(table)
    print(table)
    print(f"({result['seconds']:.0f} s; {out}/accelerator.json)")
    failed = [c["name"] for c in result.get("checks", []) if not c["passed"]]
    if failed:
        print(
            f"accelerator.py: {len(failed)} check(s) FAILED: {'; '.join(failed)}", file=sys.stderr
        )
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
