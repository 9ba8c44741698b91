"""Pictures of what a run learned, as plain uint8 images (no plotting library needed)."""

from __future__ import annotations

import math
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
