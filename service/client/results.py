"""What the client returns: NumPy arrays per image, parsed from the service's JSON bodies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class LoglikResult:
    model: str
    k: int
    seed: int
    loglik: np.ndarray
    stderr: np.ndarray  # NaN where undefined (k = 1)
    ess: np.ndarray
    elbo: np.ndarray
    bits_per_dim: np.ndarray
    pareto_k: np.ndarray  # PSIS k̂ of each image's weights; NaN where undefined (k < 21)
    reliable: np.ndarray  # bool: pareto_k <= 0.7 (the estimate and its stderr can be trusted)
    k_used: np.ndarray  # int: samples behind each estimate (< k where target_stderr was met earlier)
    # Percent of the model's test images with a lower L_k (at percentile_k); None when the card has no quantiles.
    percentile: np.ndarray | None = None
    percentile_k: int | None = None


@dataclass
class LayerEncoding:
    layer: int
    mean: np.ndarray  # [N, d]
    std: np.ndarray  # [N, d]
    samples: np.ndarray | None  # [N, m, d]
    exact: bool


@dataclass
class EncodeResult:
    model: str
    seed: int
    layers: list[LayerEncoding]


@dataclass
class SampleResult:
    model: str
    seed: int
    probs: np.ndarray  # [n, x_dim]
    binary: np.ndarray  # [n, x_dim], uint8
    image_shape: tuple[int, int] | None

    def images(self) -> np.ndarray:
        """The probabilities reshaped to [n, H, W] (when the model has an image shape)."""
        if self.image_shape is None:
            raise ValueError("this model's samples have no image shape")
        return self.probs.reshape(-1, *self.image_shape)


@dataclass
class ActiveUnitsResult:
    model: str
    seed: int
    threshold: float
    variances: list[np.ndarray]  # A_u per layer
    active: list[int]  # count per layer

    @property
    def total(self) -> int:
        return sum(self.active)


def loglik_result(body: dict[str, Any]) -> LoglikResult:
    rows = body["results"]

    def col(name: str) -> np.ndarray:
        return np.array([np.nan if r.get(name) is None else r[name] for r in rows], dtype=np.float64)

    return LoglikResult(
        body["model"],
        body["k"],
        body["seed"],
        col("loglik"),
        col("stderr"),
        col("ess"),
        col("elbo"),
        col("bits_per_dim"),
        col("pareto_k"),
        np.array([bool(r.get("reliable", False)) for r in rows]),
        np.array([int(r.get("k_used", body["k"])) for r in rows], dtype=np.int64),
        col("percentile") if body.get("percentile_k") is not None else None,
        body.get("percentile_k"),
    )


def encode_result(body: dict[str, Any]) -> EncodeResult:
    layers = [
        LayerEncoding(
            layer=lay["layer"],
            mean=np.asarray(lay["mean"], dtype=np.float64),
            std=np.asarray(lay["std"], dtype=np.float64),
            samples=None if lay.get("samples") is None else np.asarray(lay["samples"], dtype=np.float64),
            exact=bool(lay["exact"]),
        )
        for lay in body["layers"]
    ]
    return EncodeResult(body["model"], body["seed"], layers)


def sample_result(body: dict[str, Any]) -> SampleResult:
    shape = body.get("image_shape")
    return SampleResult(
        body["model"],
        body["seed"],
        np.asarray(body["probs"], dtype=np.float64),
        np.asarray(body["binary"], dtype=np.uint8),
        (int(shape[0]), int(shape[1])) if shape else None,
    )


def active_units_result(body: dict[str, Any]) -> ActiveUnitsResult:
    return ActiveUnitsResult(
        body["model"],
        body["seed"],
        body["threshold"],
        [np.asarray(lay["variances"], dtype=np.float64) for lay in body["layers"]],
        [int(lay["active"]) for lay in body["layers"]],
    )
