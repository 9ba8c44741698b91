"""End to end through launch.py: errors, interruption and resumption, the demo, the notebook."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import CACHE, REPO, tiny_flags

from alexnet_jax import load_checkpoint, train


def launch(workdir, *overrides, config="configs/digits.py", devices=1, wait=True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        f"--config={REPO / config}",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={CACHE}",
        *overrides,
    ]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def run_notebook(name, workdir, figures=None):
    """Execute notebooks/`name` on `workdir` (figures to `figures`); the text it printed."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    env = {"ALEXNET_WORKDIR": str(workdir)}
    if figures is not None:
        env["ALEXNET_FIGURES"] = str(figures)
    os.environ.update(env)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        ).execute()
    finally:
        for k in env:
            del os.environ[k]
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_unknown_config_key_is_one_line(tmp_path):
    r = launch(tmp_path, "--config.optimizer.learnin_rate=0.1")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "launch.py: error: unknown config key 'optimizer.learnin_rate' in "
        f"{REPO / 'configs/digits.py'}; did you mean 'optimizer.learning_rate'?"
    )


def test_an_unknown_key_is_pointed_to_the_field_of_the_same_meaning(tmp_path):
    for key, field in (("total_steps", "num_train_steps"), ("optimizer.lr", "learning_rate")):
        r = launch(tmp_path, f"--config.{key}=20")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.strip().endswith(f"did you mean '{field}'?") or r.stderr.strip().endswith(
            f"did you mean 'optimizer.{field}'?"
        ), r.stderr


def test_a_bad_start_is_its_line_without_the_libraries_banners_or_the_config(tmp_path):
    r = launch(tmp_path / "w", "--config.optimizer.momentum=1.5")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == (
        "launch.py: error: optimizer.momentum=1.5 cannot train: it must lie in [0, 1)."
    )
    # The device line, then the error: no TensorFlow or JAX start-up notices, no config dump.
    assert len(lines) <= 2 and r.stdout == "", r.stderr
    assert not (tmp_path / "w").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    r = launch(tmp_path, config="configs/nope.py")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"launch.py: error: --config={REPO / 'configs/nope.py'}: no such file (the configs "
        f"are in {REPO / 'configs'})"
    )


def test_a_config_file_that_gives_no_config_is_one_line_naming_it(tmp_path):
    faults = {
        "nogetter.py": ("x = 1\n", "defines no get_config()"),
        "syntax.py": ("def get_config(:\n", "line 1: "),
        "raises.py": ("def get_config():\n    return 1 / 0\n", "get_config() raised Zero"),
        "number.py": ("def get_config():\n    return 1\n", "get_config() returned int, not an"),
    }
    for name, (text, message) in faults.items():
        (tmp_path / name).write_text(text)
        r = launch(tmp_path / "w", "--config.seed=1", config=str(tmp_path / name))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"launch.py: error: --config={tmp_path / name}" in r.stderr and message in r.stderr


def test_imagenet_not_prepared_is_a_clear_error(tmp_path):
    r = launch(
        tmp_path / "w", f"--config.input.data_dir={tmp_path / 'tfds'}", config="configs/alexnet.py"
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in r.stderr
    assert "python -m alexnet_jax.prepare_imagenet" in r.stderr


@pytest.mark.slow  # two launches; test_train.py's stop and resume runs in-process
def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    args = tiny_flags(
        num_train_steps=40, checkpoint_every_steps=5, log_every_steps=5, eval_every_steps=20
    )
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    proc = launch(broken, *args, wait=False)
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "5").exists():  # the first finished checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [m["step"] for m in metrics(broken) if "train/loss" in m]
    assert steps and steps[-1] < 40  # killed mid-run

    r = launch(broken, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from the checkpoint at step" in r.stderr
    assert launch(whole, *args).returncode == 0

    a, b = load_checkpoint(str(broken)), load_checkpoint(str(whole))
    assert a.step == b.step == 40
    # The resumed run saw exactly the batches and dropout masks of the uninterrupted one.
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert metrics(broken)[-1] == metrics(whole)[-1]
    # One line per logged step: the lines past the restored checkpoint were dropped.
    assert [m["step"] for m in metrics(broken)] == [m["step"] for m in metrics(whole)]


@pytest.mark.slow  # an end-to-end run
def test_notebook_restores_a_run(tmp_path):
    from conftest import tiny_config

    train.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path))
    text = run_notebook("restore_checkpoint.ipynb", tmp_path)
    assert "step 4," in text
    assert "top-5:" in text
    assert "held-out top-1 accuracy:" in text and "(360 digits)" in text


@pytest.mark.slow  # an end-to-end run
def test_the_kernels_notebook_draws_both_towers(trained_on_4x2, tmp_path):
    from PIL import Image

    _, workdir = trained_on_4x2
    figures = tmp_path / "new" / "figures"  # made by the notebook
    text = run_notebook("first_layer_kernels.ipynb", workdir, figures)
    assert "2 tower(s)" in text and "tower 1: colour score" in text and "tower 2:" in text
    figure = np.asarray(Image.open(figures / "first_layer_kernels.png"))
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.min() < figure.max()


@pytest.mark.slow  # trains its own run, then starts a kernel
def test_the_curves_notebook_plots_a_run(tmp_path):
    from conftest import tiny_config
    from PIL import Image

    workdir, figures = tmp_path / "run", tmp_path / "figures"
    figures.mkdir()
    train.train_and_evaluate(tiny_config(log_every_steps=2), str(workdir))
    text = run_notebook("training_curves.ipynb", workdir, figures)
    assert "4 train points, 2 eval points, last step 8" in text
    best = min(
        (m for m in metrics(workdir) if "eval/loss" in m), key=lambda m: m["eval/top1_error"]
    )
    assert f"step {best['step']}: top-1 error {best['eval/top1_error']:.4f}" in text
    figure = np.asarray(Image.open(figures / "training_curves.png").convert("RGB"))
    assert figure.shape[0] > 200 and figure.shape[1] > 600
    assert (figure.min(axis=2) < 128).mean() > 0.01  # lines and text, not a blank page


@pytest.mark.slow
def test_the_demo_reaches_the_accuracy_bar(tmp_path):
    """The README's demo command, unchanged: held-out top-1 error at most 5%."""
    start = time.time()
    r = launch(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [m for m in metrics(tmp_path) if "eval/top1_error" in m][-1]
    print(f"demo: {time.time() - start:.0f} s, held-out top-1 error {final['eval/top1_error']}")
    assert final["step"] == 250 and final["eval/count"] == 360
    assert final["eval/top1_error"] <= 0.05


@pytest.mark.slow
def test_the_demo_on_mesh_4x2_reaches_the_same_bar(tmp_path):
    """8 simulated devices, one tower per device: the same 5% bar as on one device."""
    r = launch(tmp_path, "--config.mesh.data=4", "--config.mesh.model=2", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh {'data': 4, 'model': 2} on 8 devices" in r.stderr
    final = [m for m in metrics(tmp_path) if "eval/top1_error" in m][-1]
    assert final["step"] == 250 and final["eval/count"] == 360
    assert final["eval/top1_error"] <= 0.05


@pytest.mark.slow  # two launches
def test_eval_mode_from_the_command_line(trained_on_4x2, tmp_path):
    import shutil

    _, trained = trained_on_4x2
    shutil.copytree(trained, tmp_path / "run")
    r = launch(tmp_path / "run", "--step=4", *tiny_flags())
    assert r.returncode == 2 and "--step selects the checkpoint of --mode=eval" in r.stderr
    r = launch(tmp_path / "run", "--mode=eval", "--step=4", *tiny_flags(), devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval_ten_crop step 4:" in r.stderr and "(360 images)" in r.stderr
    assert {"eval/top1_error", "eval_ten_crop/top5_error"} <= set(
        metrics(tmp_path / "run" / "eval_mode")[-1]
    )
    r = launch(tmp_path / "run", "--mode=eval", "--step=2", *tiny_flags())
    assert r.returncode == 2 and "No checkpoint at step 2" in r.stderr
    assert "Traceback" not in r.stderr


FAKE_GPU_HOST = """
import runpy, sys
from alexnet_jax import cluster

cluster.host_accelerators = lambda: {"gpu": "/dev/nvidia0"}  # what a GPU host's files show
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_a_gpu_host_running_jax_on_its_cpu_stops_before_compiling(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")
    }
    args = [
        "--config=configs/digits.py",
        f"--workdir={tmp_path / 'run'}",
        "--compilation_cache_dir=",
    ]
    run = lambda *more: subprocess.run(
        [sys.executable, "-c", FAKE_GPU_HOST, *args, *more],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    r = run()
    assert r.returncode == 2, r.stderr[-2000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("launch.py: error:")]
    assert len(error) == 1 and "NVIDIA GPU (/dev/nvidia0)" in error[0] and "[cuda12]" in error[0]
    assert "1 local cpu device(s) [0] (cpu), 1 in all" in r.stderr  # the first line says so
    assert not (tmp_path / "run").exists()
    # On purpose: past the check, to the config's own check of num_train_steps.
    r = run("--allow_cpu", "--config.num_train_steps=0")
    assert r.returncode == 2 and "num_train_steps=0" in r.stderr and "NVIDIA" not in r.stderr
