"""`iwae compare`: two checkpoints on the same images with the same noise, and their difference with a paired
standard error.

Each model's test L_5000 carries a standard error over images of about 0.23 nats on MNIST, but most of it is
which images are hard, and that is shared: the two models' per-image values move together. The standard error
of the mean per-image difference leaves that out, so it says whether a 0.1–0.6 nat gap between two zoo models is
real; two independent errors of 0.23 would not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.checkpoint import finite_or_none
from models.device import resolve_device
from training.checkpoints import load_checkpoint
from training.config import CompareConfig
from training.eval_checkpoint import split_images
from training.evaluate import EvalResult, evaluate_dataset


@dataclass
class Comparison:
    a: EvalResult
    b: EvalResult
    binarization: str

    def to_dict(self) -> dict[str, object]:
        """The JSON of `iwae compare --json`: ``difference`` is the mean over images of L_k(B) − L_k(A) (nats;
        positive: B gives the data more probability); a standard error of one image is null (JSON has no NaN)."""
        difference, stderr = paired_difference(self.a.per_image, self.b.per_image)
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "difference": difference,
            "difference_stderr": finite_or_none(stderr),
            "unpaired_stderr": finite_or_none(math.hypot(self.a.loglik_stderr, self.b.loglik_stderr)),
            "b_better_fraction": float((self.b.per_image > self.a.per_image).double().mean()),
            "binarization": self.binarization,
        }


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``b - a`` and its standard error over images. a, b: [N] per-image L_k of the same images."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"need two [N] tensors of the same images, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = b.double() - a.double()
    n = d.numel()
    return float(d.mean()), float(d.std() / math.sqrt(n)) if n > 1 else float("nan")


def compare_checkpoints(cfg: CompareConfig) -> Comparison:
    """Evaluate ``cfg.a`` and ``cfg.b`` on the same binarized images with the same noise seed (the same noise
    itself where their latent layers have the same sizes, which is what makes the per-image difference tight)."""
    device = resolve_device(cfg.device)
    (model_a, card_a, _), (model_b, card_b, _) = load_checkpoint(cfg.a), load_checkpoint(cfg.b)
    if card_a.get("dataset") != card_b.get("dataset"):
        raise ValueError(
            f"{cfg.a.name} is a {card_a.get('dataset')} model and {cfg.b.name} a {card_b.get('dataset')} one: "
            "their likelihoods are of different data and cannot be compared"
        )
    x, binarization = split_images(card_a, cfg.split, cfg.seed, cfg.data_root, cfg.max_images)
    memory_bytes = cfg.memory_mb * 2**20
    a, b = (
        evaluate_dataset(m.to(device), x, cfg.k, seed=cfg.seed, memory_bytes=memory_bytes, progress=cfg.progress)
        for m in (model_a, model_b)
    )
    return Comparison(a, b, binarization)
