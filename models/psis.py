"""Pareto smoothed importance sampling (Vehtari, Simpson, Gelman, Yao & Gabry, JMLR 2024): the k̂ diagnostic.

The largest M importance weights of an image are fitted with a generalized Pareto distribution (GPD); its
shape k̂ says how heavy the weights' right tail is. With k̂ < 1/2 the weights have a finite variance and
the central limit theorem holds; up to k̂ = 0.7 the estimate of the mean is still usable at practical k;
above 0.7 the estimate is dominated by a handful of draws and its error bar cannot be trusted.

This is a port of ArviZ's ``psislw`` (arviz 0.23, ``stats/stats.py``: tail M = ceil(min(k/5, 3 sqrt(k))),
the Zhang & Stephens (2009) empirical-Bayes GPD fit with ArviZ's weakly informative prior on k̂), batched
over images in torch and float64. tests/test_psis.py checks it against ArviZ itself. ArviZ is not a runtime
dependency: it brings pandas and xarray (tens of MB) into the serving image for thirty lines of arithmetic.

Every function takes ``log_w: [k, batch]`` (any float dtype; computed in float64).
"""

from __future__ import annotations

import math

import torch

# Vehtari et al.'s threshold: above it the Monte Carlo estimate (and its standard error) is unreliable.
RELIABLE_K_HAT = 0.7
# ArviZ's fit needs more than 4 tail weights; the tail holds ceil(min(k/5, 3 sqrt k)), so k >= 21.
MIN_TAIL = 5
MIN_K = 21
# ArviZ's prior: b's scale is set by the tail's first quartile / PRIOR_BS; k̂ shrinks towards 1/2 with the
# weight of PRIOR_K pseudo-observations.
PRIOR_BS = 3.0
PRIOR_K = 10.0
# Below log(smallest normal double), exp() underflows: those weights cannot be in the tail.
CUTOFF_MIN = math.log(torch.finfo(torch.float64).tiny)


def tail_length(k: int) -> int:
    """M, the number of largest weights fitted: ceil(min(k / 5, 3 sqrt(k)))."""
    return math.ceil(min(k / 5.0, 3.0 * math.sqrt(k)))


def gpd_fit(tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical-Bayes (Zhang & Stephens) fit of a GPD to exceedances: tail [n, batch], sorted ascending
    along dim 0, all > 0 -> (k̂ [batch], sigma [batch]), with ArviZ's prior on k̂."""
    n = tail.shape[0]
    m_est = 30 + int(n**0.5)
    j = torch.arange(1, m_est + 1, dtype=torch.float64, device=tail.device)
    # A grid over b = -k / sigma, scaled by the tail's first quartile and anchored at its maximum.
    b = (1.0 - torch.sqrt(m_est / (j - 0.5)))[:, None] / (PRIOR_BS * tail[int(n / 4 + 0.5) - 1]) + 1.0 / tail[-1]
    k_grid = torch.log1p(-b[:, None, :] * tail[None]).mean(1)  # [m_est, batch], one op rather than m_est
    profile = n * (torch.log(-(b / k_grid)) - k_grid - 1.0)  # profile log-likelihood at each b
    # Posterior weight of each grid point: 1 / Σ_j exp(profile_j - profile_i), as ArviZ computes it.
    weights = 1.0 / torch.exp(profile[None, :, :] - profile[:, None, :]).sum(1)
    weights = torch.where(weights >= 10 * torch.finfo(torch.float64).eps, weights, 0.0)
    weights = weights / weights.sum(0)
    b_post = (b * weights).sum(0)
    k_post = torch.log1p(-b_post * tail).mean(0)
    sigma = -k_post / b_post
    return (n * k_post + PRIOR_K * 0.5) / (n + PRIOR_K), sigma


def gpd_quantile(p: torch.Tensor, k_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Inverse GPD CDF at probabilities p [n] (in (0, 1)) for shapes and scales [batch]: -> [n, batch]."""
    p = p[:, None]
    tiny = k_hat.abs() < torch.finfo(torch.float64).eps
    safe_k = torch.where(tiny, 1.0, k_hat)
    general = torch.expm1(-safe_k * torch.log1p(-p)) / safe_k
    return sigma * torch.where(tiny, -torch.log1p(-p), general)


def psis(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto-smoothed, self-normalised log weights and the Pareto shape of each image's tail.

    log_w [k, batch] -> (smoothed log w~ [k, batch] (log-softmax: each column log-sums to 0), k̂ [batch]).
    k̂ is +inf where the tail has fewer than ``MIN_TAIL`` distinct weights (always for k < ``MIN_K`` = 21); such
    columns, like those whose fit fails, are returned unsmoothed.
    """
    smoothed, k_hat = _psis(log_w, smooth=True)
    assert smoothed is not None
    return smoothed, k_hat


def _psis(log_w: torch.Tensor, smooth: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """psis(), or with ``smooth`` False only k̂ (the same values: the fit does not depend on the smoothing,
    which is half the work and every /loglik request needs k̂ only)."""
    x = log_w.detach().to(torch.float64)
    k = x.shape[0]
    x = x - x.max(0).values
    k_hat = torch.full(x.shape[1:], math.inf, dtype=torch.float64, device=x.device)
    m = tail_length(k)
    if k < MIN_K or m < MIN_TAIL:
        return (torch.log_softmax(x, 0) if smooth else None), k_hat
    ordered, order = torch.sort(x, dim=0)
    cutoff = ordered[-m - 1].clamp_min(CUTOFF_MIN)
    # Ties at the cutoff, or weights lost below CUTOFF_MIN, shorten the tail: those columns are fitted alone.
    clean = (ordered[-m:] > cutoff).all(0)
    out = x.clone() if smooth else x
    columns = [torch.nonzero(clean).flatten()]
    columns += [c.reshape(1) for c in torch.nonzero(~clean).flatten()]
    for cols in columns:
        if cols.numel() == 0:
            continue
        col_order = order[:, cols]
        tail_log = ordered[:, cols]
        tail_log = tail_log[tail_log[:, 0] > cutoff[cols]] if cols.numel() == 1 else tail_log[-m:]
        if tail_log.shape[0] < MIN_TAIL:
            continue
        if smooth:
            k_hat[cols], out[:, cols] = _smooth(out[:, cols], tail_log, col_order, cutoff[cols])
        else:
            k_hat[cols] = _fit(tail_log, cutoff[cols])[0]
    return (torch.log_softmax(out, 0) if smooth else None), k_hat


def _smooth(
    x: torch.Tensor, tail_log: torch.Tensor, order: torch.Tensor, cutoff: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit and smooth the tail of columns x [k, c] whose n largest log weights, sorted, are tail_log [n, c]
    (x's maximum is 0; ``order`` sorts x ascending): -> (k̂ [c], x with its tail replaced)."""
    n = tail_log.shape[0]
    k_hat, sigma, exp_cut = _fit(tail_log, cutoff)
    probs = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n
    smoothed = torch.log(gpd_quantile(probs, k_hat, sigma) + exp_cut).clamp_max(0.0)  # [n, c]
    ok = torch.isfinite(k_hat) & torch.isfinite(smoothed).all(0)
    x = x.clone()
    x.scatter_(0, order[-n:], torch.where(ok, smoothed, tail_log))
    return k_hat, x


def _fit(tail_log: torch.Tensor, cutoff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k̂ [c] (+inf where the fit fails), sigma [c], exp(cutoff)) of the tails tail_log [n, c] over ``cutoff``."""
    exp_cut = torch.exp(cutoff)
    k_hat, sigma = gpd_fit(torch.exp(tail_log) - exp_cut)
    return torch.where(torch.isnan(k_hat), math.inf, k_hat), sigma, exp_cut


def pareto_k(log_w: torch.Tensor) -> torch.Tensor:
    """The PSIS diagnostic k̂ of each image's weights: [k, batch] -> [batch] float64 (+inf: k too small)."""
    return _psis(log_w, smooth=False)[1]


def reliable(k_hat: torch.Tensor) -> torch.Tensor:
    """Whether the estimate can be trusted: k̂ <= 0.7 (False for +inf and NaN). [batch] -> [batch] bool."""
    return k_hat <= RELIABLE_K_HAT
