"""The L_k engine: log importance weights for large k, fast and within a memory budget.

L_5000 over MNIST's test set is 50 million decoder passes, the hot path of evaluation and of the service.
The engine computes exactly what ``reference_log_weights`` computes, reorganised (docs/engine.md explains
each step and has the measurements):

- log p(x | h) = x·l - Σ_d softplus(l_d) with l = W a + b, and x·(W a) = (Wᵀx)·a: the data term becomes a
  dot product with a [B, H] vector computed once per image; no expanded copy of x exists;
- after the last matmul, one compiled kernel per chunk does all the per-row work (data term, softplus-sum,
  noise norms). Its softplus-sum pools the logs: softplus(z) = max(z, 0) + log(1 + e^-|z|) and
  Σ_d log(1 + e^-|z_d|) = Σ_lanes log Π (1 + e^-|z|) over 16 lanes of 49 factors, each in (1, 2], so one
  exp per pixel and one log per 49 pixels, and no product can overflow;
- hidden layers are a matmul into a preallocated buffer plus an in-place tanh (on CPUs as 2σ(2a) − 1, 4.5x
  faster than MKL's tanh on AMD); every buffer is allocated once per call and reused by every chunk;
- samples are processed in chunks of rows (and large batches in groups of images), so memory stays within
  budget whatever k and B are;
- log q uses the noise directly ((h - mean)/std == eps), and the first encoder layer runs once per image.

Without a working torch.compile (or for dtypes other than float32) an eager kernel computes the same sums.
Randomness comes in as explicit noise tensors, so results depend only on (image, noise), never on which
other images share a batch or on the chunk size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.distributions import LOG_2PI, gaussian_log_prob, std_normal_log_prob
from models.kernels import _row_terms_plain, kernels, tanh_
from models.networks import IWAE
from models.psis import RELIABLE_K_HAT, pareto_k_rows
from models.reductions import as_rows, as_tensor, row_logsumexp, row_mean
from models.uncertainty import lk_stderr_rows

log = logging.getLogger(__name__)

BYTES_PER_FLOAT = 4
# Rows (sample, image pairs) per chunk: big enough that the matmuls run near the machine's peak and the
# per-chunk overheads (about a dozen op dispatches, OpenMP fork/joins and one compiled call, ~50 µs) stay a
# few percent, small enough that the [rows, D] logits block (6 MiB) stays in the L3 cache. Measured flat
# between 1024 and 2048 rows on one thread; 2048 halves the fork/joins, which matters when the cores are
# shared with other jobs (bench/bench_loglik.py --sweep measures it).
DEFAULT_CHUNK_ROWS = 2048


def rows_for_budget(model: IWAE, memory_bytes: int, itemsize: int = BYTES_PER_FLOAT) -> int:
    """How many (sample, image) rows of activations fit in ``memory_bytes``.

    Per row the engine holds the logits block and, at the eager kernel's peak, two temporaries of the same
    width (the compiled kernel needs none), the bottom decoder's hidden activations, a copy of Wᵀx, and the
    samples, noise products and (for deeper models) the upper layers' means, log-stds and hidden
    activations. tests/test_engine.py measures the peak and checks it against this bound. The noise and
    log w themselves, k·B·(Σd_l + 1) floats, are the caller's and not included.
    """
    if memory_bytes < 1:
        raise ValueError(f"memory_bytes must be positive, got {memory_bytes}")
    if itemsize < 1:
        raise ValueError(f"itemsize must be positive, got {itemsize}")
    return max(1, memory_bytes // (row_floats(model) * itemsize))


def chunk_rows_for(model: IWAE, device: torch.device, memory_bytes: int, itemsize: int = BYTES_PER_FLOAT) -> int:
    """The one chunk-size policy: rows within the memory budget and, on CPUs, no more than the cache-sized
    ``DEFAULT_CHUNK_ROWS`` (larger chunks spill the [rows, D] block out of cache and run no faster there)."""
    rows = rows_for_budget(model, memory_bytes, itemsize)
    return rows if device.type == "cuda" else min(rows, DEFAULT_CHUNK_ROWS)


def row_floats(model: IWAE) -> int:
    """Floats of working memory per (sample, image) row (see ``rows_for_budget``)."""
    cfg = model.config
    hidden = sum(sum(h) for h in cfg.hidden_dims)
    return 3 * cfg.x_dim + 2 * hidden + model.p[0].logits.in_features + 6 * sum(cfg.latent_dims)


# --- kernels -----------------------------------------------------------------------------------------


def _check_inputs(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], chunk_rows: int) -> int:
    """Validate shapes, dtypes and devices; return k."""
    cfg = model.config
    if x.dim() != 2 or x.shape[1] != cfg.x_dim:
        raise ValueError(f"x must be [batch, {cfg.x_dim}], got {list(x.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if len(noise) != cfg.n_layers:
        raise ValueError(f"noise must have one tensor per stochastic layer ({cfg.n_layers}), got {len(noise)}")
    k = noise[0].shape[0] if noise[0].dim() == 3 else -1
    for layer, (eps, d) in enumerate(zip(noise, cfg.latent_dims, strict=True)):
        if eps.dim() != 3 or eps.shape[0] != k or eps.shape[1:] != (x.shape[0], d):
            raise ValueError(
                f"noise[{layer}] must be [k, {x.shape[0]}, {d}] with the same k for every layer, got {list(eps.shape)}"
            )
    if k < 1:
        raise ValueError("noise must hold at least one sample (k >= 1)")
    param = model.p[0].logits.weight
    for name, t in [("x", x), *((f"noise[{i}]", e) for i, e in enumerate(noise))]:
        if t.dtype != param.dtype or t.device != param.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but the model is {param.dtype} on {param.device}")
    return k


@torch.inference_mode()
def engine_log_weights(
    model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """log w for given noise: x [B, D], noise [k, B, d_l] per layer -> log_w [k, B].

    At most ``chunk_rows`` (sample, image) rows are processed at once; batches larger than that are split
    into groups of images, and each image's results depend only on its own x and noise.
    """
    k = _check_inputs(model, x, noise, chunk_rows)
    batch = x.shape[0]
    if batch > chunk_rows:
        log_w = torch.empty(k, batch, dtype=x.dtype, device=x.device)
        for i in range(0, batch, chunk_rows):
            j = min(batch, i + chunk_rows)
            log_w[:, i:j] = _log_weights_chunked(model, x[i:j], [e[:, i:j] for e in noise], 1)
        return log_w
    return _log_weights_chunked(model, x, noise, max(1, chunk_rows // batch))


def upper_layers(
    model: IWAE, h1: torch.Tensor, eps: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The samples of every layer from h_1 [..., d_1] and the noise of the layers above (eps[l]: [..., d_l]),
    and the upper layers' terms of log w (their log p(h_l | h_{l+1}) − log q(h_{l+1} | h_l) up to constants;
    None for one layer). Shared by the chunked engine and the row engine (models/rows.py)."""
    hs, upper = [h1], None
    for layer, e in zip(model.q[1:], eps[1:], strict=True):
        mean, log_std = layer(hs[-1])
        hs.append(torch.addcmul(mean, torch.exp(log_std), e))
        term = 0.5 * (e * e).sum(-1) + log_std.sum(-1)
        upper = term if upper is None else upper + term
    for layer_idx in range(1, model.config.n_layers):
        mean, log_std = model.p[layer_idx](hs[layer_idx])
        upper = upper + gaussian_log_prob(hs[layer_idx - 1], mean, log_std)  # type: ignore[operator]
    return hs, upper


def _log_weights_chunked(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """engine_log_weights for ``chunk`` samples of every image at a time."""
    cfg = model.config
    k, batch = noise[0].shape[:2]
    chunk = min(chunk, k)
    rows = chunk * batch
    kern = kernels(model)
    # The compiled kernel specialises on a row count of 1; such tiny chunks gain nothing from it anyway.
    row_terms = kern.row_terms if rows >= 2 else _row_terms_plain

    # Per image, once: the bottom encoder layer and the decoder's data-term pieces.
    q0_mean, q0_log_std = model.q[0](x)
    q0_std = torch.exp(q0_log_std)
    decoder = model.p[0]
    out = decoder.logits
    # x·(W a + b) = (Wᵀx)·a + x·b; Wᵀx is repeated once per sample of a chunk (rows are sample-major).
    wx_rows = (x @ out.weight).repeat(chunk, 1)
    # Per image: the constants of log w: x·b, Σ log std_1, and log q's and log p(h_top)'s normalisers.
    const = x @ out.bias + q0_log_std.sum(-1) + 0.5 * (sum(cfg.latent_dims) - cfg.latent_dims[-1]) * LOG_2PI

    hidden: list[nn.Linear] = list(decoder.hidden.layers)  # type: ignore[arg-type]
    weights_t = [lin.weight.t() for lin in hidden]
    out_t = out.weight.t()
    # Every input of the compiled kernel is an inference tensor made here (guards check tensor type and
    # dispatch keys: a Parameter, or a tensor made outside inference mode, would cost a recompile).
    out_bias = out.bias.detach().clone()
    new = {"dtype": x.dtype, "device": x.device}
    h_buf = torch.empty(chunk, batch, cfg.latent_dims[0], **new)
    eps_buf = torch.empty(chunk, batch, cfg.latent_dims[0], **new)  # the caller's noise may be anything
    hid_bufs = [torch.empty(rows, lin.out_features, **new) for lin in hidden]
    logits_buf = torch.empty(rows, cfg.x_dim, **new)

    log_w = torch.empty(k, batch, **new)
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        c, r = stop - start, (stop - start) * batch
        eps = [e[start:stop] for e in noise]
        hs, upper = upper_layers(model, torch.addcmul(q0_mean, q0_std, eps[0], out=h_buf[:c]), eps)  # h_1: [c, B, d_1]
        # Bottom decoder: matmuls into preallocated buffers, in-place bias + tanh, one fused pass at the end.
        a = hs[0].view(r, -1)
        for lin, w_t, buf in zip(hidden, weights_t, hid_bufs, strict=True):
            a = tanh_(torch.addmm(lin.bias, a, w_t, out=buf[:r]))
        logits = torch.mm(a, out_t, out=logits_buf[:r])
        e_1 = eps_buf[:c].copy_(eps[0]).view(r, -1)
        h_top = hs[-1].reshape(r, -1)  # made here: contiguous, an inference tensor
        terms = row_terms(logits, out_bias, a, wx_rows[:r], e_1, h_top)
        torch.add(terms.view(c, batch), const, out=log_w[start:stop])
        if upper is not None:
            log_w[start:stop] += upper
    return log_w


def reference_log_weights(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """The straightforward computation the engine is checked against: expand x to [k, B, D] and take
    binary cross-entropy with logits. x [B, D], noise [k, B, d_l] -> [k, B]."""
    with torch.inference_mode():
        lat = model.sample_latents(x, noise[0].shape[0], noise=noise)
        log_p = std_normal_log_prob(lat.h[-1])
        for layer_idx in range(1, model.config.n_layers):
            mean, log_std = model.p[layer_idx](lat.h[layer_idx])
            log_p = log_p + gaussian_log_prob(lat.h[layer_idx - 1], mean, log_std)
        logits = model.p[0](lat.h[0])
        x_k = x.expand(logits.shape)
        log_px = -F.binary_cross_entropy_with_logits(logits, x_k, reduction="none").sum(-1)
        return log_p + log_px - lat.log_q()


@dataclass
class BoundStats:
    """Per-image results of one k-sample evaluation, all [B] float64 (reliable: bool)."""

    loglik: torch.Tensor  # L_k
    stderr: torch.Tensor  # calibrated Monte Carlo standard error of L_k (models/uncertainty.py), float64
    ess: torch.Tensor  # effective sample size of the normalised weights
    elbo: torch.Tensor  # ELBO from the same samples
    pareto_k: torch.Tensor  # PSIS k̂ of the weights' tail (models/psis.py), float64; +inf for k < 21
    reliable: torch.Tensor  # bool: pareto_k <= 0.7, i.e. loglik and stderr can be trusted


def bound_stats(log_w: torch.Tensor) -> BoundStats:
    """Summaries of log_w [k, B], in float64. Batch-invariant: each image's numbers are the same bits whatever
    other images share the call (models/reductions.py), so merged requests get what they get alone."""
    x = as_rows(log_w)
    k_hat = pareto_k_rows(x)
    log_total = row_logsumexp(x)
    log_norm = x - log_total[:, None]  # log w~, the normalised weights
    cols = (
        log_total - math.log(x.shape[1]),  # L_k
        lk_stderr_rows(x, k_hat),
        np.exp(-row_logsumexp(2.0 * log_norm)),  # Kish's ESS, 1 / Σ w~²
        row_mean(x),
        k_hat,
    )
    return BoundStats(*(as_tensor(c, log_w) for c in cols), as_tensor(k_hat <= RELIABLE_K_HAT, log_w))


def evaluate_batch(
    model: IWAE,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    memory_bytes: int = 256 * 2**20,
) -> BoundStats:
    """L_k, its standard error, ESS and ELBO for a batch of images with freshly drawn noise.

    ``memory_bytes`` bounds the engine's working set (the chunk); the noise itself, k·B·Σd_l floats, and
    log w, k·B floats, come on top.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    noise = model.draw_noise(k, x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    chunk_rows = chunk_rows_for(model, x.device, memory_bytes, x.element_size())
    log_w = engine_log_weights(model, x, noise, chunk_rows=chunk_rows)
    return bound_stats(log_w)
