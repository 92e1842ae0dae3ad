"""The L_k engine's per-row kernel: data term, softplus-sum and noise norms in one compiled pass per chunk,
with its eager twin, the compile-once cache, and the fast in-place tanh (models/engine.py uses them; the
module docstring there explains the arithmetic, docs/engine.md the measurements)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.networks import IWAE

log = logging.getLogger("models.engine")

# Lane width of the pooled-log softplus-sum: one AVX-512 register of float32.
LANES = 16
# A product of n factors in (1, 2] is at most 2**n: keep it far from float32's 2**128.
MAX_POOLED_FACTORS = 100
LOG2_E = 1.0 / math.log(2.0)
# Set IWAE_ENGINE_COMPILE=0 to force the eager kernels (for debugging or when compiling is unwanted).
COMPILE_ENV = "IWAE_ENGINE_COMPILE"


def _softplus_sum_pooled(z: torch.Tensor) -> torch.Tensor:
    """Σ_d softplus(z_d) over the last axis of [R, D], D a multiple of LANES (see the module docstring).

    softplus(z) = max(z, 0) + log(1 + 2^(-|z| log2 e)); the logs are pooled lane-wise, one per LANES-wide
    column of the [R, D / LANES, LANES] view. Written for the compiler, which turns it into one pass with
    vector accumulators; eagerly it would be slower than F.softplus.
    """
    rows, width = z.shape
    z = z.view(rows, width // LANES, LANES)
    relu = z.clamp(min=0).sum(1)
    pooled = (1 + torch.exp2(z.abs() * -LOG2_E)).prod(1)
    return (relu + torch.log(pooled)).sum(-1)


def _row_terms(
    logits: torch.Tensor,
    bias: torch.Tensor,
    a: torch.Tensor,
    wx: torch.Tensor,
    eps: torch.Tensor,
    h_top: torch.Tensor,
    pooled: bool,
) -> torch.Tensor:
    """The per-row part of log w, all rows [R, ·] -> [R]:

    a·(Wᵀx) - Σ_d softplus(logits + bias)   (log p(x | h) less the per-image x·b)
    + ½|eps_1|²                              (-log q(h_1 | x) less the per-image constants)
    - ½|h_top|²                              (log N(h_top; 0, I) less its constant)
    """
    z = logits + bias
    # Not F.softplus: it returns z itself above z = 20, off by up to 2e-9 per pixel (it matters in float64).
    softplus = _softplus_sum_pooled(z) if pooled else torch.logaddexp(z, z.new_zeros(())).sum(-1)
    return (a * wx).sum(-1) - softplus + 0.5 * ((eps * eps).sum(-1) - (h_top * h_top).sum(-1))


def _row_terms_pooled(*args: torch.Tensor) -> torch.Tensor:
    return _row_terms(*args, pooled=True)  # type: ignore[misc]


def _row_terms_plain(*args: torch.Tensor) -> torch.Tensor:
    return _row_terms(*args, pooled=False)  # type: ignore[misc]


RowTerms = Callable[..., torch.Tensor]


def poolable(width: int) -> bool:
    """Whether the pooled-log softplus-sum applies to D = ``width``."""
    return width % LANES == 0 and width // LANES <= MAX_POOLED_FACTORS


@dataclass(frozen=True)
class Kernels:
    """The engine's fused per-row kernel for one (device type, dtype, D)."""

    row_terms: RowTerms
    compiled: bool
    note: str  # why the kernel is eager, or how long compiling took


_KERNELS: dict[tuple[str, torch.dtype, tuple[int, ...]], Kernels] = {}
_KERNEL_LOCK = threading.Lock()


def _widths(model: IWAE) -> tuple[int, int, int, int]:
    """The static widths of the per-row kernel's inputs: D, the decoder's last hidden width, d_1, d_top."""
    cfg = model.config
    return cfg.x_dim, model.p[0].logits.in_features, cfg.latent_dims[0], cfg.latent_dims[-1]


def _own_code(fn: Callable[..., torch.Tensor], tag: str) -> Callable[..., torch.Tensor]:
    """A copy of ``fn`` with its own code object. Dynamo caches compiled graphs per code object, with a
    recompile limit (8) per code object: one copy per architecture keeps a process that serves several
    models from ever reaching it."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compile_row_terms(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> Kernels:
    """torch.compile the per-row kernel for these widths and check it against float64 eager."""
    start = time.perf_counter()
    d_x, d_hidden, d_1, d_top = widths
    fn = _own_code(_row_terms_pooled if poolable(d_x) else _row_terms_plain, "_".join(map(str, widths)))
    compiled = torch.compile(fn, fullgraph=True)
    state = {"failed": False}

    def run(*args: torch.Tensor) -> torch.Tensor:
        # Callers pass contiguous, grad-free plain tensors (see _log_weights_chunked), so the guards only
        # ever see the row count change; it is marked dynamic, the widths stay static so that the compiler
        # vectorises over constants, and one compilation serves every chunk size (R >= 2).
        for t in args:
            if t.dim() == 2:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(*args)

    def row_terms(*args: torch.Tensor) -> torch.Tensor:
        if state["failed"]:
            return _row_terms_plain(*args)
        try:
            return run(*args)
        except Exception as exc:  # a recompile that fails must cost speed, never a result
            log.warning("L_k engine: compiled kernel failed, using the eager kernel from now on: %s", exc)
            state["failed"] = True
            return _row_terms_plain(*args)

    gen = torch.Generator().manual_seed(0)
    for rows in (3, 5):  # the second size must reuse the dynamic-rows graph, not recompile
        shapes = [(rows, d_x), (d_x,), (rows, d_hidden), (rows, d_hidden), (rows, d_1), (rows, d_top)]
        args = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        args[0] = 4 * args[0]
        want = _row_terms_plain(*args)
        got = run(*(t.to(device, dtype) for t in args)).double().cpu()
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"compiled kernel disagrees with eager float64: {got} vs {want}")
    return Kernels(row_terms, True, f"compiled in {time.perf_counter() - start:.1f} s")


def kernels(model: IWAE) -> Kernels:
    """The engine's per-row kernel for ``model`` (its architecture, dtype and device).

    float32 kernels are compiled with torch.compile once per process and architecture, on first use and
    under a lock. That takes seconds: call this at startup to pay it there rather than in the first request.
    Other dtypes, and machines where compiling fails, get the eager kernel: the same sums, more slowly.
    """
    param = model.p[0].logits.weight
    device, dtype, widths = param.device, param.dtype, _widths(model)
    key = (device.type, dtype, widths)
    found = _KERNELS.get(key)
    if found is not None:
        return found
    with _KERNEL_LOCK:
        if key in _KERNELS:
            return _KERNELS[key]
        if os.environ.get(COMPILE_ENV, "1") == "0":
            chosen = Kernels(_row_terms_plain, False, f"eager ({COMPILE_ENV}=0)")
        elif dtype != torch.float32:
            chosen = Kernels(_row_terms_plain, False, f"eager (only float32 is compiled, not {dtype})")
        else:
            try:
                with torch.inference_mode():
                    chosen = _compile_row_terms(device, dtype, widths)
            except Exception as exc:  # any compiler failure must leave a working (slower) engine
                log.warning("L_k engine: torch.compile failed on %s, using the eager kernel: %s", device, exc)
                chosen = Kernels(_row_terms_plain, False, f"eager (compile failed: {type(exc).__name__})")
        _KERNELS[key] = chosen
        return chosen


def tanh_(a: torch.Tensor) -> torch.Tensor:
    """tanh in place: a hidden layer's pre-activations [R, H] -> its activations, the same tensor.

    On CPUs as 2σ(2a) − 1, three in-place passes with torch's vectorised sigmoid: torch's own ``tanh_`` calls
    MKL's VML, which on this AMD EPYC (Zen 4) takes 540 ns per 200-wide row against 120 for these three passes
    (one thread, measured; it was the engine's largest cost after the matmuls). The identity is exact; the
    difference is rounding, ≤ 2e-7 in float32 (near 0, where 2σ − 1 cancels), against tanh_'s 3e-8, far below
    the next matmul's own rounding. GPUs keep ``tanh_``. The engine and the row engine (models/rows.py) both
    use this, so that their numbers agree.
    """
    if a.device.type != "cpu":
        return a.tanh_()
    # 2s - 1 as one pass (add with alpha) rather than mul_ then sub_: 10% less time, the same rounding.
    return torch.add(a.new_full((), -1.0), a.mul_(2).sigmoid_(), alpha=2, out=a)


# --- the engine -------------------------------------------------------------------------------------
