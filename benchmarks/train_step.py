"""Images/s, FLOP/s, MFU, compile time and memory of the real train step, on any backend.

    python benchmarks/train_step.py --config=configs/alexnet.py --config.batch_size=64 \
        --config.mesh.data=1 [--devices=8] [--steps=10] [--peak_flops=...] [--json]

Compiles the step launch.py runs (steps.Trainer, fed uint8 crops that it normalises on the
device, as configs/alexnet.py trains) for the config's mesh and dtype, and times it on
synthetic batches: each timed step is waited for, after --warmup untimed ones. FLOPs come two
ways: XLA's cost analysis of the compiled program (per device, times the devices) and the
analytic count, 3 x 2 x the forward multiply-adds of the convolutions and dense layers (the
backward pass costs about twice the forward). MFU divides the analytic FLOP/s by the peak:
--peak_flops, else a large matmul timed here (best of 5) in the model's dtype; on the CPU, the
better of YNNPACK's and XLA's own dots. On the CPU the simulated devices share the same cores,
so the peak is the machine's, measured once; on GPUs and TPUs it is one device's times the
devices.

Ablations, one per run: --plain_ops=lrn,pool traces LRN and max-pooling with their plain
definitions (AlexNet.plain_ops); --ynnpack leaves XLA's default CPU convolutions and dots
(YNNPACK's) in place of backend.CPU_XLA_FLAGS; --system_malloc leaves glibc's malloc as it comes
(without backend.keep_freed_memory).

A/B in one process: --against='{"xla_cpu_experimental_ynn_fusion_type": ""}' (XLA compiler
options, JSON) and/or --against_plain_ops=lrn compile the step a second time and time the two
in --rounds interleaved rounds (default 5 of 2 timed steps each), printing the ratio per round.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ importable

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Only when run as a script: the sibling benchmarks import this module's functions."""
    config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
    flags.DEFINE_integer("devices", None, "Simulated CPU devices (default: the mesh's).")
    flags.DEFINE_integer("steps", 10, "Timed steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
    flags.DEFINE_float("peak_flops", None, "Peak FLOP/s of all devices (default: measure).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.DEFINE_list("plain_ops", [], "Ablation: trace these ops (lrn, pool) plainly.")
    flags.DEFINE_bool("ynnpack", False, "Ablation: XLA's default CPU convolutions (YNNPACK).")
    flags.DEFINE_bool(
        "system_malloc", False, "Ablation: glibc's malloc as it comes (no keep_freed_memory)."
    )
    flags.DEFINE_string(
        "against",
        None,
        'A/B: XLA compiler options as JSON (e.g. \'{"xla_cpu_experimental_ynn_fusion_type": ""}\')'
        " for a second compile of the step, timed interleaved with the first.",
    )
    flags.DEFINE_list("against_plain_ops", [], "A/B: trace these ops plainly in the second.")
    flags.DEFINE_integer("rounds", 5, "A/B: interleaved rounds of --steps timed steps each.")
    flags.mark_flags_as_required(["config"])


def forward_macs(model, params, image_size: int) -> int:
    """Multiply-adds of one image's forward pass through the convolutions and dense layers."""
    sizes = dict(model.feature_shapes(image_size))
    total = 0
    for name, layer in params.items():
        kernel = int(np.prod(layer["kernel"].shape))  # conv: (kh, kw, in per group, out)
        total += kernel * (sizes[name][0] * sizes[name][1] if name in sizes else 1)
    return total


def matmul_peak(dtype: str, n: int = 4096) -> float:
    """FLOP/s of an n x n matmul on the first device, best of 5. On the CPU, the better of
    YNNPACK's dots (backend.CPU_XLA_FLAGS) and XLA's own Eigen dots, the faster at this size:
    the peak must not fall with the library the step's dense layers run on."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    lowered = jax.jit(lambda x: x @ x).lower(a)
    compiled = [lowered.compile()]
    if jax.default_backend() == "cpu":
        compiled.append(
            lowered.compile(compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
        )
    best = float("inf")
    for f in compiled:
        f(a).block_until_ready()
        for _ in range(5):
            start = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def synthetic_batch(config, mesh, trainer):
    """A global batch as the input pipeline ships it, and constants that normalise it as
    transforms.device_constants would (the config's kind of mean, a std where it divides),
    made here so that the step runs without TensorFlow."""
    import jax

    from alexnet_jax import parallel
    from alexnet_jax.batch import Batch

    i, b = config.input, config.batch_size
    rng = np.random.default_rng(0)
    room = i.resize_size - i.image_size + 1
    local = Batch(
        images=rng.integers(0, 256, (b, i.image_size, i.image_size, 3)).astype(np.uint8),
        crops=np.stack(
            [rng.integers(0, room, b), rng.integers(0, room, b), np.arange(b) % 2], 1
        ).astype(np.int32),
        shifts=rng.normal(0, 5, (b, 3)).astype(np.float32),
        labels=rng.integers(0, config.model.num_classes, b).astype(np.int32),
    )
    mean_shape = (i.resize_size, i.resize_size, 3) if i.mean == "image" else (3,)
    consts = {
        "mean": np.full(mean_shape, 120.0, np.float32),
        "std": np.full(3, 60.0 if i.divide_by_std else 1.0, np.float32),
    }
    rows = parallel.process_rows(mesh, b)
    local = jax.tree.map(lambda v: v[rows], local)
    return parallel.global_batch(mesh, local, b), trainer.input_constants(consts)


def _checked(config):
    """The config with its batch size resolved and checked, and its mesh."""
    import jax

    from alexnet_jax import config_checks, parallel

    config = config_checks.resolve_batch_size(config, jax.device_count())
    config_checks.check_config(config, jax.device_count(), jax.process_count())
    return config, parallel.create_mesh(config.mesh.data, config.mesh.model)


def _program(config, mesh, plain_ops: tuple[str, ...] = (), options: dict | None = None):
    """The compiled step (`plain_ops` traced plainly, XLA compiler `options`), its Trainer,
    a fresh state, a synthetic batch with its constants and zero sums, and the seconds that
    tracing and compiling took."""
    from alexnet_jax import steps

    trainer = steps.Trainer(config, mesh, plain_ops)
    state = trainer.init_state(config.seed)
    batch, consts = synthetic_batch(config, mesh, trainer)
    sums = trainer.zero_sums()
    start = time.perf_counter()
    lowered = trainer.train_step.lower(state, batch, sums, consts)
    compiled = lowered.compile(compiler_options=options or None)
    return compiled, trainer, state, batch, sums, consts, time.perf_counter() - start


def _timed_steps(compiled, state, batch, sums, consts, warmup: int, steps: int):
    """The state after `warmup` untimed and `steps` timed steps, each waited for, and the
    timed steps' seconds."""
    import jax

    times = []
    for k in range(warmup + steps):
        start = time.perf_counter()
        state, out = compiled(state, batch, sums, consts)
        jax.block_until_ready(out)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return state, times


def measure(
    config,
    steps: int = 10,
    warmup: int = 2,
    peak_flops: float | None = None,
    plain_ops: tuple[str, ...] = (),
    freed_memory_kept: bool = False,
) -> dict:
    """The step's figures as one JSON-able dict; `freed_memory_kept`: what
    backend.prepare_backend returned in this process."""
    import jax

    from benchmarks import report

    config, mesh = _checked(config)
    compiled, trainer, state, batch, sums, consts, compile_s = _program(config, mesh, plain_ops)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    devices = mesh.devices.size

    state, times = _timed_steps(compiled, state, batch, sums, consts, warmup, steps)
    b = config.batch_size
    rates = b / np.array(times)
    median_s = float(np.median(times))
    analytic = 6 * forward_macs(trainer.model, state.params, config.input.image_size) * b
    xla = float(cost.get("flops", 0.0)) * devices
    backend = jax.default_backend()
    if peak_flops:
        peak, peak_from = peak_flops, "--peak_flops"
    else:
        one = matmul_peak(config.model.dtype)
        peak = one if backend == "cpu" else one * devices
        peak_from = "4096x4096 matmul" + ("" if backend == "cpu" else f" x {devices} devices")
    mem = report.peak_bytes(compiled)
    return {
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape),
        "variant": config.model.variant,
        "dtype": config.model.dtype,
        "batch_size": b,
        "images_per_sec": float(np.median(rates)),
        "images_per_sec_min": float(rates.min()),
        "images_per_sec_max": float(rates.max()),
        "step_seconds": median_s,
        "flops_per_step_xla": xla,
        "flops_per_step_analytic": float(analytic),
        "flops_per_sec_xla": xla / median_s,
        "flops_per_sec_analytic": analytic / median_s,
        "peak_flops_per_sec": peak,
        "peak_from": peak_from,
        "mfu": analytic / median_s / peak,
        "compile_seconds": compile_s,
        "memory_bytes_per_device": mem,
        "plain_ops": sorted(plain_ops),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "freed_memory_kept": freed_memory_kept,
    }


def interleaved(
    config,
    options: dict,
    plain_ops: tuple[str, ...] = (),
    rounds: int = 5,
    steps: int = 2,
) -> dict:
    """The step compiled twice, as measure() does ("baseline") and with XLA compiler `options`
    and `plain_ops` ("against"), timed in interleaved rounds: each round runs one untimed and
    `steps` timed steps of the baseline, then of the other. Speed on this machine drifts by
    tens of percent within minutes, so a change is judged by the ratio within each round."""

    config, mesh = _checked(config)
    runs = {}
    # One call site for both: the programs then differ only by what the change does (source
    # locations are part of the compiled program's text, compared below).
    for name, plain, opts in (("baseline", (), None), ("against", plain_ops, options)):
        runs[name] = list(_program(config, mesh, plain, opts))
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            compiled, _, state, batch, sums, consts, _ = run
            run[2], times = _timed_steps(compiled, state, batch, sums, consts, 1, steps)
            rates[name].append(config.batch_size * steps / sum(times))
    ratios = np.array(rates["against"]) / np.array(rates["baseline"])
    programs = [run[0].as_text() for run in runs.values()]
    return {
        "mesh": dict(mesh.shape),
        "variant": config.model.variant,
        "batch_size": config.batch_size,
        "compiler_options": options,
        "plain_ops": sorted(plain_ops),
        "programs_differ": programs[0] != programs[1],  # False: the change did nothing
        "images_per_sec_baseline": rates["baseline"],
        "images_per_sec_against": rates["against"],
        "ratios": ratios.tolist(),  # against / baseline, per round
        "ratio_median": float(np.median(ratios)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def ab_table(r: dict) -> str:
    f = lambda v: ", ".join(f"{x:.1f}" for x in v)
    change = [json.dumps(r["compiler_options"]) if r["compiler_options"] else ""]
    change += [f"plain ops {', '.join(r['plain_ops'])}"] if r["plain_ops"] else []
    return "\n".join(
        [
            f"train step A/B: {r['variant']} model, global batch {r['batch_size']}, "
            f"mesh {r['mesh']}; against: {'; '.join(c for c in change if c)}",
            f"baseline images/s   {np.median(r['images_per_sec_baseline']):.1f} "
            f"(rounds: {f(r['images_per_sec_baseline'])})",
            f"against images/s    {np.median(r['images_per_sec_against']):.1f} "
            f"(rounds: {f(r['images_per_sec_against'])})",
            f"against / baseline  {r['ratio_median']:.3f} (median of the rounds: "
            f"{', '.join(f'{x:.2f}' for x in r['ratios'])})",
            f"XLA_FLAGS           {r['xla_flags']}",
        ]
        + ([] if r["programs_differ"] else ["(the two compiled programs are the same)"])
    )


def table(r: dict) -> str:
    g = lambda x: f"{x / 1e9:,.1f} G"
    rows = [
        f"train step: {r['variant']} model, {r['dtype']}, global batch {r['batch_size']}, "
        f"mesh {r['mesh']}, {r['backend']} ({r['device_kind']})",
        f"images/s            {r['images_per_sec']:,.1f} (median; min "
        f"{r['images_per_sec_min']:,.1f}, max {r['images_per_sec_max']:,.1f})",
        f"FLOP per step       {g(r['flops_per_step_analytic'])} analytic, "
        f"{g(r['flops_per_step_xla'])} XLA cost analysis",
        f"FLOP/s              {g(r['flops_per_sec_analytic'])} analytic, "
        f"{g(r['flops_per_sec_xla'])} XLA",
        f"peak FLOP/s         {g(r['peak_flops_per_sec'])} ({r['peak_from']})",
        f"MFU                 {100 * r['mfu']:.1f}% (analytic FLOP/s over the peak)",
        f"compile             {r['compile_seconds']:.1f} s",
        "memory per device   "
        + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in r["memory_bytes_per_device"].items()),
        f"plain ops           {', '.join(r['plain_ops']) or 'none'}",
        f"XLA_FLAGS           {r['xla_flags']}",
        f"host malloc         {'keeps freed memory' if r['freed_memory_kept'] else 'as it comes'}",
    ]
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    import jax

    from alexnet_jax import backend

    # The XLA flags and malloc settings launch.py runs with, before any backend starts.
    kept = backend.prepare_backend(cpu_flags=not FLAGS.ynnpack, malloc=not FLAGS.system_malloc)

    # Only the CPU backend reads this: on GPU/TPU the real devices are used.
    wanted = FLAGS.devices or max(config.mesh.data, 1) * config.mesh.model
    jax.config.update("jax_num_cpu_devices", wanted)
    from alexnet_jax import UsageError

    try:
        if FLAGS.against is not None:
            options = json.loads(FLAGS.against)
            if not isinstance(options, dict):
                raise UsageError(f"--against={FLAGS.against!r} must be a JSON object of options.")
            steps = FLAGS["steps"].value if FLAGS["steps"].present else 2
            result = interleaved(
                config, options, tuple(FLAGS.against_plain_ops), FLAGS.rounds, steps
            )
            print(json.dumps(result) if FLAGS.json else ab_table(result))
            return
        result = measure(
            config, FLAGS.steps, FLAGS.warmup, FLAGS.peak_flops, tuple(FLAGS.plain_ops), kept
        )
    except (UsageError, json.JSONDecodeError) as e:
        print(f"train_step.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result) if FLAGS.json else table(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    app.run(main)
