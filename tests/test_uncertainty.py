"""The calibrated standard error of L_k and the target-precision loop (models/uncertainty.py), in float64 on
synthetic log-weights whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from models import uncertainty
from models.bounds import iwae_bound, iwae_bound_stderr
from models.uncertainty import (
    CLT_RATE,
    block_sizes,
    block_spread,
    chunk_schedule,
    convergence_rate,
    lk_stderr,
    log_weights_to_target,
    tail_rate,
)


def _lognormal(k: int, draws: int, sigma: float, seed: int) -> torch.Tensor:
    """log w ~ N(0, sigma²): [k, draws]; sd(L_k) -> sqrt((e^(sigma²) - 1) / k) for large k."""
    return sigma * torch.randn(k, draws, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("sigma", "k"), [(0.3, 50), (0.3, 1000), (1.0, 1000)])
def test_light_tails_match_the_clt_answer(sigma: float, k: int) -> None:
    log_w = _lognormal(k, 400, sigma, seed=k)
    theory = math.sqrt(math.expm1(sigma**2) / k)
    empirical = float(iwae_bound(log_w).std())
    assert empirical == pytest.approx(theory, rel=0.12)
    reported = lk_stderr(log_w)
    assert float(reported.median()) == pytest.approx(empirical, rel=0.12)
    # Light tails: the spread shrinks at the CLT rate, so the measured rate is close to 1/2.
    b1, b2 = block_sizes(k)
    rate = convergence_rate(block_spread(log_w, b1), block_spread(log_w, b2), b1, b2)
    assert float(rate.median()) > 0.4


def test_heavy_tails_are_calibrated_where_the_delta_method_is_not() -> None:
    """Log-normal weights with sigma = 2 (e^4 ≈ 55 times the mean's variance per sample): the k samples rarely
    show the weights that make L_k vary, and the delta method's error bars are too narrow."""
    log_w = _lognormal(1000, 400, 2.0, seed=2)
    empirical = float(iwae_bound(log_w).std())
    assert 0.8 <= empirical / float(lk_stderr(log_w).median()) <= 1.35
    assert empirical / float(iwae_bound_stderr(log_w).median()) > 1.45


def test_heavy_tails_at_small_k_take_the_tail_shape_a_margin_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """At k = 50 the tail shape is fitted to 10 weights and often comes out light for heavy weights: taken as
    fitted, the error bars are too narrow; with the margin they are calibrated (on the safe side)."""
    log_w = _lognormal(50, 2000, 2.0, seed=50)
    empirical = float(iwae_bound(log_w).std())
    assert 0.8 <= empirical / float(lk_stderr(log_w).median()) <= 1.2
    monkeypatch.setattr(uncertainty, "TAIL_MARGIN", 0.0)
    assert empirical / float(lk_stderr(log_w).median()) > 1.2


def test_tail_rate_is_one_minus_the_shape_a_margin_up_clipped() -> None:
    k_hat = torch.tensor([-0.5, 0.3, 0.6, 1.5, math.inf, math.nan], dtype=torch.float64)
    shape = k_hat + uncertainty.TAIL_MARGIN * (1 + k_hat) / math.sqrt(10)  # k = 50: the 10 largest weights
    want = (1 - shape).clamp(0, CLT_RATE).nan_to_num(0.0)
    assert torch.equal(tail_rate(k_hat, 50)[:4], want[:4])
    assert tail_rate(k_hat, 50)[4:].tolist() == [0.0, 0.0]
    assert 0 < float(tail_rate(k_hat, 50)[2]) < 0.4 - 0.1  # the margin lowers the rate of k̂ = 0.6 below 1 - 0.6


def test_block_spread_is_the_spread_of_block_bounds() -> None:
    log_w = _lognormal(40, 3, 1.5, seed=4)
    got = block_spread(log_w, 4, partitions=1)  # the first partition is the natural order
    blocks = log_w.reshape(10, 4, 3)
    want = torch.log(torch.exp(blocks).mean(1)).var(0).sqrt()
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="two blocks"):
        block_spread(log_w, 21)


def test_block_spread_keeps_its_digits_for_blocks_far_below_the_largest_weight() -> None:
    """Blocks whose weights sit ~1000 nats below the image's largest underflow when shifted by the image's
    maximum: those images are computed with a shift per block (column 1), the others are untouched."""
    log_w = _lognormal(40, 2, 1.5, seed=5)
    log_w[:20, 1] -= 1000.0
    got = block_spread(log_w, 4, partitions=1)
    blocks = log_w.reshape(10, 4, 2)
    want = (torch.logsumexp(blocks, 1) - math.log(4)).var(0).sqrt()
    assert torch.isfinite(got).all() and float(got[1]) > 100
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert torch.equal(block_spread(log_w[:, 1:], 4, partitions=1), got[1:])  # the same bits alone


def test_convergence_rate_reads_the_power_law_and_is_clipped() -> None:
    sd_b1 = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    sd_b2 = torch.tensor([10**0.3, 10**0.9, 0.5, 0.0, 2.0], dtype=torch.float64)
    rate = convergence_rate(sd_b1, sd_b2, 100, 10)
    assert torch.allclose(rate, torch.tensor([0.3, CLT_RATE, 0.0, CLT_RATE, 0.0], dtype=torch.float64))


def test_equal_weights_have_zero_error_and_shifts_change_nothing() -> None:
    assert bool((lk_stderr(torch.full((500, 2), -93.0, dtype=torch.float64)) == 0).all())
    log_w = _lognormal(2000, 4, 1.5, seed=5)
    base = lk_stderr(log_w)
    for offset in (-1e4, -93.0, 1e4):
        assert torch.allclose(lk_stderr(log_w + offset), base, rtol=1e-9, atol=0)
    assert torch.allclose(lk_stderr(log_w.float()), base, rtol=1e-5)
    # Each image's answer is its own: a column alone gives the same number.
    assert torch.allclose(lk_stderr(log_w[:, 2:3])[0], base[2], rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [1, 2, 9, 29, 30, 31])
def test_small_k(k: int) -> None:
    se = lk_stderr(_lognormal(k, 3, 1.0, seed=k))
    assert se.dtype == torch.float64 and se.shape == (3,)
    if k == 1:
        assert bool(torch.isnan(se).all())
    else:
        assert bool((torch.isfinite(se) & (se > 0)).all())


def test_chunk_schedule_doubles_up_to_the_cap() -> None:
    assert chunk_schedule(5000) == [100, 100, 200, 400, 800, 1600, 1800]
    assert chunk_schedule(100) == [100]
    assert chunk_schedule(30) == [30]
    assert chunk_schedule(250) == [100, 100, 50]
    for cap in (1, 7, 99, 101, 777, 12345):
        assert sum(chunk_schedule(cap)) == cap


class SyntheticDraw:
    """Log-normal log-weights, a different sigma per image; every image's next samples come from one
    generator per image, drawn whether or not the image is still active."""

    def __init__(self, sigmas: list[float], seed: int) -> None:
        self.sigmas = torch.tensor(sigmas, dtype=torch.float64)
        self.gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(sigmas))]
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, size: int, images: torch.Tensor) -> torch.Tensor:
        self.calls.append((size, images.tolist()))
        cols = [
            s * torch.randn(size, generator=g, dtype=torch.float64) for s, g in zip(self.sigmas, self.gens, strict=True)
        ]
        return torch.stack(cols, 1)[:, images]


def test_target_is_met_or_k_is_at_the_cap() -> None:
    sigmas = [0.05, 0.5, 1.0, 3.0]
    target, cap = 0.02, 3000
    out = log_weights_to_target(SyntheticDraw(sigmas, seed=1), len(sigmas), cap, target)
    stderr = torch.tensor([float(lk_stderr(lw[:, None])[0]) for lw in out.log_w])
    assert bool(((stderr <= target) | (out.k_used == cap)).all()), (stderr, out.k_used)
    assert out.k_used.tolist()[0] == 200  # nearly equal weights: met at once, confirmed by the next chunk
    assert out.k_used.tolist()[-1] == cap  # sigma = 3 cannot reach 0.02 nats in 3000 samples
    assert out.k_used.tolist() == sorted(out.k_used.tolist())  # heavier tails need more samples
    # An image stops one chunk after it first met the target (if it still does): at k/2 it met it, at k/4 not.
    for lw, k in zip(out.log_w, out.k_used.tolist(), strict=True):
        assert lw.shape == (k,)
        if k < cap:
            assert float(lk_stderr(lw[: k // 2, None])[0]) <= target
        if 200 < k < cap:
            assert float(lk_stderr(lw[: k // 4, None])[0]) > target


def test_target_results_depend_only_on_the_seed_not_on_other_images() -> None:
    a = log_weights_to_target(SyntheticDraw([0.05, 1.0, 3.0], seed=4), 3, 2000, 0.05)
    b = log_weights_to_target(SyntheticDraw([0.05, 1.0, 3.0], seed=4), 3, 2000, 0.05)
    assert all(torch.equal(x, y) for x, y in zip(a.log_w, b.log_w, strict=True))
    # Image 1's samples are the same whatever image 0 (which stops at once) does.
    c = log_weights_to_target(SyntheticDraw([1.0, 1.0, 3.0], seed=4), 3, 2000, 0.05)
    assert torch.equal(a.log_w[1], c.log_w[1])


def test_repeated_targets_scatter_by_about_the_reported_stderr() -> None:
    target, cap = 0.1, 10_000
    runs = [log_weights_to_target(SyntheticDraw([1.5], seed=s), 1, cap, target) for s in range(60)]
    estimates = torch.tensor([float(iwae_bound(r.log_w[0][:, None])[0]) for r in runs])
    reported = torch.tensor([float(lk_stderr(r.log_w[0][:, None])[0]) for r in runs])
    k_used = torch.cat([r.k_used for r in runs])
    assert bool(((reported <= target) | (k_used == cap)).all())
    assert float((k_used < cap).double().mean()) > 0.9
    assert 0.67 <= float(estimates.std()) / float(reported.median()) <= 1.5


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan, math.inf])
def test_bad_targets_are_refused(target: float) -> None:
    with pytest.raises(ValueError, match="target"):
        log_weights_to_target(SyntheticDraw([1.0], seed=0), 1, 100, target)
