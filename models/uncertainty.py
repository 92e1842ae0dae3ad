"""A calibrated Monte Carlo standard error for L_k, and L_k to a requested precision.

L_k = log (1/k) Σ w_i. The delta method, sd(w) / (sqrt(k) · mean(w)), assumes the k weights show the spread
of w; importance weights of a trained IWAE are so heavy-tailed that they rarely do (the weights that would
show it are too rare to be among the k), and on real MNIST the delta method's error bars are about half
the real spread at k = 50, 500 and 5000 (bench/calibration.py; docs/service.md has the table).

The estimator here is subsampling with an estimated rate of convergence (Politis, Romano & Wolf,
"Subsampling", 1999, ch. 8; Bertail, Politis & Romano 1999). The k weights are cut into blocks of b samples
and the spread of L_b across blocks measures sd(L_b) directly, in log space, with no assumption on the tail;
it is then carried from b1 = k/10 to k with sd(L_b) ∝ b^-γ:

    stderr(L_k) = sd(L_b1) · (b1 / k)^γ,    γ = (γ_measured + γ_tail) / 2.

- γ_measured = log(sd(L_b2) / sd(L_b1)) / log(b1 / b2) with b2 = b1/10: how fast the spread shrank below b1.
  With heavy tails the decay slows as blocks grow, so this overstates the decay from b1 to k.
- γ_tail = 1 - ξ⁺: a mean of weights with tail shape ξ in (1/2, 1) fluctuates on the scale k^(ξ-1) (stable
  laws). ξ⁺ = k̂ + 0.75 (1 + k̂) / √M is the PSIS tail shape (models/psis.py) fitted to the M largest weights,
  taken three quarters of its standard error (1 + ξ)/√M up: k̂ from the 10 largest of 50 weights often calls
  a tail light that is not, and with k̂ itself the error bars of the images PSIS calls reliable came out
  1.3–1.8x too narrow at k = 50 (docs/service.md, "Measured calibration"). At practical k and for heavy
  tails the fitted k̂ overstates the tail (k̂ > 1 is common although E w = p(x) is finite), and there the
  margin changes nothing: the rate is clipped at 0.

Both are clipped to [0, 1/2] (1/2 is the central limit theorem's rate, and both equal it for light tails).
Either alone was 1.3–2× off on real MNIST; their average was within ~10% in the median (bench/calibration.py
measures all of these). The spread at each block size is averaged over ``PARTITIONS`` fixed partitions of
the samples: they are i.i.d., so any fixed partition is as good as a random one, and the estimate stays a
pure function of log w (same weights, same answer).

Every function takes ``log_w: [k, batch]`` and computes in float64; the ``*_rows`` forms take images in rows
(numpy [batch, k], models/reductions.py), so that an image's standard error has the same bits alone as in any
batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.psis import pareto_k_rows, tail_length
from models.reductions import as_rows, as_tensor, row_log_mean_exp, row_max, row_mean, row_var, tree_sum

# Blocks at the larger size (b1 = k / BLOCKS) and the ratio of the two block sizes (b2 = b1 / SIZE_RATIO).
BLOCKS = 10
SIZE_RATIO = 10
# Partitions of the k samples into blocks whose spreads are averaged (the first is the natural order).
PARTITIONS = 8
# The fastest a standard error can shrink with k (the central limit theorem's rate).
CLT_RATE = 0.5
# The tail shape behind γ_tail: k̂ plus this many of its standard errors (1 + k̂)/√M (chosen on 200-seed dumps).
TAIL_MARGIN = 0.75
# Below this a block's sum of exp(log w - max) has weights near the subnormal range (e^-645): recomputed exactly.
SMALLEST_BLOCK_SUM = 1e-280


def block_sizes(k: int) -> tuple[int, int]:
    """(b1, b2): the two block sizes for k samples; b2 == b1 when k is too small for two (k < 30)."""
    b1 = max(1, k // BLOCKS)
    b2 = max(2, b1 // SIZE_RATIO) if b1 > 2 else b1
    return b1, b2


def _partition(k: int, index: int) -> torch.Tensor:
    """The index-th fixed permutation of range(k) (the identity for index 0)."""
    if index == 0:
        return torch.arange(k)
    return torch.randperm(k, generator=torch.Generator().manual_seed(index))


@functools.lru_cache(maxsize=64)
def _block_indices(k: int, block: int, partitions: int) -> np.ndarray:
    """Columns of the blocks of every partition, [partitions · m · block] (m = k // block). Cached: drawing the
    permutations cost more than the arithmetic for a small k (every request computes this)."""
    m = k // block
    idx = torch.cat([_partition(k, p)[: m * block] for p in range(partitions)]).numpy()
    idx.flags.writeable = False
    return idx


def block_spread(log_w: torch.Tensor, block: int, partitions: int = PARTITIONS) -> torch.Tensor:
    """sd(L_b) for b = ``block``, from the k samples cut into ⌊k / b⌋ disjoint blocks of b, the variance across
    blocks averaged over ``partitions`` fixed partitions: [k, batch] -> [batch] (float64)."""
    return as_tensor(block_spread_rows(as_rows(log_w), block, partitions), log_w)


def block_spread_rows(x: np.ndarray, block: int, partitions: int = PARTITIONS) -> np.ndarray:
    """block_spread of images in rows: x [batch, k] -> [batch]."""
    peak = row_max(x)
    return _block_spread(x, peak, np.exp(x - peak[:, None]), block, partitions)


def _block_spread(x: np.ndarray, peak: np.ndarray, w: np.ndarray, block: int, partitions: int) -> np.ndarray:
    """block_spread_rows given each image's largest log weight, peak [batch], and w = exp(x - peak) [batch, k]:
    one exp per weight, shared by both block sizes, rather than one per weight and partition with a shift per
    block (8x the exps: it was 80% of the statistics' time at k = 5000)."""
    batch, k = x.shape
    m = k // block
    if m < 2:
        raise ValueError(f"need at least two blocks of {block} samples, got k = {k}")
    idx = _block_indices(k, block, partitions)
    sums = tree_sum(w[:, idx].reshape(batch, partitions, m, block))
    with np.errstate(divide="ignore"):
        l_b = np.log(sums) + (peak - math.log(block))[:, None, None]  # [batch, partitions, m]
    # A block whose weights all lie hundreds of nats below the image's largest would lose digits to underflow:
    # such images (only their own values decide) take a shift per block.
    far = np.nonzero((sums < SMALLEST_BLOCK_SUM).any(axis=(1, 2)))[0]
    if far.size:
        l_b[far] = row_log_mean_exp(x[far][:, idx].reshape(far.size, partitions, m, block))
    return np.sqrt(row_mean(row_var(l_b)))


def convergence_rate(sd_b1: torch.Tensor, sd_b2: torch.Tensor, b1: int, b2: int) -> torch.Tensor:
    """γ with sd(L_b) ∝ b^-γ between b2 < b1, clipped to [0, 1/2]; 1/2 where undefined. [batch] -> [batch]."""
    return torch.from_numpy(_convergence_rate(sd_b1.cpu().numpy(), sd_b2.cpu().numpy(), b1, b2)).to(sd_b1.device)


def _convergence_rate(sd_b1: np.ndarray, sd_b2: np.ndarray, b1: int, b2: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.log(sd_b2 / sd_b1) / math.log(b1 / b2)
    return np.clip(np.where(np.isnan(rate), CLT_RATE, rate), 0.0, CLT_RATE)  # ±inf: clipped


def tail_rate(k_hat: torch.Tensor, k: int) -> torch.Tensor:
    """γ = 1 - ξ⁺ (stable-law scaling of a mean of k weights whose tail shape is ξ⁺, k̂ taken TAIL_MARGIN of its
    standard errors up), clipped to [0, 1/2]; 0 where k̂ is undefined (+inf or NaN: too few samples to fit a
    tail). [batch] -> [batch]."""
    return torch.from_numpy(_tail_rate(k_hat.to("cpu", torch.float64).numpy(), k)).to(k_hat.device)


def _tail_rate(k_hat: np.ndarray, k: int) -> np.ndarray:
    rate = 1.0 - (k_hat + TAIL_MARGIN * (1.0 + k_hat) / math.sqrt(tail_length(k)))
    return np.clip(np.where(np.isnan(rate), 0.0, rate), 0.0, CLT_RATE)  # k̂ = +inf: -inf, clipped to 0


def lk_stderr(log_w: torch.Tensor, k_hat: torch.Tensor | None = None) -> torch.Tensor:
    """The calibrated Monte Carlo standard error of L_k (see the module docstring): [k, batch] -> [batch].

    ``k_hat`` is the PSIS k̂ of the same weights [batch], if already computed. NaN for k = 1. For k < 30
    there is one block size only (b1 = max(1, ⌊k/10⌋)) and γ = 1/2.
    """
    given = None if k_hat is None else k_hat.to("cpu", torch.float64).numpy()
    return as_tensor(lk_stderr_rows(as_rows(log_w), given), log_w)


def lk_stderr_rows(x: np.ndarray, k_hat: np.ndarray | None = None) -> np.ndarray:
    """lk_stderr of images in rows: x [batch, k] -> [batch] (k_hat [batch] if already computed)."""
    batch, k = x.shape
    if k < 2:
        return np.full(batch, math.nan)
    b1, b2 = block_sizes(k)
    peak = row_max(x)
    w = np.exp(x - peak[:, None])
    sd_b1 = _block_spread(x, peak, w, b1, PARTITIONS)
    if b2 == b1:
        return sd_b1 * (b1 / k) ** CLT_RATE
    if k_hat is None:
        k_hat = pareto_k_rows(x)
    measured = _convergence_rate(sd_b1, _block_spread(x, peak, w, b2, PARTITIONS), b1, b2)
    return sd_b1 * (b1 / k) ** (0.5 * (measured + _tail_rate(k_hat, k)))


# --- L_k to a requested precision ----------------------------------------------------------------------

# The first chunk of samples per image; each later chunk doubles the total, up to the request's cap.
START_K = 100

DrawLogWeights = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Adaptive:
    """Per image: its log-weights (a list: images stop at different k) and the k each used ([batch])."""

    log_w: list[torch.Tensor]  # each [k_used_i]
    k_used: torch.Tensor


def chunk_schedule(k_max: int, start: int = START_K) -> list[int]:
    """Sizes of the chunks drawn: start, then doubling the running total, the last one stopping at k_max."""
    sizes, total = [], 0
    while total < k_max:
        size = min(k_max - total, max(start, total) if total else start)
        sizes.append(size)
        total += size
    return sizes


def log_weights_to_target(
    draw: DrawLogWeights, batch: int, k_max: int, target: float, start: int = START_K
) -> Adaptive:
    """Draw samples in chunks until each image's ``lk_stderr`` is <= ``target`` or it has ``k_max`` samples.

    An image stops at the total one chunk after the one where it first met the target, if it still meets it
    there (otherwise it goes on): stopping at the first total that meets it would favour runs that had not
    yet drawn any large weight, whose L_k is low and whose stderr is small by luck.

    ``draw(size, images)`` returns the next ``size`` log-weights of the images whose indices are in
    ``images`` (those still short of the target), [size, len(images)]. For results that do not depend on
    when the other images stopped, it must draw every image's noise each time and keep those columns.
    The images still drawing have all received every chunk, so they share one [k, n_active] tensor.
    """
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"target must be a positive number of nats, got {target}")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    finished: dict[int, torch.Tensor] = {}
    active = torch.arange(batch)
    armed = torch.zeros(batch, dtype=torch.bool)
    log_w = torch.empty(0, batch, dtype=torch.float64)
    for size in chunk_schedule(k_max, start):
        log_w = torch.cat([log_w, draw(size, active).to("cpu", torch.float64)])
        met = lk_stderr(log_w) <= target
        # Stop one chunk after the target is first met, if it still is: the samples that end the run were
        # drawn after the decision, so runs that met the target early by luck (no large weight yet, hence a
        # low L_k and a small stderr) do not pull the answers down.
        done = met & armed
        if log_w.shape[0] >= k_max:
            done[:] = True
        armed = met
        for col in torch.nonzero(done).flatten().tolist():
            finished[int(active[col])] = log_w[:, col]
        active, log_w, armed = active[~done], log_w[:, ~done], armed[~done]
        if active.numel() == 0:
            break
    per_image = [finished[i] for i in range(batch)]
    return Adaptive(per_image, torch.tensor([lw.shape[0] for lw in per_image]))
