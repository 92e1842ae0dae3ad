"""An exact oracle for the bounds: a model with a 2-d latent, whose log p(x) is computed by quadrature.

The model is trained briefly (VAE objective) on data from a sharper "teacher", so its posterior is narrower
than the prior and q(h | x) is a good but imperfect fit: L_1 is clearly below log p(x), and L_k climbs to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from models.bounds import elbo, iwae_bound
from models.config import ModelConfig
from models.engine import engine_log_weights, evaluate_batch
from models.estimators import vae_surrogate
from models.networks import IWAE

CONFIG = ModelConfig(x_dim=16, latent_dims=(2,), hidden_dims=((16,),))
N_IMAGES = 6


def grid_log_px(model: IWAE, x: torch.Tensor, cells: int, half_width: float) -> torch.Tensor:
    """log ∫ p(x | h) p(h) dh by the midpoint rule on a cells × cells grid over [-half_width, half_width]²."""
    edges = torch.linspace(-half_width, half_width, cells + 1, dtype=torch.float64)
    centres = (edges[1:] + edges[:-1]) / 2
    h = torch.cartesian_prod(centres, centres).unsqueeze(1)  # [G, 1, 2], broadcast over the images
    log_cell = 2.0 * math.log(2.0 * half_width / cells)
    with torch.no_grad():
        log_joint = model.log_p(x, [h])  # [G, B]
    return torch.logsumexp(log_joint, dim=0) + log_cell


@dataclass
class Oracle:
    model: IWAE
    x: torch.Tensor
    log_px: torch.Tensor  # [B], by quadrature


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = IWAE(CONFIG).double()
        with torch.no_grad():
            for p in teacher.p.parameters():
                p.mul_(4.0)  # a sharp likelihood, so the posterior is far from the prior
        g = torch.Generator().manual_seed(1)
        data = torch.bernoulli(teacher.sample(1024, generator=g), generator=g)
        torch.manual_seed(2)
        model = IWAE(CONFIG, data_mean=data.mean(0)).double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            batch = data[torch.randint(0, data.shape[0], (64,), generator=g)]
            loss, _ = vae_surrogate(model, batch, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    x = data[:N_IMAGES]
    return Oracle(model, x, grid_log_px(model, x, cells=400, half_width=8.0))


def test_grid_is_wide_and_dense_enough(oracle: Oracle) -> None:
    finer_wider = grid_log_px(oracle.model, oracle.x, cells=600, half_width=10.0)
    assert torch.allclose(finer_wider, oracle.log_px, rtol=0, atol=1e-9)
    assert bool(torch.isfinite(oracle.log_px).all())
    # The comparison has teeth: a grid that cuts off part of the posterior's mass is visibly wrong.
    too_narrow = grid_log_px(oracle.model, oracle.x, cells=400, half_width=1.0)
    assert bool((oracle.log_px - too_narrow > 0.01).all())


def test_posterior_is_non_trivial(oracle: Oracle) -> None:
    with torch.no_grad():
        mean, log_std = oracle.model.q[0](oracle.x)
    # Narrower than the prior and data-dependent.
    assert bool((log_std.exp() < 0.7).all())
    assert float(mean.std(0).min()) > 0.2
    stats = evaluate_batch(oracle.model, oracle.x, 5000, generator=torch.Generator().manual_seed(3))
    # q is imperfect: the ELBO is clearly below log p(x) for every image.
    assert bool((oracle.log_px - stats.elbo > 0.05).all()), oracle.log_px - stats.elbo


def test_bounds_climb_to_the_exact_log_likelihood(oracle: Oracle) -> None:
    model, x, log_px = oracle.model, oracle.x, oracle.log_px
    g = torch.Generator().manual_seed(4)
    draws = 60
    l1, l50, l5000 = [], [], []
    for _ in range(draws):
        noise = model.draw_noise(5000, x.shape[0], generator=g, dtype=x.dtype)
        log_w = engine_log_weights(model, x, noise)  # [5000, B]
        l5000.append(iwae_bound(log_w))
        # The same 5000 samples as 100 independent draws of L_50 and 5000 of L_1: paired with L_5000, the
        # comparisons do not pay for the heavy tail of L_5000 twice.
        l50.append(iwae_bound(log_w.reshape(50, 100, -1)).mean(0))
        l1.append(elbo(log_w))
    lk = {1: torch.stack(l1), 50: torch.stack(l50), 5000: torch.stack(l5000)}  # each [draws, B]

    def mean_and_se(d: torch.Tensor) -> tuple[float, float]:
        """Mean over draws and images, and its standard error (images have different spreads)."""
        return float(d.mean()), math.sqrt(float((d.var(0) / d.shape[0]).sum())) / d.shape[1]

    gap_1_50, se_1_50 = mean_and_se(lk[50] - lk[1])
    gap_50_5000, se_50_5000 = mean_and_se(lk[5000] - lk[50])
    excess, se_excess = mean_and_se(lk[5000] - log_px)
    assert gap_1_50 > 5 * se_1_50 and gap_1_50 > 0.05, (gap_1_50, se_1_50)
    assert gap_50_5000 > 3 * se_50_5000, (gap_50_5000, se_50_5000)
    assert excess <= 3 * se_excess, (excess, se_excess)
    # Per image, L_5000 is within 0.1 nats of the truth (the required bar; here it is ~0.01).
    assert bool(((lk[5000].mean(0) - log_px).abs() < 0.1).all()), lk[5000].mean(0) - log_px


def test_evaluate_batch_is_the_engine_on_freshly_drawn_noise(oracle: Oracle) -> None:
    model, x, log_px = oracle.model, oracle.x, oracle.log_px
    stats = evaluate_batch(model, x, 5000, generator=torch.Generator().manual_seed(6), memory_bytes=2**16)
    noise = model.draw_noise(5000, x.shape[0], generator=torch.Generator().manual_seed(6), dtype=x.dtype)
    log_w = engine_log_weights(model, x, noise)
    assert torch.allclose(stats.loglik, iwae_bound(log_w), rtol=0, atol=1e-10)
    assert torch.allclose(stats.elbo, elbo(log_w), rtol=0, atol=1e-10)
    assert bool((stats.loglik - log_px).abs().max() < 0.1)
    assert bool((stats.stderr > 0).all()) and bool((stats.stderr < 0.1).all())
    assert bool((stats.ess >= 1).all()) and bool((stats.ess <= 5000).all())


def test_single_sample_bound_matches_the_elbo_of_q(oracle: Oracle) -> None:
    """E[L_1] = log p(x) - KL(q(h|x) || p(h|x)); the KL computed on the grid must close the gap exactly."""
    model, x = oracle.model, oracle.x
    half_width, cells = 8.0, 400
    edges = torch.linspace(-half_width, half_width, cells + 1, dtype=torch.float64)
    centres = (edges[1:] + edges[:-1]) / 2
    h = torch.cartesian_prod(centres, centres).unsqueeze(1)
    log_cell = 2.0 * math.log(2.0 * half_width / cells)
    with torch.no_grad():
        log_joint = model.log_p(x, [h])
        log_q = model.log_q(x, [h.expand(-1, x.shape[0], -1)])
    q_mass = torch.softmax(log_q + log_cell, dim=0)
    # ELBO = E_q[log p(x, h) - log q(h | x)] by quadrature over the same grid.
    elbo_grid = (q_mass * (log_joint - log_q)).sum(0)
    assert bool((elbo_grid < oracle.log_px).all())
    with torch.no_grad():
        log_w = model.log_weights(x, 20000, generator=torch.Generator().manual_seed(5))
    se = log_w.std(0) / math.sqrt(log_w.shape[0])
    assert bool(((log_w.mean(0) - elbo_grid).abs() < 4 * se).all()), (log_w.mean(0) - elbo_grid, se)
