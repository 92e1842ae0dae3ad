"""Summaries of the recognition model q(h | x): posterior moments and active units (the paper's A_u)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.networks import IWAE

# The paper counts a unit as active when A_u = Var_x(E_q[u | x]) exceeds 1e-2.
ACTIVE_UNIT_THRESHOLD = 1e-2
# Draws of the layer below used to estimate an upper layer's moments (the paper's active-unit estimator uses
# the same number).
UPPER_LAYER_SAMPLES = 100


@dataclass
class LayerMoments:
    """Posterior mean and standard deviation of one stochastic layer, both [B, d_l]."""

    mean: torch.Tensor
    std: torch.Tensor
    exact: bool  # True for the bottom layer (closed form); upper layers are Monte Carlo estimates


@torch.no_grad()
def posterior_moments(
    model: IWAE, x: torch.Tensor, generator: torch.Generator | None = None, samples: int = UPPER_LAYER_SAMPLES
) -> list[LayerMoments]:
    """Mean and std of q(h_l | x) for every layer; x: [B, D].

    The bottom layer is Gaussian given x. An upper layer's marginal is a mixture over the layer below: its mean
    averages the conditional means over ``samples`` draws and its variance follows the law of total variance.
    """
    mean, log_std = model.q[0](x)
    moments = [LayerMoments(mean, torch.exp(log_std), True)]
    if model.config.n_layers > 1:
        eps = torch.randn((samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        h = mean + torch.exp(log_std) * eps
        for layer in model.q[1:]:
            m, s = layer(h)
            sd = torch.exp(s)
            var = (sd * sd).mean(0) + m.var(0, unbiased=False)
            moments.append(LayerMoments(m.mean(0), var.sqrt(), False))
            h = m + sd * torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
    return moments


@torch.no_grad()
def active_unit_variances(
    model: IWAE, x: torch.Tensor, generator: torch.Generator | None = None, samples: int = UPPER_LAYER_SAMPLES
) -> list[torch.Tensor]:
    """A_u = Var_x(E_q[u | x]) for every unit of every layer: list of [d_l], float64 on the CPU.

    x: [N, D] with N >= 2 (a variance across images; unbiased).
    """
    if x.shape[0] < 2:
        raise ValueError(f"active units need at least 2 images, got {x.shape[0]}")
    means = model.posterior_means(x, samples=samples, generator=generator)
    return [m.double().var(dim=0, unbiased=True).cpu() for m in means]


def active_units(a_u: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> torch.Tensor:
    """Indices of the active units of one layer; a_u: [d_l] -> [n_active] (int64)."""
    return torch.nonzero(a_u > threshold).flatten()


def count_active(a_u: list[torch.Tensor], threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
    """Number of active units per layer."""
    return [int(active_units(a, threshold).numel()) for a in a_u]


@torch.no_grad()
def reconstruct(
    model: IWAE, x: torch.Tensor, noise: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel probabilities p(x | h1) decoded from the posterior: x [B, D] -> (mean [B, D], draws [S, B, D]).

    ``mean`` decodes the exact posterior mean E_q[h1 | x] of the bottom layer. ``draws`` decode h1 of S samples
    h ~ q(h | x) made with ``noise`` ([S, B, d_l] per layer, the `draw_noise` layout; S = 0 without noise), so
    the same noise as a log-likelihood request gives the very samples that request weighs.
    """
    mean, _ = model.q[0](x)
    decoded_mean = torch.sigmoid(model.p[0](mean))
    if noise is None or noise[0].shape[0] == 0:
        return decoded_mean, decoded_mean.new_zeros((0, *decoded_mean.shape))
    h1 = model.sample_latents(x, int(noise[0].shape[0]), noise=noise).h[0]
    return decoded_mean, torch.sigmoid(model.p[0](h1))
