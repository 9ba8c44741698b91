"""Figure 1's command: ReLU against tanh in a four-layer CNN, curves over epochs and seeds."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from alexnet_jax import figure1


def test_epochs_to_a_target_count_from_one():
    assert figure1.epochs_to([0.5, 0.3, 0.2, 0.1], 0.25) == 3
    assert figure1.epochs_to([0.5, 0.3], 0.25) is None


def test_each_nonlinearity_gets_its_fastest_rate_and_the_ratio_follows(monkeypatch):
    # Planted curves: ReLU reaches 10% in 2 epochs at rate 0.1, tanh in 6 at rate 0.01.
    def curve(images, labels, classes, activation, rate, epochs, seed):
        best = {"relu": (0.1, 2), "tanh": (0.01, 6)}[activation]
        reach = best[1] if rate == best[0] else best[1] + 3
        return [0.5 if e + 1 < reach else 0.05 for e in range(epochs)]

    monkeypatch.setattr(figure1, "train_curve", curve)
    result = figure1.figure1(None, None, 10, 0.1, 12, 2, [0.01, 0.1])
    relu, tanh = result["activations"]["relu"], result["activations"]["tanh"]
    assert (relu["rate"], tanh["rate"]) == (0.1, 0.01)
    assert relu["epochs_to_target"] == [2, 2] and tanh["epochs_to_target"] == [6, 6]
    assert result["tanh_over_relu"] == 3.0


def test_the_two_nets_train_differently_from_the_same_start():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(128, 16, 16, 1)).astype(np.float32)
    labels = (images.mean((1, 2, 3)) > 0).astype(np.int32)
    relu = figure1.train_curve(images, labels, 2, "relu", 0.05, 3, seed=0)
    tanh = figure1.train_curve(images, labels, 2, "tanh", 0.05, 3, seed=0)
    assert len(relu) == len(tanh) == 3 and relu != tanh
    assert all(0 <= e <= 1 for e in relu + tanh)


@pytest.mark.slow  # a few short trainings of a small CNN
def test_the_command_draws_figure_1_on_the_digits(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.figure1", f"--out={tmp_path}", "--epochs=2",
         "--seeds=2", "--size=16", "--rates=0.03", "--target=0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "figure1.json").read_text())
    assert result["dataset"] == "digits" and result["target"] == 0.5
    for activation in ("relu", "tanh"):
        curves = result["activations"][activation]["curves"]
        assert len(curves) == 2 and all(len(c) == 2 for c in curves)
        assert curves[0] != curves[1]  # the seeds differ
    assert (tmp_path / "figure1.png").stat().st_size > 0
    assert "epochs to 50% training error" in r.stdout


def test_a_tfds_dataset_is_loaded_whole_at_the_size_asked():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        images, labels, classes = figure1.load("tfds:cifar10", None, 16)
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.float32
    assert -1.0 <= images.min() < images.max() <= 1.0
    assert classes == 10 and labels.shape == (12,) and labels.max() < 10


def test_without_matplotlib_the_figure_is_left_out(tmp_path, monkeypatch):
    result = {"target": 0.5, "activations": {a: {"curves": [[0.6, 0.4]]} for a in ("relu", "tanh")}}
    assert figure1.plot(result, tmp_path / "a.png") and (tmp_path / "a.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert not figure1.plot(result, tmp_path / "b.png") and not (tmp_path / "b.png").exists()
