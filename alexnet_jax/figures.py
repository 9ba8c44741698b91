"""Pictures of a run: the first-layer kernels as a plain uint8 image, and the training curves
(with matplotlib, from the [notebooks] extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def kernel_grid(params: Any, towers: int, scale: int = 4, gap: int = 1) -> np.ndarray:
    """The first-layer kernels as one RGB image, the paper's Figure 3: each tower's kernels in
    a block of their own (tower 1 above tower 2), each kernel contrast-stretched on its own
    and enlarged `scale` times, on a white ground."""
    kernel = np.asarray(params["conv1"]["kernel"], np.float32)  # (kh, kw, 3, out), towers last
    kh, kw, _, out = kernel.shape
    per_tower = out // towers
    cols = math.ceil(math.sqrt(per_tower * 2))  # a wide block, as the paper laid them out
    rows = math.ceil(per_tower / cols)
    cell_h, cell_w = kh * scale + gap, kw * scale + gap
    block_h = rows * cell_h
    image = np.full((towers * (block_h + 2 * gap) - 2 * gap, cols * cell_w, 3), 255, np.uint8)
    for k in range(out):
        t, i = divmod(k, per_tower)
        w = kernel[..., k]
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
        tile = np.kron((255 * w).round().astype(np.uint8), np.ones((scale, scale, 1), np.uint8))
        y = t * (block_h + 2 * gap) + (i // cols) * cell_h
        x = (i % cols) * cell_w
        image[y : y + kh * scale, x : x + kw * scale] = tile
    return image


def training_curves(lines: Sequence[dict], title: str = "") -> Any:
    """Loss, top-1 error and learning rate against the step, train and eval, from the lines of
    a metrics.jsonl (metrics.read_metrics): a matplotlib Figure, drawn without pyplot."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            'training_curves needs matplotlib: pip install -e ".[notebooks]"'
        ) from None

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(m["step"], m[key]) for m in lines if key in m]
        return [s for s, _ in points], [v for _, v in points]

    fig = Figure(figsize=(13, 3.6), layout="constrained")
    loss, error, rate = fig.subplots(1, 3)
    for ax, keys, name in (
        (loss, ("train/loss", "eval/loss"), "loss"),
        (error, ("train/top1_error", "eval/top1_error", "eval/top5_error"), "error"),
        (rate, ("train/learning_rate",), "learning rate"),
    ):
        for key in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker="o" if key.startswith("eval") else None, ms=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if series("train/learning_rate")[1] and min(series("train/learning_rate")[1]) > 0:
        rate.set_yscale("log")
    if title:
        fig.suptitle(title)
    return fig
