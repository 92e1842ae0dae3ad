"""Training surrogates: scalar losses whose gradients are the four estimators' gradients.

Each returns ``(loss, bound)`` for a batch ``x: [B, D]``: minimise ``loss``; ``bound: [B]`` is the value of the
objective (L_k for the importance weighted estimators, the k-sample ELBO for ``vae``) for logging. The
normalised importance weights are detached in every surrogate: they weight the gradients, they are not
differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.bounds import elbo, iwae_bound, normalized_weights
from models.networks import IWAE

Surrogate = Callable[[IWAE, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def iwae_surrogate(model: IWAE, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's estimator: ∇L_k = Σ_i w~_i ∇ log w_i (w~ detached)."""
    log_w = model.log_weights(x, k)
    w = normalized_weights(log_w).detach()
    return -(w * log_w).sum(0).mean(), iwae_bound(log_w.detach())


def vae_surrogate(model: IWAE, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's k-sample ELBO, (1/k) Σ_i log w_i, differentiated directly."""
    log_w = model.log_weights(x, k)
    return -elbo(log_w).mean(), elbo(log_w.detach())


def stl_surrogate(model: IWAE, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sticking the landing (Roeder et al. 2017) for L_k: log q is evaluated with its parameters
    stopped, so the encoder gets the path derivative only (its score-function term is dropped).
    Unbiased only for k = 1: for k > 1 the dropped term Σ w~_i ∂log q(h_i)/∂φ has non-zero mean (Tucker et al.
    2018; tests/test_estimators.py measures it), which DReG corrects."""
    lat = model.sample_latents(x, k)
    log_p = model.log_p(x, lat.h)
    log_w_path = log_p - model.log_q(x, lat.h, detach_params=True)
    log_w = (log_p - lat.log_q()).detach()
    w = normalized_weights(log_w)
    return -(w * log_w_path).sum(0).mean(), iwae_bound(log_w)


def dreg_surrogate(model: IWAE, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Doubly reparameterised gradients (Tucker et al. 2018).

    Encoder: Σ_i w~_i² ∂log w_i/∂h_i · ∂h_i/∂φ (path derivative, squared weights).
    Decoder: Σ_i w~_i ∇_θ log p(x, h_i), unchanged from IWAE.
    One pass serves both: the surrogate is STL's, Σ_i w~_i log w_i with log q's parameters stopped, and the
    gradient that reaches each sample h_i from log w_i is multiplied by w~_i once more on its way to φ. The
    extra factor sits on aliases of the samples where log w reads them, not on the sampling chain
    h_1 -> h_2 -> ..., so a sample's gradient is scaled exactly once however many layers lie above it.
    """
    lat = model.sample_latents(x, k)
    h = [hl.view_as(hl) for hl in lat.h]
    log_w_path = model.log_p(x, h) - model.log_q(x, h, detach_params=True)
    log_w = log_w_path.detach()
    w = normalized_weights(log_w)
    if log_w_path.requires_grad:
        for alias in h:
            alias.register_hook(lambda g, w=w: g * w.unsqueeze(-1))
    return -(w * log_w_path).sum(0).mean(), iwae_bound(log_w)


ESTIMATORS: dict[str, Surrogate] = {
    "iwae": iwae_surrogate,
    "vae": vae_surrogate,
    "stl": stl_surrogate,
    "dreg": dreg_surrogate,
}


def get_surrogate(name: str) -> Surrogate:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
