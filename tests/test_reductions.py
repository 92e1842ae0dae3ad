"""Batch invariance of the statistics (models/reductions.py): an image's numbers must be the same bits alone
as in a merged batch, because the service merges requests and each must get what it gets alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.engine import bound_stats
from models.psis import psis
from models.reductions import row_log_mean_exp, row_var, tree_sum

FIELDS = ("loglik", "stderr", "ess", "elbo", "pareto_k", "reliable")


def _heavy(k: int, batch: int, seed: int) -> torch.Tensor:
    """Log-weights [k, batch] like a trained IWAE's: a Gaussian bulk far below 0, heavy right tails, ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, batch)) * rng.uniform(0.5, 4.0, batch) - rng.uniform(80, 120, batch)
    x += np.log1p(rng.pareto(rng.uniform(0.6, 3.0, batch), (k, batch)))
    x[: k // 10, 0] = x[0, 0]  # a column with many ties
    return torch.from_numpy(x)


@pytest.mark.parametrize("k", [2, 21, 50, 137, 1000, 5000])
def test_bound_stats_of_an_image_do_not_depend_on_the_batch(k: int) -> None:
    log_w = _heavy(k, 37, seed=k)
    together = bound_stats(log_w)
    for j in (0, 1, 17, 36):
        for lo, hi in ((j, j + 1), (max(0, j - 3), j + 1), (j, min(37, j + 5))):
            part = bound_stats(log_w[:, lo:hi])
            for name in FIELDS:
                got, want = getattr(part, name)[j - lo], getattr(together, name)[j]
                assert torch.equal(got, want) or (torch.isnan(got) and torch.isnan(want)), (name, k, lo, hi)


def test_float32_weights_and_a_strided_block_give_the_same_bits() -> None:
    log_w = _heavy(300, 8, seed=3).float()
    want = bound_stats(log_w.double().contiguous())
    got = bound_stats(log_w.t().contiguous().t())  # the same values, column-major
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name))


def test_smoothed_weights_do_not_depend_on_the_batch() -> None:
    log_w = _heavy(400, 9, seed=5)
    lw, k_hat = psis(log_w)
    lw1, k1 = psis(log_w[:, 4:5])
    assert torch.equal(lw[:, 4], lw1[:, 0]) and torch.equal(k_hat[4], k1[0])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 100, 1023, 5001])
def test_tree_sum_is_an_accurate_sum(n: int) -> None:
    a = np.random.default_rng(n).standard_normal((3, n)) * 1e3
    want = [math.fsum(row) for row in a]
    np.testing.assert_allclose(tree_sum(a), want, rtol=1e-13, atol=1e-9)


def test_row_statistics_match_float64_references() -> None:
    a = np.random.default_rng(1).standard_normal((4, 6, 50)) * 30 - 500
    np.testing.assert_allclose(row_var(a), a.var(-1, ddof=1), rtol=1e-12)
    ref = np.log(np.mean(np.exp(a + 500), -1)) - 500
    np.testing.assert_allclose(row_log_mean_exp(a), ref, rtol=1e-13)
    assert np.isneginf(row_log_mean_exp(np.full((1, 3), -np.inf)))[0]
