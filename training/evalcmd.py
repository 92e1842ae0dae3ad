"""`iwae eval`: L_k, ELBO and active units of a checkpoint on a data split, optionally stored in its card."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import finite_or_none
from models.networks import IWAE
from training.checkpoints import load_checkpoint, update_card
from training.datasets import binarize, load_dataset
from training.evaluate import ACTIVE_UNIT_THRESHOLD, EvalResult, active_unit_stats, count_active, evaluate_dataset
from training.plots import plot_active_units
from training.train import hardware, resolve_device

SUBSET = 500


def split_images(card: dict[str, Any], split: str, seed: int, data_root: Path | None) -> tuple[torch.Tensor, str]:
    """The split's images, binarized once with ``seed`` for dynamically binarized data sets."""
    data = load_dataset(card["dataset"], data_root)
    x = getattr(data, split)
    if data.binarization == "dynamic":
        return binarize(x, torch.Generator().manual_seed(seed)), f"stochastic, sampled once with seed {seed}"
    return x, "fixed"


def _evaluate_on_ray(model: IWAE, x: torch.Tensor, a: argparse.Namespace, device: torch.device) -> EvalResult:
    """The same numbers as the local evaluation, from shards run as Ray tasks (training.distributed)."""
    from training.distributed import cluster_cpus, connect, evaluate_sharded

    connect(a.ray)
    return evaluate_sharded(
        model, x, a.k, a.shards or cluster_cpus(), seed=a.seed, memory_bytes=a.memory_mb * 2**20,
        device=device.type, cpus_per_shard=a.threads or 1, gpus_per_shard=1 if device.type == "cuda" else 0,
    )  # fmt: skip


def run_eval(a: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(a.device)
    model, card, _ = load_checkpoint(a.ckpt)
    model.to(device)
    x, binarization = split_images(card, a.split, a.seed, a.data_dir)
    if a.max_images:
        x = x[: a.max_images]
    if getattr(a, "ray", None):
        res = _evaluate_on_ray(model, x, a, device)
    else:
        res = evaluate_dataset(model, x, a.k, seed=a.seed, memory_bytes=a.memory_mb * 2**20, progress=not a.no_progress)
    au_x, _ = split_images(card, "train", a.seed, a.data_dir)
    au_x = au_x[torch.randperm(au_x.shape[0], generator=torch.Generator().manual_seed(a.seed))[: a.au_images]]
    a_u = active_unit_stats(model, au_x, seed=a.seed)
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
