"""Bounds on log p(x) from log importance weights, and their diagnostics.

Every function takes ``log_w: [k, batch]`` with log w_i = log p(x, h_i) - log q(h_i | x), h_i ~ q(h | x).
"""

from __future__ import annotations

import math

import torch


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/k) Σ_i exp(log_w_i), stable for any magnitude (logsumexp)."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The k-sample importance weighted bound L_k (one draw): [k, batch] -> [batch]."""
    return log_mean_exp(log_w, dim=0)


def elbo(log_w: torch.Tensor) -> torch.Tensor:
    """The VAE bound with k samples, (1/k) Σ_i log w_i (the ELBO, whatever k): [k, batch] -> [batch]."""
    return log_w.mean(dim=0)


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """w~_i = w_i / Σ_j w_j: [k, batch] -> [k, batch]."""
    return torch.softmax(log_w, dim=0)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's ESS of the normalised weights, 1 / Σ_i w~_i²: [k, batch] -> [batch], in [1, k]."""
    return torch.exp(-torch.logsumexp(2.0 * torch.log_softmax(log_w, dim=0), dim=0))


def iwae_bound_stderr(log_w: torch.Tensor) -> torch.Tensor:
    """Monte Carlo standard error of L_k by the delta method, from the same k weights.

    L_k = log m with m the sample mean of the w_i, so sd(L_k) ≈ sd(w) / (sqrt(k) · m). The ratio w_i / m
    equals k · w~_i, which keeps the computation in normalised weights (no overflow). [k, batch] -> [batch].
    """
    k = log_w.shape[0]
    if k < 2:
        return torch.full(log_w.shape[1:], float("nan"), dtype=log_w.dtype, device=log_w.device)
    # w_i / m = k · w~_i, so the sample variance of w_i / m is Σ (k w~_i - 1)² / (k - 1).
    r = k * normalized_weights(log_w) - 1.0
    var_ratio = (r * r).sum(0) / (k - 1)
    return torch.sqrt(var_ratio / k)
