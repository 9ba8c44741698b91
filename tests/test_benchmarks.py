"""benchmarks/train_step.py on a tiny config: the JSON it prints, with numbers that hang
together."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow  # compiles and times the real step in a subprocess
@pytest.mark.parametrize("mesh", [(1, 1), (4, 2)])
def test_the_train_step_benchmark_prints_its_json(mesh):
    data, model = mesh
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/train_step.py"),
            f"--config={REPO / 'configs/digits.py'}",
            "--config.model.width=0.125",
            "--config.input.image_size=67",
            "--config.input.resize_size=72",
            "--config.batch_size=16",
            f"--config.mesh.data={data}",
            f"--config.mesh.model={model}",
            "--steps=3",
            "--warmup=1",
            "--peak_flops=1e12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": data, "model": model} and out["batch_size"] == 16
    assert out["images_per_sec_min"] <= out["images_per_sec"] <= out["images_per_sec_max"]
    assert out["images_per_sec"] == pytest.approx(16 / out["step_seconds"], rel=0.5)
    # Paper structure at 1/8 width on 67x67 inputs: 3 x 2 x the forward multiply-adds.
    assert 1e8 < out["flops_per_step_analytic"] < 1e9 and out["flops_per_step_xla"] > 0
    assert out["mfu"] == pytest.approx(out["flops_per_sec_analytic"] / 1e12)
    assert out["peak_from"] == "--peak_flops" and out["compile_seconds"] > 0
    mem = out["memory_bytes_per_device"]
    assert mem["peak"] == mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
