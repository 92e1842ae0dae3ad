"""Figures: training curves from a JSONL log and the histogram of log A_u."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from models.grid import tile, to_uint8
from models.posterior import ACTIVE_UNIT_THRESHOLD
from training.files import atomic_write_bytes


def read_log(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training log")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line: {e}") from e
    if not records:
        raise ValueError(f"{path}: the log is empty")
    return records


def plot_training_curves(logs: dict[str, list[dict[str, float]]], out: Path) -> None:
    """One line per run for the training bound and the validation L_k, against epochs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in logs.items():
        epochs = [r["epoch"] for r in records]
        axes[0].plot(epochs, [r["train_bound"] for r in records], label=label)
        val_key = next((k for k in records[0] if k.startswith("valid_L")), None)
        if val_key:
            axes[1].plot(epochs, [r[val_key] for r in records], label=f"{label} ({val_key})")
    axes[0].set(title="training objective (nats)", xlabel="epoch")
    axes[1].set(title="validation L_k (nats)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_active_units(a_u: dict[str, list[torch.Tensor]], out: Path, threshold: float = ACTIVE_UNIT_THRESHOLD) -> None:
    """Histogram of log10 A_u over all units, one series per model, with the threshold marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {label: torch.cat([a.double() for a in layers]).clamp_min(1e-12).log10() for label, layers in a_u.items()}
    low = min(min(float(v.min()) for v in series.values()), math.log10(threshold)) - 0.5
    high = max(max(float(v.max()) for v in series.values()), 0.0) + 0.5
    for label, values in series.items():
        ax.hist(values.numpy(), bins=40, range=(low, high), alpha=0.55, label=label)
    ax.axvline(math.log10(threshold), color="k", linestyle="--", label=f"A_u = {threshold:g}")
    ax.set(xlabel="log10 A_u", ylabel="units", title="Active units: histogram of log A_u")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def grid_png(images: np.ndarray, cols: int, gap: int = 2, fill: float = 0.0) -> bytes:
    """[n, h, w] intensities in [0, 1] -> PNG bytes of the images on a grid of ``cols`` columns
    (layout: models.grid.tile)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(tile(images, cols, gap, fill)), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def save_image_grid(probs: torch.Tensor, out: Path, side: int = 28, cols: int = 8) -> None:
    """Write pixel probabilities [n, side*side] as a grayscale PNG grid (white strokes on black)."""
    images = probs.detach().cpu().float().reshape(-1, side, side).numpy()
    atomic_write_bytes(out, grid_png(images, cols))
