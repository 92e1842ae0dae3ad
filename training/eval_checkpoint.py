"""`iwae eval` as a function: L_k, ELBO and active units of a checkpoint on a data split, optionally stored in
its model card."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.device import resolve_device
from models.networks import IWAE
from models.noise import seeded_generator
from models.percentiles import STANDARD_PROBS, test_quantiles
from models.posterior import ACTIVE_UNIT_THRESHOLD, active_unit_variances, count_active
from training.checkpoints import load_checkpoint, update_card
from training.config import EvalConfig
from training.datasets import binarize, load_dataset
from training.evaluate import EvalResult, evaluate_dataset
from training.plots import plot_active_units
from training.provenance import hardware

SUBSET = 500
# The second k whose quantiles a card stores (the service's cheap scoring k).
QUANTILE_SMALL_K = 50


@dataclass
class EvalReport:
    """One evaluation: the bound over the split and the active units, with where and how it was computed."""

    result: EvalResult
    split: str
    binarization: str  # how the split's images were binarized
    seed: int
    epochs_at_eval: int | None  # the checkpoint's epochs when it was evaluated
    a_u: list[torch.Tensor] = field(repr=False)  # A_u per layer, [d_l] each
    active_units_images: int
    histogram: Path
    device: str
    hardware: str
    date: str
    active_units_threshold: float = ACTIVE_UNIT_THRESHOLD

    @property
    def active_units(self) -> list[int]:
        return count_active(self.a_u, self.active_units_threshold)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `iwae eval --json` (and, less the histogram path, of the card's ``eval.<split>``)."""
        d: dict[str, Any] = {
            **self.result.to_dict(),
            "split": self.split,
            "binarization": self.binarization,
            "seed": self.seed,
            "epochs_at_eval": self.epochs_at_eval,
            "active_units": self.active_units,
            "active_units_threshold": self.active_units_threshold,
            "active_units_images": self.active_units_images,
            "log10_A_u": [[round(float(v), 3) for v in a.double().clamp_min(1e-30).log10()] for a in self.a_u],
            "histogram": str(self.histogram),
            "device": self.device,
            "hardware": self.hardware,
            "date": self.date,
        }
        if self.result.n_images > SUBSET:
            # Lets a later, cheaper check re-evaluate just these images and compare like with like.
            head = self.result.per_image[:SUBSET]
            d[f"first_{SUBSET}"] = {"loglik": float(head.mean()), "loglik_stderr": float(head.std() / SUBSET**0.5)}
        return d


def split_images(
    card: dict[str, Any], split: str, seed: int, data_root: Path | None, first: int | None = None
) -> tuple[torch.Tensor, str]:
    """The split's images, binarized once with ``seed`` for dynamically binarized data sets; with ``first``, its
    first images only, cut after binarizing so that an image gets the same pixels whatever ``first`` is."""
    data = load_dataset(card["dataset"], data_root)
    x = getattr(data, split)
    if data.binarization == "dynamic":
        x, how = binarize(x, torch.Generator().manual_seed(seed)), f"stochastic, sampled once with seed {seed}"
    else:
        how = "fixed"
    return (x[:first] if first else x), how


def _evaluate_on_ray(model: IWAE, x: torch.Tensor, cfg: EvalConfig, device: torch.device) -> EvalResult:
    """The same numbers as the local evaluation, from shards run as Ray tasks (training.distributed)."""
    from training.distributed import cluster_cpus, connect, evaluate_sharded

    connect(cfg.ray)
    return evaluate_sharded(
        model, x, cfg.k, cfg.shards or cluster_cpus(), seed=cfg.seed, memory_bytes=cfg.memory_mb * 2**20,
        device=device.type, cpus_per_shard=1, gpus_per_shard=1 if device.type == "cuda" else 0,
    )  # fmt: skip


def _quantiles(model: IWAE, x: torch.Tensor, cfg: EvalConfig, res: EvalResult) -> dict[str, Any]:
    """The card's quantiles of per-image L_k on the split (models/percentiles.py): at cfg.k and at k=50, so that
    the service compares a request with the stored k nearest to its own (L_k is biased low for small k)."""
    by_k = {str(cfg.k): test_quantiles(res.per_image)}
    if cfg.k != QUANTILE_SMALL_K:
        small = evaluate_dataset(model, x, QUANTILE_SMALL_K, seed=cfg.seed, memory_bytes=cfg.memory_mb * 2**20)
        by_k[str(QUANTILE_SMALL_K)] = test_quantiles(small.per_image)
    return {"probs": list(STANDARD_PROBS), "by_k": by_k}


def evaluate_checkpoint(cfg: EvalConfig) -> EvalReport:
    """Evaluate ``cfg.ckpt``, draw its log A_u histogram, and (with ``update_card``) store the report in its card."""
    device = resolve_device(cfg.device)
    model, card, _ = load_checkpoint(cfg.ckpt)
    model.to(device)
    x, binarization = split_images(card, cfg.split, cfg.seed, cfg.data_root, cfg.max_images)
    memory_bytes = cfg.memory_mb * 2**20
    if cfg.ray:
        res = _evaluate_on_ray(model, x, cfg, device)
    else:
        res = evaluate_dataset(model, x, cfg.k, seed=cfg.seed, memory_bytes=memory_bytes, progress=cfg.progress)
    au_x, _ = split_images(card, "train", cfg.seed, cfg.data_root)
    au_x = au_x[torch.randperm(au_x.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.au_images]]
    a_u = active_unit_variances(model, au_x.to(device, torch.float32), generator=seeded_generator(device, cfg.seed))
    plot_active_units({card.get("name", cfg.ckpt.stem): a_u}, cfg.histogram_path)
    report = EvalReport(
        result=res,
        split=cfg.split,
        binarization=binarization,
        seed=cfg.seed,
        epochs_at_eval=card.get("epochs"),
        a_u=a_u,
        active_units_images=int(au_x.shape[0]),
        histogram=cfg.histogram_path,
        device=str(device),
        hardware=hardware(device),
        date=time.strftime("%Y-%m-%d"),
    )
    if cfg.update_card:
        evals = dict(card.get("eval") or {})
        evals[cfg.split] = {k: v for k, v in report.to_dict().items() if k != "histogram"}
        if cfg.quantiles:
            evals[cfg.split]["quantiles"] = _quantiles(model, x, cfg, res)
        update_card(cfg.ckpt, {"eval": evals})
    return report
