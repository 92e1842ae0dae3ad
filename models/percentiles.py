"""Percentiles of per-image L_k among a model's test set: log-likelihoods people can read.

A model card may hold quantiles of the per-image L_k over its test set, for one or more k:

    card["eval"]["test"]["quantiles"] = {"probs": [0.0, 0.01, ..., 1.0],
                                          "by_k": {"50": [101 ascending floats], "5000": [...]}}

`test_quantiles` computes such a row from per-image bounds; `LoglikQuantiles.percentile` places new bounds
among them. L_k is biased low by an amount that shrinks with k, so a bound is only compared with test bounds
of a similar k: the stored k nearest on a log scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# 0.00, 0.01, ..., 1.00: the minimum, every percentile, the maximum.
STANDARD_PROBS: tuple[float, ...] = tuple(i / 100 for i in range(101))


def test_quantiles(per_image_loglik: torch.Tensor, probs: Sequence[float] = STANDARD_PROBS) -> list[float]:
    """Quantiles of per-image L_k at ``probs`` (linear interpolation between order statistics, in float64).

    per_image_loglik: [n_images] -> list of len(probs) floats, ascending (the card's ``by_k[str(k)]`` row).
    """
    x = per_image_loglik.detach().reshape(-1).to("cpu", torch.float64)
    if x.numel() == 0:
        raise ValueError("no per-image values to take quantiles of")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("per-image L_k values must be finite")
    p = torch.tensor(list(probs), dtype=torch.float64)
    if p.numel() < 2 or not bool((p[1:] > p[:-1]).all()) or p[0] < 0 or p[-1] > 1:
        raise ValueError("probs must be increasing values in [0, 1], at least two")
    # np.quantile: torch.quantile refuses inputs of more than 2^24 values.
    return np.quantile(x.numpy(), p.numpy()).tolist()


test_quantiles.__test__ = False  # type: ignore[attr-defined]  # a library function, not a pytest test


@dataclass(frozen=True)
class LoglikQuantiles:
    """Test-set quantiles of per-image L_k: ``probs`` [m] ascending in [0, 1]; ``by_k[k]`` [m] ascending."""

    probs: np.ndarray
    by_k: dict[int, np.ndarray]
    _tables: dict[int, tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The interpolation table of each stored k, built once here: np.unique on every request cost the event
        # loop more than the interpolation itself.
        object.__setattr__(self, "_tables", {k: _interp_table(q, self.probs) for k, q in self.by_k.items()})

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> LoglikQuantiles | None:
        """The card's ``eval.test.quantiles``, validated; None when absent. ValueError names what is malformed."""
        entry = card.get("eval", {}).get("test", {}) if isinstance(card.get("eval"), Mapping) else {}
        raw = entry.get("quantiles") if isinstance(entry, Mapping) else None
        if raw is None:
            return None
        if not isinstance(raw, Mapping) or "probs" not in raw or "by_k" not in raw:
            raise ValueError('quantiles must be an object {"probs": [...], "by_k": {"<k>": [...]}}')
        probs = _float_row(raw["probs"], "probs")
        if probs.size < 2 or probs[0] < 0 or probs[-1] > 1 or not (np.diff(probs) > 0).all():
            raise ValueError("quantiles.probs must be at least two increasing values in [0, 1]")
        if not isinstance(raw["by_k"], Mapping) or not raw["by_k"]:
            raise ValueError("quantiles.by_k must be a non-empty object keyed by k")
        by_k: dict[int, np.ndarray] = {}
        for key, row in raw["by_k"].items():
            if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
                raise ValueError(f"quantiles.by_k key {key!r} is not a positive integer k")
            values = _float_row(row, f"quantiles.by_k[{key!r}]")
            if values.size != probs.size or (np.diff(values) < 0).any():
                raise ValueError(f"quantiles.by_k[{key!r}] must hold {probs.size} ascending values (one per prob)")
            by_k[int(key)] = values
        return cls(probs, by_k)

    def nearest_k(self, k: int) -> int:
        """The stored k nearest to ``k`` on a log scale (ties go to the larger, less biased one)."""
        return min(self.by_k, key=lambda s: (round(abs(math.log(s / k)), 9), -s))

    def percentile(self, loglik: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """Percent of test images whose L_k is lower, 0..100, by linear interpolation between the stored
        quantiles (0 below the test minimum, 100 above its maximum), against the nearest stored k.

        loglik: [n] -> ([n] float64, the k used).
        """
        used = self.nearest_k(k)
        xs, ps = self._tables[used]
        values = np.asarray(loglik, dtype=np.float64)
        if xs.size == 1:
            out = np.where(values < xs[0], 0.0, np.where(values > xs[0], 1.0, ps[0]))
        else:
            out = np.interp(values, xs, ps, left=0.0, right=1.0)
        return np.clip(out * 100.0, 0.0, 100.0), used


def _float_row(row: Any, what: str) -> np.ndarray:
    if not isinstance(row, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in row
    ):
        raise ValueError(f"{what} must be a list of numbers")
    arr = np.asarray(row, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} must hold finite numbers")
    return arr


def _interp_table(q: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles [m] and their probs [m] -> (distinct quantiles, their probs) for np.interp. Equal quantiles
    (ties) would make the abscissa non-increasing: their probs are averaged."""
    xs, inverse = np.unique(q, return_inverse=True)
    return xs, np.bincount(inverse, weights=probs) / np.bincount(inverse)
