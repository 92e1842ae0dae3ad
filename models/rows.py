"""The L_k engine on rows: log w for any set of (image, sample) rows.

``engine_log_weights`` (models/engine.py) takes one k for a whole batch. A scheduler that interleaves jobs
wants less structure: a chunk holds rows of several jobs, each with its own images, k and noise. Here a row
is one (image, noise draw) pair and which image a row belongs to is an index. Every row's log w depends only
on its own image and noise (the same arithmetic as the engine's kernel, models/engine.py explains it), so a
job's numbers do not depend on which other rows share its engine call; the per-image statistics then come
from ``models.engine.bound_stats`` over each k's [k, B] block, which is batch-invariant too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.distributions import LOG_2PI
from models.engine import upper_layers
from models.kernels import _row_terms_plain, kernels, tanh_
from models.networks import IWAE


@dataclass(frozen=True)
class ImageTerms:
    """What log w needs from each image, computed once per image: all [B, ·]."""

    q0_mean: torch.Tensor  # [B, d_1] mean of q(h_1 | x)
    q0_std: torch.Tensor  # [B, d_1]
    wx: torch.Tensor  # [B, H] Wᵀx: the data term x·(W a) is (Wᵀx)·a
    const: torch.Tensor  # [B] x·b + Σ log std_1 + the Gaussian normalisers that do not cancel

    @property
    def n_images(self) -> int:
        return int(self.const.shape[0])


@torch.inference_mode()
def image_terms(model: IWAE, x: torch.Tensor) -> ImageTerms:
    """The per-image pieces of log w for images x [B, D]."""
    cfg = model.config
    q0_mean, q0_log_std = model.q[0](x)
    out = model.p[0].logits
    const = x @ out.bias + q0_log_std.sum(-1) + 0.5 * (sum(cfg.latent_dims) - cfg.latent_dims[-1]) * LOG_2PI
    return ImageTerms(q0_mean, torch.exp(q0_log_std), x @ out.weight, const)


def concat_terms(parts: list[ImageTerms]) -> ImageTerms:
    """Several jobs' image terms as one table (the images of job j follow those of job j - 1)."""
    if len(parts) == 1:
        return parts[0]
    return ImageTerms(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q0_mean", "q0_std", "wx", "const")))


@torch.inference_mode()
def row_log_weights(model: IWAE, terms: ImageTerms, image: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """log w per row: image [R] (indices into ``terms``), noise [R, d_l] per layer -> log_w [R].

    Callers keep R within their memory budget (``models.engine.chunk_rows_for``): this is one chunk.
    """
    cfg = model.config
    rows = int(image.shape[0])
    if len(noise) != cfg.n_layers or any(e.shape != (rows, d) for e, d in zip(noise, cfg.latent_dims, strict=True)):
        raise ValueError(
            f"noise must be [{rows}, d_l] for d_l in {cfg.latent_dims}, got {[list(e.shape) for e in noise]}"
        )
    eps = [e.contiguous() for e in noise]  # the compiled kernel wants plain contiguous inference tensors
    hs, upper = upper_layers(
        model, torch.addcmul(terms.q0_mean[image], terms.q0_std[image], eps[0]), eps
    )  # h_1: [R, d_1]
    decoder = model.p[0]
    a = hs[0]
    for lin in decoder.hidden.layers:
        a = tanh_(torch.addmm(lin.bias, a, lin.weight.t()))
    out = decoder.logits
    logits = torch.mm(a, out.weight.t())
    # The compiled kernel specialises on a row count of 1; such tiny calls gain nothing from it anyway.
    row_terms = kernels(model).row_terms if rows >= 2 else _row_terms_plain
    log_w = row_terms(logits, out.bias.detach().clone(), a, terms.wx[image], eps[0], hs[-1].contiguous())
    log_w = log_w + terms.const[image]
    return log_w if upper is None else log_w + upper


def job_rows(k: int, n_images: int, start: int, stop: int) -> torch.Tensor:
    """Image index of rows [start, stop) of a k × n_images job whose rows are sample-major (row s·B + i is
    sample s of image i, the layout of the noise [k, B, d] flattened to [k·B, d])."""
    return torch.arange(start, stop) % n_images
