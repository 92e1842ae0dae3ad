"""Pareto smoothed importance sampling (Vehtari, Simpson, Gelman, Yao & Gabry, JMLR 2024): the k̂ diagnostic.

The largest M importance weights of an image are fitted with a generalized Pareto distribution (GPD); its
shape k̂ says how heavy the weights' right tail is. With k̂ < 1/2 the weights have a finite variance and
the central limit theorem holds; up to k̂ = 0.7 the estimate of the mean is still usable at practical k;
above 0.7 the estimate is dominated by a handful of draws and its error bar cannot be trusted.

This is a port of ArviZ's ``psislw`` (arviz 0.23, ``stats/stats.py``: tail M = ceil(min(k/5, 3 sqrt(k))),
the Zhang & Stephens (2009) empirical-Bayes GPD fit with ArviZ's weakly informative prior on k̂), batched
over images and float64. tests/test_psis.py checks it against ArviZ itself. ArviZ is not a runtime
dependency: it brings pandas and xarray (tens of MB) into the serving image for thirty lines of arithmetic.

The public functions take ``log_w: [k, batch]`` tensors (any float dtype and device) and return float64
tensors. Inside, each image is a row of a numpy array ([batch, k]) reduced with models/reductions.py, so an
image's k̂ has the same bits alone as in any batch (the service merges requests and must not change them).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.reductions import as_rows, as_tensor, row_logsumexp, row_mean, tree_sum

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
CUTOFF_MIN = math.log(np.finfo(np.float64).tiny)
EPS = float(np.finfo(np.float64).eps)


def tail_length(k: int) -> int:
    """M, the number of largest weights fitted: ceil(min(k / 5, 3 sqrt(k)))."""
    return math.ceil(min(k / 5.0, 3.0 * math.sqrt(k)))


def gpd_fit(tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical-Bayes (Zhang & Stephens) fit of a GPD to exceedances: tail [c, n], each row sorted
    ascending, all > 0 -> (k̂ [c], sigma [c]), with ArviZ's prior on k̂."""
    n = tail.shape[-1]
    m_est = 30 + int(n**0.5)
    j = np.arange(1, m_est + 1, dtype=np.float64)
    # A grid over b = -k / sigma, scaled by the tail's first quartile and anchored at its maximum: [c, m_est].
    b = (1.0 - np.sqrt(m_est / (j - 0.5))) / (PRIOR_BS * tail[:, int(n / 4 + 0.5) - 1, None]) + 1.0 / tail[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate tail: NaN k̂, reported as +inf
        k_grid = row_mean(np.log1p(-b[:, :, None] * tail[:, None, :]))  # [c, m_est]
        profile = n * (np.log(-(b / k_grid)) - k_grid - 1.0)  # profile log-likelihood at each b
        # Posterior weight of each grid point: 1 / Σ_j exp(profile_j - profile_i), as ArviZ computes it.
        weights = 1.0 / tree_sum(np.exp(profile[:, None, :] - profile[:, :, None]))
        weights = np.where(weights >= 10 * EPS, weights, 0.0)
        weights = weights / tree_sum(weights)[:, None]
        b_post = tree_sum(b * weights)
        k_post = row_mean(np.log1p(-b_post[:, None] * tail))
        sigma = -k_post / b_post
    return (n * k_post + PRIOR_K * 0.5) / (n + PRIOR_K), sigma


def gpd_quantile(p: np.ndarray, k_hat: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Inverse GPD CDF at probabilities p [n] (in (0, 1)) for shapes and scales [c]: -> [c, n]."""
    k_hat, sigma = k_hat[:, None], sigma[:, None]
    tiny = np.abs(k_hat) < EPS
    safe_k = np.where(tiny, 1.0, k_hat)
    general = np.expm1(-safe_k * np.log1p(-p)) / safe_k
    return sigma * np.where(tiny, -np.log1p(-p), general)


def psis(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto-smoothed, self-normalised log weights and the Pareto shape of each image's tail.

    log_w [k, batch] -> (smoothed log w~ [k, batch] (log-softmax: each column log-sums to 0), k̂ [batch]).
    k̂ is +inf where the tail has fewer than ``MIN_TAIL`` distinct weights (always for k < ``MIN_K`` = 21); such
    columns, like those whose fit fails, are returned unsmoothed.
    """
    x = as_rows(log_w)
    x = x - x.max(-1, keepdims=True)
    k_hat = np.full(x.shape[0], math.inf)
    for rows, tail_log, cutoff in _tails(x):
        k_hat[rows], x[rows] = _smooth(x[rows], tail_log, cutoff)
    return as_tensor((x - row_logsumexp(x)[:, None]).T, log_w), as_tensor(k_hat, log_w)


def pareto_k(log_w: torch.Tensor) -> torch.Tensor:
    """The PSIS diagnostic k̂ of each image's weights: [k, batch] -> [batch] float64 (+inf: k too small)."""
    return as_tensor(pareto_k_rows(as_rows(log_w)), log_w)


def pareto_k_rows(x: np.ndarray) -> np.ndarray:
    """pareto_k of images in rows: x [batch, k] float64 -> [batch] (the same k̂ as psis; no smoothing)."""
    x = x - x.max(-1, keepdims=True)
    k_hat = np.full(x.shape[0], math.inf)
    for rows, tail_log, cutoff in _tails(x):
        k_hat[rows] = _fit(tail_log, cutoff)[0]
    return k_hat


def reliable(k_hat: torch.Tensor) -> torch.Tensor:
    """Whether the estimate can be trusted: k̂ <= 0.7 (False for +inf and NaN). [batch] -> [batch] bool."""
    return k_hat <= RELIABLE_K_HAT


def _tails(x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The tails to fit of images x [batch, k] (each row's maximum 0): (rows [c], their tails' log weights,
    sorted [c, n], their cutoffs [c]). Rows whose top M weights all exceed the cutoff are fitted together;
    ties at the cutoff, or weights lost below CUTOFF_MIN, shorten a row's tail: those are fitted alone."""
    k = x.shape[1]
    m = tail_length(k)
    if k < MIN_K or m < MIN_TAIL:
        return []
    ordered = np.sort(x, axis=-1)
    cutoff = np.maximum(ordered[:, -m - 1], CUTOFF_MIN)
    clean = (ordered[:, -m:] > cutoff[:, None]).all(-1)
    rows = np.nonzero(clean)[0]
    out = [(rows, ordered[rows, -m:], cutoff[rows])] if rows.size else []
    for r in np.nonzero(~clean)[0]:
        tail_log = ordered[r][ordered[r] > cutoff[r]]
        if tail_log.size >= MIN_TAIL:
            out.append((np.array([r]), tail_log[None], cutoff[r : r + 1]))
    return out


def _smooth(x: np.ndarray, tail_log: np.ndarray, cutoff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit and smooth the tails of rows x [c, k] whose n largest log weights, sorted, are tail_log [c, n]:
    -> (k̂ [c], x with each tail replaced by the fitted GPD's quantiles)."""
    n = tail_log.shape[-1]
    k_hat, sigma, exp_cut = _fit(tail_log, cutoff)
    probs = (np.arange(n, dtype=np.float64) + 0.5) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        smoothed = np.minimum(np.log(gpd_quantile(probs, k_hat, sigma) + exp_cut[:, None]), 0.0)  # [c, n]
    ok = np.isfinite(k_hat) & np.isfinite(smoothed).all(-1)
    x = x.copy()
    order = np.argsort(x, axis=-1, kind="stable")[:, -n:]
    np.put_along_axis(x, order, np.where(ok[:, None], smoothed, tail_log), axis=-1)
    return k_hat, x


def _fit(tail_log: np.ndarray, cutoff: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k̂ [c] (+inf where the fit fails), sigma [c], exp(cutoff)) of the tails tail_log [c, n] over ``cutoff``."""
    exp_cut = np.exp(cutoff)
    k_hat, sigma = gpd_fit(np.exp(tail_log) - exp_cut[:, None])
    return np.where(np.isnan(k_hat), math.inf, k_hat), sigma, exp_cut
