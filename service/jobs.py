"""The work of the routes that are not /loglik, as functions of the loaded model: each builder returns the
function a call job of the fair scheduler runs (``submit_call``; service/fair_queue.py). /loglik's rows are
scheduled by the fair scheduler itself (``submit_loglik``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from models.noise import request_noise, seeded_generator
from models.posterior import active_unit_variances, posterior_moments
from models.posterior import reconstruct as decode_posterior
from service import schemas
from service.registry import LoadedModel


def encode(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], list[schemas.LayerEncoding]]:
    """Posterior moments per layer and, if ``samples``, that many draws per image from q(h | x)."""

    def run(lm: LoadedModel) -> list[schemas.LayerEncoding]:
        xd = x.to(lm.device)
        moments = posterior_moments(lm.model, xd, generator=seeded_generator(lm.device, seed))
        draws: list[torch.Tensor] | None = None
        if samples:
            # Same noise as /loglik with k=samples and this seed: the draws are the samples it weighs.
            noise = [e.to(lm.device) for e in request_noise(lm.model, samples, int(x.shape[0]), seed)]
            draws = [h.transpose(0, 1) for h in lm.model.sample_latents(xd, samples, noise=noise).h]
        return [
            schemas.LayerEncoding(
                layer=i + 1,
                dim=int(m.mean.shape[-1]),
                exact=m.exact,
                mean=m.mean.double().cpu().tolist(),
                std=m.std.double().cpu().tolist(),
                samples=draws[i].double().cpu().tolist() if draws is not None else None,
            )
            for i, m in enumerate(moments)
        ]

    return run


def sample(n: int, seed: int) -> Callable[[LoadedModel], tuple[np.ndarray, np.ndarray]]:
    """n ancestral samples: pixel probabilities [n, D] (float64) and one binary draw from them (uint8)."""

    def run(lm: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        gen = seeded_generator(lm.device, seed)
        probs = lm.model.sample(n, generator=gen)
        binary = torch.bernoulli(probs, generator=gen)
        return probs.double().cpu().numpy(), binary.to(torch.uint8).cpu().numpy()

    return run


def active_units(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], list[torch.Tensor]]:
    """A_u per unit of each layer over the images x ([d_l] float64 on the CPU; the estimator `iwae eval` uses)."""

    def run(lm: LoadedModel) -> list[torch.Tensor]:
        gen = seeded_generator(lm.device, seed)
        return active_unit_variances(lm.model, x.to(lm.device), generator=gen, samples=samples)

    return run


def reconstruct(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], tuple[np.ndarray, np.ndarray]]:
    """The posterior decoded: p(x | h1) at the posterior mean [N, D], and at ``samples`` draws [N, samples, D]
    (the draws /loglik weighs with k=samples and this seed)."""

    def run(lm: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        n = int(x.shape[0])
        noise = [e.to(lm.device) for e in request_noise(lm.model, samples, n, seed)] if samples else None
        mean, draws = decode_posterior(lm.model, x.to(lm.device), noise)
        return mean.double().cpu().numpy(), draws.transpose(0, 1).double().cpu().numpy()

    return run
