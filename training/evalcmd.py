"""`iwae eval`: L_k, ELBO and active units of a checkpoint on a data split, optionally stored in its card."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import finite_or_none
from models.device import resolve_device
from models.noise import seeded_generator
from models.posterior import ACTIVE_UNIT_THRESHOLD, active_unit_variances, count_active
from training.checkpoints import load_checkpoint, update_card
from training.datasets import binarize, load_dataset
from training.evaluate import evaluate_dataset
from training.plots import plot_active_units
from training.train import hardware

SUBSET = 500


def split_images(card: dict[str, Any], split: str, seed: int, data_root: Path | None) -> tuple[torch.Tensor, str]:
    """The split's images, binarized once with ``seed`` for dynamically binarized data sets."""
    data = load_dataset(card["dataset"], data_root)
    x = getattr(data, split)
    if data.binarization == "dynamic":
        return binarize(x, torch.Generator().manual_seed(seed)), f"stochastic, sampled once with seed {seed}"
    return x, "fixed"


def run_eval(a: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(a.device)
    model, card, _ = load_checkpoint(a.ckpt)
    model.to(device)
    x, binarization = split_images(card, a.split, a.seed, a.data_dir)
    if a.max_images:
        x = x[: a.max_images]
    res = evaluate_dataset(model, x, a.k, seed=a.seed, memory_bytes=a.memory_mb * 2**20, progress=not a.no_progress)
    au_x, _ = split_images(card, "train", a.seed, a.data_dir)
    au_x = au_x[torch.randperm(au_x.shape[0], generator=torch.Generator().manual_seed(a.seed))[: a.au_images]]
    a_u = active_unit_variances(model, au_x.to(device, torch.float32), generator=seeded_generator(device, a.seed))
    hist = a.histogram or a.ckpt.with_name(a.ckpt.name.removesuffix(".safetensors") + ".active-units.png")
    plot_active_units({card.get("name", a.ckpt.stem): a_u}, hist)
    result: dict[str, Any] = {
        **res.to_dict(),
        "split": a.split,
        "binarization": binarization,
        "seed": a.seed,
        "epochs_at_eval": card.get("epochs"),
        "active_units": count_active(a_u),
        "active_units_threshold": ACTIVE_UNIT_THRESHOLD,
        "active_units_images": int(au_x.shape[0]),
        "log10_A_u": [[round(float(v), 3) for v in a.double().clamp_min(1e-30).log10()] for a in a_u],
        "histogram": str(hist),
        "device": str(device),
        "hardware": hardware(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    result["loglik_stderr"] = finite_or_none(result["loglik_stderr"])
    if res.n_images > SUBSET:
        # Lets a later, cheaper check re-evaluate just these images and compare like with like.
        head = res.per_image[:SUBSET]
        result[f"first_{SUBSET}"] = {"loglik": float(head.mean()), "loglik_stderr": float(head.std() / SUBSET**0.5)}
    if a.update_card:
        evals = dict(card.get("eval") or {})
        evals[a.split] = {k: v for k, v in result.items() if k != "histogram"}
        update_card(a.ckpt, {"eval": evals})
    return result
