"""Batch-invariant reductions: each row's result is the same bits whatever other rows share the array.

The service merges small requests into one engine call, and each request must get exactly the numbers it
gets alone. torch's CPU kernels break that for the statistics: a reduction over a [k, B] block vectorizes
across B, and an element-wise exp or log takes a vectorized path or a scalar one by its position in the
block, so an image's L_k, standard error and k̂ moved in the last bits with the batch around it (46% of
values in one measurement). Here every array holds one image per row ([batch, k], float64, numpy), sums are
a fixed pairwise tree along the last axis built from element-wise adds (exact per element, so the order of
additions does not depend on the array's shape, as numpy's own reductions do), and exp/log/log1p are
numpy's, which compute each element alike wherever it sits (tests/test_reductions.py checks both).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def as_rows(log_w: torch.Tensor) -> np.ndarray:
    """[k, batch] tensor (any float dtype, any device) -> [batch, k] C-contiguous float64 numpy array."""
    return np.ascontiguousarray(log_w.detach().to("cpu", torch.float64).numpy().T)


def as_tensor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A result row back to torch, float64, on the device of the input ``like``."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(like.device)


def tree_sum(a: np.ndarray) -> np.ndarray:
    """Σ over the last axis by pairwise halving: [..., n] -> [...] (0 for n = 0)."""
    n = a.shape[-1]
    if n == 0:
        return np.zeros(a.shape[:-1])
    if n == 1:
        return a[..., 0].copy()
    while n > 1:  # element i absorbs element i + n//2; an odd last element goes to element 0
        half = n >> 1
        s = a[..., :half] + a[..., half : 2 * half]
        if n & 1:
            s[..., 0] += a[..., n - 1]
        a, n = s, half
    return a[..., 0]


def row_mean(a: np.ndarray) -> np.ndarray:
    """Mean over the last axis: [..., n] -> [...]."""
    return tree_sum(a) / a.shape[-1]


def row_var(a: np.ndarray) -> np.ndarray:
    """Unbiased variance (n - 1) over the last axis, two-pass: [..., n] -> [...] (needs n >= 2)."""
    dev = a - row_mean(a)[..., None]
    return tree_sum(dev * dev) / (a.shape[-1] - 1)


def row_max(a: np.ndarray) -> np.ndarray:
    """The largest value over the last axis, -inf-safe shift for logsumexp: [..., n] -> [...] (0 if not finite)."""
    m = a.max(-1)
    return np.where(np.isfinite(m), m, 0.0)


def row_logsumexp(a: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis, shifted by the row's maximum: [..., n] -> [...]."""
    m = row_max(a)
    with np.errstate(divide="ignore"):  # a row of -inf: log 0 = -inf, the right answer
        return np.log(tree_sum(np.exp(a - m[..., None]))) + m


def row_log_mean_exp(a: np.ndarray) -> np.ndarray:
    """log (1/n) Σ exp over the last axis: [..., n] -> [...]."""
    return row_logsumexp(a) - math.log(a.shape[-1])
