"""The bounds and their diagnostics (models/bounds.py), in float64 against analytic or Monte Carlo references."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from models.bounds import (
    effective_sample_size,
    elbo,
    iwae_bound,
    iwae_bound_stderr,
    log_mean_exp,
    normalized_weights,
)
from models.config import ModelConfig
from models.networks import IWAE

TINY_1LAYER = ModelConfig(x_dim=12, latent_dims=(3,), hidden_dims=((10, 9),))
TINY_2LAYER = ModelConfig(x_dim=12, latent_dims=(4, 3), hidden_dims=((10, 9), (8, 7)))


def _draw_log_weights(model: IWAE, x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.log_weights(x, n, generator=g)


def _grouped_bounds(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """Independent draws of L_k from a pool of i.i.d. log-weights [n, B]: [n // k, B]."""
    n, batch = log_w.shape
    groups = log_w[: (n // k) * k].reshape(k, n // k, batch)
    return iwae_bound(groups)


def test_l1_is_the_elbo(make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]) -> None:
    model = make_model(TINY_1LAYER)
    x = make_binary(4, TINY_1LAYER.x_dim)
    log_w = _draw_log_weights(model, x, 1, seed=1)
    assert torch.equal(iwae_bound(log_w), elbo(log_w))
    assert torch.equal(iwae_bound(log_w), log_w[0])
    # With more samples the ELBO is the mean of the logs and L_k the log of the mean: Jensen, draw by draw.
    log_w = _draw_log_weights(model, x, 7, seed=2)
    assert torch.allclose(elbo(log_w), log_w.mean(0))
    assert bool((iwae_bound(log_w) >= elbo(log_w)).all())
    naive = torch.log(torch.exp(log_w).mean(0))
    assert torch.allclose(iwae_bound(log_w), naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", [TINY_1LAYER, TINY_2LAYER], ids=["1layer", "2layer"])
def test_mean_lk_increases_with_k(
    config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model = make_model(config)
    x = make_binary(3, model.config.x_dim, seed=3)
    # One pool of 100,000 i.i.d. log-weights per image, cut into independent draws of L_1, L_5 and L_50.
    log_w = _draw_log_weights(model, x, 100_000, seed=4)
    means, ses = {}, {}
    for k in (1, 5, 50):
        lk = _grouped_bounds(log_w, k)
        means[k] = lk.mean(0)
        ses[k] = lk.std(0) / math.sqrt(lk.shape[0])
    for lo, hi in ((1, 5), (5, 50)):
        gap = means[hi] - means[lo]
        margin = 4.0 * (ses[hi] + ses[lo])
        # A random model's q is far from its posterior, so the gaps are large: require a clear increase.
        assert bool((gap > margin).all()), (lo, hi, gap, margin)


def test_log_mean_exp_is_stable_for_very_negative_and_positive_log_weights() -> None:
    offsets = [0.0, math.log(2.0), math.log(3.0), -5.0, 1.5]
    k = len(offsets)
    for base in (-1e4, -1e4 + 0.25, 1e4):
        expected = base + math.log(math.fsum(math.exp(a) for a in offsets) / k)
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
            log_w = (torch.tensor(offsets, dtype=torch.float64) + base).to(dtype).reshape(k, 1)
            got = iwae_bound(log_w)
            assert bool(torch.isfinite(got).all())
            assert abs(got.item() - expected) < tol, (base, dtype, got.item(), expected)
            assert abs(log_mean_exp(log_w).item() - expected) < tol
    # The naive computation underflows at this scale: this is what logsumexp is protecting against.
    naive = torch.log(torch.exp(torch.tensor(offsets, dtype=torch.float64) - 1e4).mean())
    assert naive.item() == -math.inf


def test_diagnostics_are_stable_at_extreme_scale() -> None:
    offsets = torch.tensor([0.0, 0.3, -1.0, 2.0, 0.7, -0.4], dtype=torch.float64).reshape(-1, 1)
    ref_ess, ref_se = effective_sample_size(offsets), iwae_bound_stderr(offsets)
    w = torch.exp(offsets)
    assert torch.allclose(ref_ess, w.sum(0) ** 2 / (w * w).sum(0))
    for base in (-1e4, 1e4):
        assert torch.allclose(effective_sample_size(offsets + base), ref_ess, rtol=1e-9)
        assert torch.allclose(iwae_bound_stderr(offsets + base), ref_se, rtol=1e-9)
        assert torch.allclose(normalized_weights(offsets + base), w / w.sum(0), rtol=1e-9)


def test_effective_sample_size_range_and_limits() -> None:
    g = torch.Generator().manual_seed(5)
    k = 64
    log_w = 3.0 * torch.randn(k, 200, generator=g, dtype=torch.float64)
    ess = effective_sample_size(log_w)
    assert bool((ess >= 1.0 - 1e-12).all()) and bool((ess <= k + 1e-9).all())
    w = torch.exp(log_w)
    assert torch.allclose(ess, w.sum(0) ** 2 / (w * w).sum(0), rtol=1e-10)
    # Equal weights: every sample counts fully.
    equal = torch.full((k, 3), -7.5, dtype=torch.float64)
    assert torch.allclose(effective_sample_size(equal), torch.full((3,), float(k), dtype=torch.float64))
    # One dominant weight: the rest are negligible.
    dominant = torch.zeros(k, 1, dtype=torch.float64)
    dominant[17] = 100.0
    assert abs(effective_sample_size(dominant).item() - 1.0) < 1e-12
    dominant[17] = 5.0
    big, rest = math.exp(5.0), k - 1
    assert abs(effective_sample_size(dominant).item() - (big + rest) ** 2 / (big * big + rest)) < 1e-9


def test_stderr_is_nan_for_a_single_sample() -> None:
    assert bool(torch.isnan(iwae_bound_stderr(torch.zeros(1, 3, dtype=torch.float64))).all())


def test_delta_method_stderr_matches_spread_for_lognormal_weights() -> None:
    # log w ~ N(0, s²): sd(L_k) ≈ sqrt((exp(s²) - 1) / k) for large k, by the delta method.
    s, k, reps = 0.8, 400, 2000
    g = torch.Generator().manual_seed(6)
    log_w = s * torch.randn(k, reps, generator=g, dtype=torch.float64)
    lk = iwae_bound(log_w)
    empirical = lk.std().item()
    analytic = math.sqrt(math.expm1(s * s) / k)
    predicted = iwae_bound_stderr(log_w)
    assert abs(empirical / analytic - 1.0) < 0.1, (empirical, analytic)
    assert abs(predicted.mean().item() / empirical - 1.0) < 0.1, (predicted.mean().item(), empirical)


@pytest.mark.parametrize("config", [TINY_1LAYER, TINY_2LAYER], ids=["1layer", "2layer"])
def test_delta_method_stderr_matches_spread_on_a_model(
    config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model = make_model(config)
    with torch.no_grad():
        # A gentler encoder (closer to the posterior) keeps the weights' tails moderate: the delta method is
        # a large-k approximation and is optimistic for heavy-tailed weights.
        for p in model.q.parameters():
            p.mul_(0.5)
    x = make_binary(3, model.config.x_dim, seed=7)
    k, reps = 100, 1000
    log_w = _draw_log_weights(model, x, k * reps, seed=8).reshape(k, reps, -1)
    lk = iwae_bound(log_w)  # [reps, B]: independent draws of L_k
    empirical = lk.std(0)
    predicted = iwae_bound_stderr(log_w).pow(2).mean(0).sqrt()  # RMS: averages variances, not sds
    ratio = predicted / empirical
    assert bool((ratio > 0.6).all()) and bool((ratio < 1.6).all()), ratio
