"""The PSIS k̂ port (models/psis.py) against ArviZ's psislw, the implementation it ports."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from models.psis import MIN_K, RELIABLE_K_HAT, pareto_k, psis, reliable, tail_length

az = pytest.importorskip("arviz")


def _weight_sets(k: int, seed: int) -> np.ndarray:
    """Log-weights [k, 10] from light to very heavy right tails: log-normal weights with log-sd 0.1 to 3,
    Pareto weights with tail index 0.7 to 10 (k̂ about 1/index), and a shifted, very spread column."""
    rng = np.random.default_rng(seed)
    cols = [rng.standard_normal(k) * s for s in (0.1, 1.0, 2.0, 3.0)]
    cols += [np.log1p(rng.pareto(a, k)) for a in (0.7, 1.5, 2.5, 10.0)]
    cols += [rng.standard_normal(k) * 2.0 - 1e4, rng.standard_normal(k) * 400.0]  # far from 0; spread > 708
    return np.stack(cols, axis=1)


def _arviz(log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about k̂ > 0.7, which several sets have on purpose
        lw, k_hat = az.psislw(log_w.T.copy())
    return lw.T, np.asarray(k_hat)


@pytest.mark.parametrize("k", [25, 60, 500, 5000])
def test_pareto_k_and_smoothed_weights_match_arviz(k: int) -> None:
    log_w = _weight_sets(k, seed=k)
    want_lw, want_k = _arviz(log_w)
    got_lw, got_k = psis(torch.from_numpy(log_w))
    np.testing.assert_allclose(got_k.numpy(), want_k, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got_lw.numpy(), want_lw, rtol=0, atol=1e-9)
    # The sets span both sides of the threshold, so the comparison covers both verdicts.
    assert bool((want_k <= RELIABLE_K_HAT).any()) and bool((want_k > RELIABLE_K_HAT).any())


def test_float32_input_gives_the_float64_answer() -> None:
    log_w = _weight_sets(1000, seed=3)[:, :8]
    want = pareto_k(torch.from_numpy(log_w))
    got = pareto_k(torch.from_numpy(log_w.astype(np.float32)))
    assert got.dtype == torch.float64
    want32 = pareto_k(torch.from_numpy(log_w.astype(np.float32).astype(np.float64)))
    assert torch.equal(got, want32) and torch.allclose(got, want, atol=1e-3)


def test_ties_at_the_cutoff_are_fitted_as_arviz_does() -> None:
    """Repeated weights shorten the tail (only weights strictly above the cutoff are fitted)."""
    rng = np.random.default_rng(5)
    k = 400
    base = rng.standard_normal(k) * 1.5
    cutoff = np.sort(base)[-tail_length(k) - 1]
    tied = base.copy()
    tied[np.argsort(base)[-10:-3]] = cutoff  # seven of the tail weights now equal the cutoff
    log_w = np.stack([base, tied, np.round(base, 1)], axis=1)
    want_lw, want_k = _arviz(log_w)
    got_lw, got_k = psis(torch.from_numpy(log_w))
    np.testing.assert_allclose(got_k.numpy(), want_k, rtol=0, atol=1e-10)
    # Equal weights inside the tail get the smoothed values in an arbitrary order (ArviZ sorts unstably).
    np.testing.assert_allclose(np.sort(got_lw.numpy(), 0), np.sort(want_lw, 0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 10, MIN_K - 1])
def test_too_few_samples_give_infinite_k_hat_and_unreliable(k: int) -> None:
    log_w = torch.from_numpy(_weight_sets(max(k, 2), seed=1)[:k, :4])
    k_hat = pareto_k(log_w)
    assert bool(torch.isinf(k_hat).all()) and not bool(reliable(k_hat).any())
    if k >= 2:  # ArviZ agrees (it warns and returns inf)
        _, want = _arviz(log_w.numpy())
        assert np.isinf(want).all()


def test_equal_weights_do_not_crash() -> None:
    k_hat = pareto_k(torch.zeros(100, 2, dtype=torch.float64))
    assert bool(torch.isinf(k_hat).all())  # no weight is above the cutoff: no tail to fit


def test_reliable_is_the_papers_threshold() -> None:
    k_hat = torch.tensor([-0.2, 0.5, 0.7, 0.7000001, 1.3, math.inf, math.nan], dtype=torch.float64)
    assert reliable(k_hat).tolist() == [True, True, True, False, False, False, False]
