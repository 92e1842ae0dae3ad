"""Log-densities of the model's distributions (elementwise terms summed over the last axis)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(h: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(h; mean, diag(exp(log_std))^2), summed over the last axis. Shapes broadcast: [..., d] -> [...]."""
    z = (h - mean) * torch.exp(-log_std)
    return -0.5 * (z * z).sum(-1) - log_std.sum(-1) - 0.5 * h.shape[-1] * LOG_2PI


def std_normal_log_prob(h: torch.Tensor) -> torch.Tensor:
    """log N(h; 0, I): [..., d] -> [...]."""
    return -0.5 * (h * h).sum(-1) - 0.5 * h.shape[-1] * LOG_2PI


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) = x·l - softplus(l), summed over the last axis.

    x: [..., D] in {0, 1} (broadcast against logits), logits: [..., D] -> [...].
    """
    return (x * logits - F.softplus(logits)).sum(-1)
