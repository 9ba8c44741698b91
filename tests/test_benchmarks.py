"""benchmarks/train_step.py on a tiny config, and compare_pytorch.py on a tiny batch: the JSON
they print, with numbers that hang together."""

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from alexnet_jax import backend

# The paper's structure at 1/8 width on 67x67 inputs: the real step, compiled in seconds.
TINY = (
    f"--config={REPO / 'configs/digits.py'}",
    "--config.model.width=0.125",
    "--config.input.image_size=67",
    "--config.input.resize_size=72",
    "--config.batch_size=16",
)


def run_json(script, *args):
    """benchmarks/`script` with `args` in a subprocess: the JSON object it printed last."""
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # compiles and times the real step in a subprocess
@pytest.mark.parametrize("mesh", [(1, 1), (4, 2)])
def test_the_train_step_benchmark_prints_its_json(mesh):
    data, model = mesh
    out = run_json(
        "train_step.py",
        *TINY,
        f"--config.mesh.data={data}",
        f"--config.mesh.model={model}",
        "--steps=3",
        "--warmup=1",
        "--peak_flops=1e12",
    )
    assert out["mesh"] == {"data": data, "model": model} and out["batch_size"] == 16
    assert out["images_per_sec_min"] <= out["images_per_sec"] <= out["images_per_sec_max"]
    assert out["images_per_sec"] == pytest.approx(16 / out["step_seconds"], rel=0.5)
    # Paper structure at 1/8 width on 67x67 inputs: 3 x 2 x the forward multiply-adds.
    assert 1e8 < out["flops_per_step_analytic"] < 1e9 and out["flops_per_step_xla"] > 0
    assert out["mfu"] == pytest.approx(out["flops_per_sec_analytic"] / 1e12)
    assert out["peak_from"] == "--peak_flops" and out["compile_seconds"] > 0
    assert out["plain_ops"] == [] and backend.CPU_XLA_FLAGS[0] in out["xla_flags"]
    # launch.py's malloc settings too, where glibc is the C library (backend.keep_freed_memory)
    assert out["freed_memory_kept"] == (platform.libc_ver()[0] == "glibc")
    mem = out["memory_bytes_per_device"]
    assert mem["peak"] == mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]


@pytest.mark.slow  # compiles and times the real step twice in a subprocess
def test_the_train_step_benchmark_compares_two_compiles_interleaved():
    out = run_json(
        "train_step.py",
        *TINY,
        "--config.mesh.data=1",
        '--against={"xla_cpu_experimental_ynn_fusion_type": ""}',
        "--against_plain_ops=lrn",
        "--rounds=3",
    )
    assert out["compiler_options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert out["plain_ops"] == ["lrn"] and out["mesh"] == {"data": 1, "model": 1}
    assert out["programs_differ"] is True
    base, other = np.array(out["images_per_sec_baseline"]), np.array(out["images_per_sec_against"])
    assert len(base) == len(other) == 3 and (base > 0).all() and (other > 0).all()
    np.testing.assert_allclose(out["ratios"], other / base)
    assert out["ratio_median"] == pytest.approx(np.median(other / base))


@pytest.mark.slow  # compiles the real step twice in a subprocess
def test_the_train_step_benchmark_says_when_the_variant_changes_nothing():
    out = run_json("train_step.py", *TINY, "--config.mesh.data=1", "--against={}", "--rounds=1")
    assert out["programs_differ"] is False and out["compiler_options"] == {}


def test_the_train_step_benchmark_refuses_options_that_are_not_an_object():
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_step.py"),
            f"--config={REPO / 'configs/digits.py'}",
            "--against=[1, 2]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "must be a JSON object" in r.stderr, r.stderr[-2000:]


def test_the_matmul_peak_times_both_cpu_dot_libraries(monkeypatch):
    """On the CPU the peak is the better of YNNPACK's dots and XLA's own: both are compiled."""
    import jax

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_step import matmul_peak

    options = []
    compile_ = jax.stages.Lowered.compile

    def compile(self, compiler_options=None, **kw):
        options.append(compiler_options)
        return compile_(self, compiler_options=compiler_options, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile)
    peak = matmul_peak("float32", n=128)
    assert options == [None, {"xla_cpu_experimental_ynn_fusion_type": ""}]
    assert 1e8 < peak < 1e14  # 2 * 128^3 FLOPs take between 40 ns and 40 ms


@pytest.mark.slow  # the full-size paper model in three frameworks, in a subprocess
def test_the_pytorch_comparison_checks_logits_then_times_interleaved_rounds():
    pytest.importorskip("torch", reason='needs PyTorch: pip install -e ".[bench]"')
    args = ("--batch_size=2", "--rounds=2", "--steps=1", "--warmup=0")
    out = run_json("compare_pytorch.py", *args)
    assert out["variant"] == "paper" and out["batch_size"] == 2
    agreement = out["logits_relative_difference"]
    assert set(agreement) == {"torch", "tf", "tf_xla"} and max(agreement.values()) < 1e-4
    rounds = out["images_per_sec_per_round"]
    assert set(rounds) == {"jax", "torch", "tf", "tf_xla"}
    assert all(len(v) == 2 and min(v) > 0 for v in rounds.values())
    per_round = [a / b for a, b in zip(rounds["jax"], rounds["torch"], strict=True)]
    assert out["ratios"]["jax/torch"]["median"] == pytest.approx(np.median(per_round))
    assert out["versions"]["torch"].startswith("2.")
    assert out["others_malloc"] == "system"  # each other framework in a process of its own


def accelerator(out, *args, blocked=False, code=None):
    """benchmarks/accelerator.py with `args`, writing into `out`: in a process that cannot
    import anything beyond JAX's stack (`blocked`), or after `code` ran in it."""
    script = str(REPO / "benchmarks/accelerator.py")
    argv = [script, f"--out={out}", *args]
    if blocked:
        cmd = [sys.executable, str(REPO / "tests/jax_stack_only.py"), *argv]
    elif code:
        run = "import runpy, sys\nsys.argv = sys.argv[1:]\n"
        run += "runpy.run_path(sys.argv[0], run_name='__main__')"
        cmd = [sys.executable, "-c", f"{code}\n{run}", *argv]
    else:
        cmd = [sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow  # the checks and five compiles of the step, in a subprocess
def test_the_device_check_runs_with_jax_stack_alone(tmp_path):
    """--parts=checks,step as on a GPU image without TensorFlow: every check passes here, and
    the step's figures and each choice of fast ops are in the JSON."""
    args = ["--parts=checks,step", "--tiny", "--per_device=2", "--steps=1"]
    r = accelerator(tmp_path, *args, blocked=True)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "accelerator.json").read_text())
    assert result["parts"] == ["checks", "step"] and "input" not in result
    checks = {c["name"]: c for c in result["checks"]}
    assert len(checks) == 14 and all(c["passed"] for c in checks.values())
    assert "towers split over mesh (1, 2) against one device: loss, gradients, updates" in checks
    printed = [line for line in r.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert len(printed) == 14 and all(line.startswith("PASS ") for line in printed)
    steps = result["train_step"]
    settings = {(s["dtype"], s["fast_ops"]) for s in steps}
    assert settings == {("float32", "auto"), ("bfloat16", "auto")} | {
        ("bfloat16", f) for f in ("lrn", "pool", "none")
    }
    for s in steps:
        assert s["images_per_sec"] > 0 and 0 < s["mfu"] < 1 and s["memory_bytes_per_device"] > 0
        assert s["images_per_sec_per_device"] == pytest.approx(s["images_per_sec"] / 2)
    choice = result["fast_ops"]
    assert set(choice["images_per_sec"]) == {"all", "lrn", "pool", "none"}
    assert choice["fastest"] == max(choice["images_per_sec"], key=choice["images_per_sec"].get)
    table = (tmp_path / "accelerator.md").read_text()
    assert "| LRN gradient, bfloat16 | PASS |" in table and "| bfloat16 | 2 | none |" in table


# ops.lrn with the cross-channel term of its gradient left out.
WRONG_LRN_GRADIENT = """
import functools, jax
from alexnet_jax import ops

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def lrn(x, towers):
    return ops._lrn_forward(x, towers)[0]

lrn.defvjp(ops._lrn_forward, lambda towers, res, g: (g * res[1],))
ops.lrn = lrn
"""


@pytest.mark.slow  # the checks, in a subprocess
def test_a_wrong_lrn_gradient_fails_the_device_check(tmp_path):
    r = accelerator(tmp_path, "--parts=checks", "--tiny", code=WRONG_LRN_GRADIENT)
    assert r.returncode == 1, r.stderr[-3000:]
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL ")]
    assert [f.split(":")[0] for f in failed] == [
        "FAIL LRN gradient, float32",
        "FAIL LRN gradient, bfloat16",
    ]
    assert "PASS LRN values, float32" in r.stdout
    assert "2 check(s) FAILED" in r.stderr
    checks = json.loads((tmp_path / "accelerator.json").read_text())["checks"]
    assert sum(not c["passed"] for c in checks) == 2  # the JSON is written all the same


def test_the_accelerator_benchmark_refuses_in_one_line(tmp_path):
    r = accelerator(tmp_path, "--parts=checks,bogus")
    assert r.returncode == 2 and "--parts=checks,bogus: choose from checks" in r.stderr
    r = accelerator(tmp_path, "--parts=step", "--tiny", "--record_fast_ops")
    assert r.returncode == 2 and "not with --tiny or on the CPU" in r.stderr
    r = accelerator(tmp_path, "--parts=checks")  # full sizes, on this CPU
    assert r.returncode == 2, r.stderr[-2000:]
    error = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "JAX computes on the CPU here" in error[0] and "--tiny" in error[0]
    assert not list(tmp_path.iterdir())


def test_the_fastest_choice_of_fast_ops_is_recorded_in_the_table(tmp_path):
    from alexnet_jax import ops
    from benchmarks import accelerator as bench

    rows = [
        {"dtype": "bfloat16", "per_device_batch": 256, "fast_ops": f, "images_per_sec": v}
        for f, v in (("auto", 900.0), ("lrn", 1000.0), ("pool", 800.0), ("none", 700.0))
    ]
    rows.append(
        {"dtype": "float32", "per_device_batch": 128, "fast_ops": "auto", "images_per_sec": 5.0}
    )
    choice = bench.fast_ops_choice(rows, "gpu")  # auto on a GPU: both fast, as the table says
    assert choice["images_per_sec"] == {"all": 900.0, "lrn": 1000.0, "pool": 800.0, "none": 700.0}
    assert choice["fastest"] == "lrn" and choice["fast"] == ["lrn"]
    assert bench.fast_ops_choice(rows[1:], "gpu") is None  # a choice not timed: none made
    table = tmp_path / "fast_ops.json"
    table.write_text(ops.FAST_OPS_TABLE.read_text())
    assert ops.read_fast_ops(table)["gpu"] == ("lrn", "pool")
    bench.record_fast_ops(choice, "gpu", "NVIDIA H100 80GB HBM3", table)
    recorded = ops.read_fast_ops(table)
    assert recorded["gpu"] == ("lrn",) and recorded["cpu"] == ops.AUTO_FAST["cpu"]
    assert "measured on NVIDIA H100 80GB HBM3" in json.loads(table.read_text())["gpu"]["evidence"]


@pytest.mark.slow  # prepares photographs, times both loaders, runs the loop
def test_the_accelerator_benchmark_measures_the_input_and_the_loop(tmp_path):
    from alexnet_jax import config_checks

    args = ["--parts=input,loop", "--tiny", "--per_device=2", "--loop_steps=2"]
    r = accelerator(tmp_path, *args, "--input_images=16")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "accelerator.json").read_text())
    assert result["devices"]["devices"] == 2 and result["devices"]["backend"] == "cpu"
    loaders = [i["loader"] for i in result["input"]]
    assert loaders == ["tf.data"] + (["dali"] if config_checks.dali_available() else [])
    assert all(i["images_per_sec"] > 0 and i["threads"] >= 1 for i in result["input"])
    assert result["loop"]["steps"] == 2 and 0 <= result["loop"]["data_wait_fraction"] <= 1
    assert "launch.py's loop" in (tmp_path / "accelerator.md").read_text()


def test_published_peaks_are_found_by_device_kind():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from benchmarks import accelerator

    assert accelerator.published_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert accelerator.published_peak("NVIDIA H200", "float32") == 67e12
    assert accelerator.published_peak("TPU v4", "bfloat16") == 275e12
    assert accelerator.published_peak("TPU v4", "float32") is None  # measured instead
    assert accelerator.published_peak("cpu", "bfloat16") is None
