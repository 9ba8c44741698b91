"""One command that measures a GPU or TPU host (or this CPU, at tiny sizes) for AlexNet.

    .venv/bin/python benchmarks/accelerator.py --out=DIR            # about 5-8 minutes on a GPU
    .venv/bin/python benchmarks/accelerator.py --out=DIR --tiny     # seconds, for any CPU

Writes DIR/accelerator.json and DIR/accelerator.md (and prints the table):

- the devices: kind, count, processes, the host's cores;
- the real train step (steps.Trainer, uint8 crops normalised on the device; mesh.data over
  every local device, towers together) in float32 and bfloat16 at --per_device batches of 128,
  256 and 512: images/s, MFU against the device's published dense peak for that dtype (H100
  and H200 SXM 989 TFLOP/s bfloat16 and 67 float32, A100 312 and 19.5, TPU v4 275, v5e 197;
  otherwise a 4096x4096 matmul timed here), compile time and XLA's memory per device; and in
  bfloat16 at 256 the same step with plain LRN and pooling (model.fast_ops=none);
- the paper-256 input path of one process on all the host's cores (tf.data, and DALI where it
  is installed), on photographs made here (benchmarks/input_pipeline.py's);
- configs/accelerator.py's loop (launch.py's) for --loop_steps steps on in-memory data (the
  digits), at the step's size: images/s and data_wait_fraction, the host's share;
- each device's peak memory as the backend reports it, where it does.
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


def _define_flags() -> None:
    """Only when run as a script: the tests import this module's functions."""
    flags.DEFINE_string("out", None, "Directory for accelerator.json and accelerator.md.")
    flags.DEFINE_bool("tiny", False, "Tiny sizes (1/16 width, 67x67, small batches): CI.")
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
    settings.append((FLAGS.dtypes[-1], middle, "none"))
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


def input_rows() -> list[dict]:
    """The paper-256 train path of this process on all its cores, tf.data and DALI."""
    import dataclasses

    from alexnet_jax import config_checks, dali_input, paper256, sources
    from alexnet_jax import input_pipeline as ip
    from benchmarks import input_pipeline as bench
    from configs import alexnet

    n, threads = FLAGS.input_images, len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "tars").mkdir()
        synsets = paper256.tfds_labels()[0][:4]
        bench.write_tars(root / "tars", bench.photographs(n, 0), bench.photographs(16, 1), synsets)
        paper256.prepare(str(root / "data"), str(root / "tars"))
        cfg = alexnet.get_config().input
        cfg.dataset, cfg.data_dir = "imagenet2012_paper256", str(root / "data")
        source = sources.create_source(cfg)
        stats = ip.Stats.from_dict(source.stats, source.mean_image)
        p = ip.Preprocess(stats, 227, 256, True, 0.1, mean="image", on_device=True)
        batch = min(128, n // 2)
        steps = max(8 * n // batch, 2)
        loaders = ["tf.data"] + (["dali"] if config_checks.dali_available() else [])
        for loader in loaders:
            q = dataclasses.replace(p, loader=loader)
            stream = dict(seed=0, batch_size=batch, start_step=0, num_steps=steps, threads=threads)
            if loader == "dali":
                it = dali_input.train_batches(source, q, **stream)
            else:
                it = ip.iterate(ip.train_dataset(source, q, **stream), source.train)
            rate = bench._iterator_rate(it)
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
    lines += ["", "| input path (paper-256, one process) | threads | images/s |", "|---|---|---|"]
    for i in r["input"]:
        lines.append(f"| {i['loader']} | {i['threads']} | {i['images_per_sec']:,.0f} |")
    if r["loop"]:
        lp = r["loop"]
        lines += [
            "",
            f"launch.py's loop, configs/accelerator.py on the digits, {lp['steps']} steps of "
            f"{lp['per_device_batch']} per device: {lp['images_per_sec']:,.0f} images/s, "
            f"waiting for input {100 * lp['data_wait_fraction']:.0f}% of the time",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    from alexnet_jax import backend

    backend.prepare_backend()
    if FLAGS.tiny:
        import jax

        jax.config.update("jax_num_cpu_devices", 2)  # a mesh of two, on any CPU
    start = time.perf_counter()
    result = {"devices": devices(), "train_step": step_rows(), "input": input_rows()}
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


if __name__ == "__main__":
    _define_flags()
    app.run(main)
