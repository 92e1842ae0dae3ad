"""Images on a grid: the layout shared by the training figures and the service's PNG samples."""

from __future__ import annotations

import math

import numpy as np


def tile(images: np.ndarray, cols: int | None = None, gap: int = 2, fill: float = 0.0) -> np.ndarray:
    """images: [n, h, w] -> canvas [rows * (h + gap) + gap, cols * (w + gap) + gap].

    Row-major cells separated and framed by ``gap`` pixels of ``fill``; ``cols`` defaults to a near-square
    grid, and cells past n stay ``fill``.
    """
    n, h, w = images.shape
    cols = cols if cols is not None else max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap), fill, dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        canvas[y : y + h, x : x + w] = images[i]
    return canvas


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    """Intensities in [0, 1] (clipped) -> grey levels 0..255, rounded."""
    return np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)
