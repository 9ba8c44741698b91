"""figures.py: the first-layer kernels by tower (the paper's Figure 3) and the training curves."""

import numpy as np
import pytest

from alexnet_jax.figures import kernel_grid, training_curves


def test_the_kernel_grid_puts_each_tower_in_its_own_block():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(11, 11, 3, 8)).astype(np.float32)
    kernel[..., 4:] = np.abs(kernel[..., 4:])  # tower 2's kernels differ from tower 1's
    kernel[:, :, 1:, 4:] = 0.0  # and are red only
    grid = kernel_grid({"conv1": {"kernel": kernel}}, towers=2, scale=2)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    top, bottom = grid[: grid.shape[0] // 2], grid[grid.shape[0] // 2 :]
    # Tower 1's block holds colour in every channel; tower 2's only red, its G and B at 0
    # wherever a kernel is drawn (white ground elsewhere).
    drawn = bottom[..., 0] < 255
    assert drawn.any() and np.all(bottom[..., 1][drawn] == 0)
    assert (top[..., 1] < 255).any() and (top[..., 1] > 0).any()
    # Each kernel is stretched to the full range on its own.
    assert grid.min() == 0 and grid[grid < 255].max() > 200


def test_the_training_curves_draw_train_and_eval_lines():
    pytest.importorskip("matplotlib", reason='needs matplotlib: pip install -e ".[notebooks]"')
    lines = [
        {"step": 1, "train/loss": 2.0, "train/top1_error": 0.9, "train/learning_rate": 0.01},
        {"step": 2, "train/loss": 1.5, "train/top1_error": 0.7, "train/learning_rate": 0.01},
        {"step": 2, "eval/loss": 1.6, "eval/top1_error": 0.75, "eval/top5_error": 0.3},
    ]
    figure = training_curves(lines, title="run")
    loss, error, rate = figure.get_axes()
    drawn = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for ax in (loss, error, rate)
        for line in ax.get_lines()
    }
    assert drawn == {
        "train/loss": ([1, 2], [2.0, 1.5]),
        "eval/loss": ([2], [1.6]),
        "train/top1_error": ([1, 2], [0.9, 0.7]),
        "eval/top1_error": ([2], [0.75]),
        "eval/top5_error": ([2], [0.3]),
        "train/learning_rate": ([1, 2], [0.01, 0.01]),
    }
    assert rate.get_yscale() == "log" and figure.get_suptitle() == "run"
