"""/loglik results: the per-image statistics, their JSON rows, and L_k to a requested precision.

``target_stderr``: the loop itself is models/uncertainty.py's ``log_weights_to_target``; this module feeds it
the engine's log weights and the request's noise. One CPU generator seeded with the request's seed draws
every chunk's noise for every image, in order, so the answer depends only on (images, k, seed, target), and
an image's samples never depend on when the other images of the request stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from models.engine import BoundStats, bound_stats, engine_log_weights
from models.uncertainty import log_weights_to_target
from service.inputs import bits_per_dim


@dataclass
class LoglikStats:
    """Per-image results of one request (arrays of length n_images; float64 unless noted)."""

    loglik: np.ndarray
    stderr: np.ndarray  # calibrated Monte Carlo standard error (models/uncertainty.py)
    ess: np.ndarray
    elbo: np.ndarray
    pareto_k: np.ndarray  # PSIS k̂; +inf when k is too small to fit a tail
    reliable: np.ndarray  # bool: pareto_k <= 0.7
    k_used: np.ndarray  # int64: samples behind each estimate

    def rows(self, start: int, stop: int) -> LoglikStats:
        """The results of images start..stop-1."""
        return LoglikStats(**{f.name: getattr(self, f.name)[start:stop].copy() for f in fields(self)})


def loglik_stats(stats: BoundStats, k_used: torch.Tensor) -> LoglikStats:
    """BoundStats (any device and dtype) and the k of each image -> LoglikStats on the CPU."""

    def col(t: torch.Tensor) -> np.ndarray:
        return t.to("cpu", torch.float64).numpy().copy()

    return LoglikStats(
        loglik=col(stats.loglik),
        stderr=col(stats.stderr),
        ess=col(stats.ess),
        elbo=col(stats.elbo),
        pareto_k=col(stats.pareto_k),
        reliable=stats.reliable.cpu().numpy().copy(),
        k_used=k_used.cpu().numpy().astype(np.int64),
    )


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def json_rows(stats: LoglikStats, x_dim: int) -> list[dict[str, Any]]:
    """One JSON object per image (non-finite numbers become null)."""
    return [
        {
            "loglik": float(stats.loglik[i]),
            "stderr": _finite(float(stats.stderr[i])),
            "ess": float(stats.ess[i]),
            "elbo": float(stats.elbo[i]),
            "bits_per_dim": bits_per_dim(float(stats.loglik[i]), x_dim),
            "pareto_k": _finite(float(stats.pareto_k[i])),
            "reliable": bool(stats.reliable[i]),
            "k_used": int(stats.k_used[i]),
        }
        for i in range(len(stats.loglik))
    ]


def loglik_to_target(
    model: torch.nn.Module, device: torch.device, x: torch.Tensor, k_max: int, seed: int, target: float, chunk_rows: int
) -> LoglikStats:
    """Per image of x [n, D]: L_k and its statistics at the total of the schedule (100, 200, 400, ..., ``k_max``)
    one chunk after its calibrated standard error first fell to ``target`` nats or below (if it still is
    there), or at ``k_max`` (see ``log_weights_to_target``)."""
    n = int(x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    x_dev = x.to(device)

    def draw(size: int, images: torch.Tensor) -> torch.Tensor:
        noise = model.draw_noise(size, n, generator=gen)  # type: ignore[operator]  # every image, every time
        eps = [e[:, images].contiguous().to(device) for e in noise]
        return engine_log_weights(model, x_dev[images.to(device)], eps, chunk_rows=chunk_rows)  # type: ignore[arg-type]

    result = log_weights_to_target(draw, n, k_max, target)
    parts: list[tuple[list[int], LoglikStats]] = []
    for k in sorted(set(result.k_used.tolist())):  # images that stopped together share k: one call per group
        idx = [i for i in range(n) if int(result.k_used[i]) == k]
        log_w = torch.stack([result.log_w[i] for i in idx], 1)
        parts.append((idx, loglik_stats(bound_stats(log_w), result.k_used[idx])))
    merged = {}
    for f in fields(LoglikStats):
        first = getattr(parts[0][1], f.name)
        merged[f.name] = np.empty(n, dtype=first.dtype)
        for idx, part in parts:
            merged[f.name][idx] = getattr(part, f.name)
    return LoglikStats(**merged)
