"""The trainer's fused Bernoulli output layer: log p(x | h) and its gradients without [k, B, D] temporaries.

For logits l = W a + b of the bottom decoder (a: its last hidden activation, rows r = (sample, image)):

    log p(x | h) = x·l - Σ_d softplus(l_d) = (Wᵀx)·a + x·b - Σ_d softplus(l_d)

so the data term is a dot product with a per-image [B, H] vector, as in the L_k engine (docs/engine.md). The
gradients follow from ∂/∂l = g_r (x - σ(l)) for an upstream gradient g_r:

    ∂/∂a_r = g_r (Wᵀx - Wᵀσ_r)                  one [R, D] x [D, H] matmul
    ∂/∂W   = xᵀ(Σ_k g a) - Σ_r σ_r (g_r a_r)ᵀ    one [H + 1, R] x [R, D] matmul for both (g scales a, not σ)
    ∂/∂b   = xᵀ(Σ_k g) - Σ_r g_r σ_r

The only pass over the [R, D] block after the forward matmul is one kernel that returns Σ_d softplus per row
and σ(l) (saved for the backward pass), from one sigmoid per pixel: softplus(l) = max(l, 0) - log σ(|l|), with
σ(|l|) = σ(l) for l ≥ 0 and 1 - σ(l) otherwise (in [1/2, 1]). In float32 it is compiled (torch.compile), with
the engine's pooled logs (one log per 49 pixels); other dtypes, or machines where compiling fails, use exact
eager ops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Set IWAE_TRAIN_COMPILE=0 to use the eager kernel (debugging, or where compiling is unwanted).
COMPILE_ENV = "IWAE_TRAIN_COMPILE"

# The pooled-log constants of models/engine.py (which imports the networks, so they cannot be imported here).
LANES = 16
MAX_POOLED_FACTORS = 100

Kernel = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def softplus_sum_sigmoid_eager(logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_d softplus(z_d) [R], σ(z) [R, D]) for z = logits [R, D] + bias [D]. logaddexp, not F.softplus,
    which returns z itself above 20 (off by up to 2e-9 per pixel, visible in float64)."""
    z = logits + bias
    return torch.logaddexp(z, z.new_zeros(())).sum(-1), torch.sigmoid(z)


def _softplus_sum_sigmoid_pooled(logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, written for the compiler: the bias added on the fly (addmm would first copy it into every
    row), one sigmoid per pixel shared by both outputs, logs pooled lane-wise over the [R, D / LANES, LANES]
    view (products of factors σ(|z|) in [1/2, 1], at least 2^-49 for D = 784, as in models/engine.py). The
    compiled sigmoid is faster than the exp2 and division this kernel had (0.54 against 0.75 ms per
    [1000, 784] block on the trainer's CPU), with the same float32 accuracy."""
    z = logits + bias
    rows, width = z.shape
    sig = torch.sigmoid(z)
    sig_abs = torch.where(z >= 0, sig, 1 - sig)
    pooled = sig_abs.view(rows, width // LANES, LANES).prod(1)
    return z.clamp(min=0).sum(-1) - torch.log(pooled).sum(-1), sig


_KERNELS: dict[tuple[str, int], tuple[Kernel, str]] = {}
_LOCK = threading.Lock()


def output_kernel(device: torch.device, dtype: torch.dtype, width: int) -> tuple[Kernel, str]:
    """The softplus-sum + sigmoid kernel for [R, width] blocks, and a note saying which one it is.

    float32 kernels are compiled once per process and (device type, width), checked against float64 eager;
    any failure leaves the eager kernel (the same values, more slowly)."""
    if dtype != torch.float32:
        return softplus_sum_sigmoid_eager, f"eager (only float32 is compiled, not {dtype})"
    if os.environ.get(COMPILE_ENV, "1") == "0":
        return softplus_sum_sigmoid_eager, f"eager ({COMPILE_ENV}=0)"
    if width % LANES or width // LANES > MAX_POOLED_FACTORS:
        return softplus_sum_sigmoid_eager, f"eager (width {width} is not a multiple of {LANES})"
    key = (device.type, width)
    with _LOCK:
        if key not in _KERNELS:
            _KERNELS[key] = _compile(device, width)
        return _KERNELS[key]


def _compile(device: torch.device, width: int) -> tuple[Kernel, str]:
    start = time.perf_counter()
    try:
        compiled = torch.compile(_softplus_sum_sigmoid_pooled, fullgraph=True, dynamic=False)
        state = {"failed": False}

        def kernel(logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not state["failed"]:
                try:
                    torch._dynamo.maybe_mark_dynamic(logits, 0)
                    return compiled(logits, bias)
                except Exception as exc:  # a recompile that fails must cost speed, never a result
                    log.warning("fused output: compiled kernel failed, using the eager one from now on: %s", exc)
                    state["failed"] = True
            return softplus_sum_sigmoid_eager(logits, bias)

        gen = torch.Generator().manual_seed(0)
        for rows in (3, 5):  # the second size must reuse the dynamic-rows graph
            z = 6 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
            bias = torch.randn(width, generator=gen, dtype=torch.float64)
            want = softplus_sum_sigmoid_eager(z, bias)
            got = kernel(z.to(device, torch.float32), bias.to(device, torch.float32))
            for g, w in zip(got, want, strict=True):
                if not torch.allclose(g.double().cpu(), w, rtol=1e-5, atol=1e-4):
                    raise RuntimeError("compiled kernel disagrees with float64 eager")
        if state["failed"]:
            raise RuntimeError("compiled kernel failed on its check")
    except Exception as exc:  # any compiler failure must leave a working (slower) trainer
        log.warning("fused output: torch.compile failed on %s, using the eager kernel: %s", device, exc)
        return softplus_sum_sigmoid_eager, f"eager (compile failed: {type(exc).__name__})"
    return kernel, f"compiled in {time.perf_counter() - start:.1f} s"


class BernoulliOutput(torch.autograd.Function):
    """log p(x | h) for logits = a Wᵀ + b: x [B, D], a [..., B, H] -> [..., B] (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        a: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        kernel: Kernel,
    ) -> torch.Tensor:
        rows_a = a.reshape(-1, a.shape[-1])
        softplus, sig = kernel(rows_a @ weight.t(), bias)
        wx = x @ weight  # [B, H]
        out = (a * wx).sum(-1) + x @ bias - softplus.view(a.shape[:-1])
        ctx.save_for_backward(x, a, weight, sig, wx)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, a, weight, sig, wx = ctx.saved_tensors  # type: ignore[attr-defined]
        batch, width = wx.shape
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        if need[0]:
            raise NotImplementedError("the fused output layer does not differentiate with respect to x")
        grad_a = grad_w = grad_b = None
        if need[1]:
            grad_a = (sig @ weight).view(a.shape).neg_().add_(wx).mul_(g.unsqueeze(-1))
        if need[2] or need[3]:
            # [g a | g]: one [H + 1, R] x [R, D] product gives Σ_r (g_r a_r) σ_rᵀ and Σ_r g_r σ_r together.
            rows = g.numel()
            ga_g = torch.empty(rows, width + 1, dtype=g.dtype, device=g.device)
            torch.mul(a.reshape(rows, width), g.reshape(rows, 1), out=ga_g[:, :width])
            ga_g[:, width] = g.reshape(rows)
            per_image = ga_g.view(-1, batch, width + 1).sum(0)  # [Σ_k g a | Σ_k g]: [B, H + 1]
            # [H + 1, D] = [g a | g]ᵀ σ, not σᵀ [g a | g]: with H + 1 = 201 columns the [D, R] x [R, H + 1]
            # product ran 3.7-3.9 ms against 3.3 ms for this one on the trainer's CPU (same values to the bit).
            both = torch.addmm(per_image.t() @ x, ga_g.t(), sig, alpha=-1)
            grad_w = both[:width].t().contiguous() if need[2] else None
            grad_b = both[width].clone() if need[3] else None
        return None, grad_a, grad_w, grad_b, None


class LinearTanh(torch.autograd.Function):
    """tanh(x Wᵀ + b) for x [..., in] -> [..., out], one autograd node instead of addmm's and tanh's.

    tanh(z) = 2σ(2z) - 1: the factor 2 is folded into the product (addmm with alpha = beta = 2, exact), then
    torch.sigmoid and two cheap in-place passes, all on one buffer. On the trainer's CPU torch.tanh costs
    0.53 ms per [1000, 200] block against 0.14 ms for this; the values differ from torch.tanh by rounding
    (at most ~1.2e-7 in float32, where 2σ(2z) - 1 cancels near z = 0). The backward is autograd's for tanh,
    ∂/∂z = g (1 - y²) (aten::tanh_backward), then the two products of a linear layer."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, rows, weight.t(), beta=2, alpha=2).sigmoid_().mul_(2).sub_(1)
        ctx.save_for_backward(rows, weight, y)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        rows, weight, y = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        gz = torch.ops.aten.tanh_backward(g.reshape(y.shape), y)
        grad_x = (gz @ weight).view(*g.shape[:-1], rows.shape[1]) if need[0] else None
        grad_w = gz.t() @ rows if need[1] else None
        grad_b = gz.sum(0) if need[2] else None
        return grad_x, grad_w, grad_b


def linear_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """tanh(x Wᵀ + b) through ``LinearTanh``: x [..., in] -> [..., out]."""
    return LinearTanh.apply(x, weight, bias)  # type: ignore[no-any-return]


def bernoulli_output_log_prob(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel: Kernel
) -> torch.Tensor:
    """log Bernoulli(x; σ(a Wᵀ + b)) summed over pixels: x [B, D], a [..., B, H] -> [..., B]."""
    return BernoulliOutput.apply(x, a, weight, bias, kernel)  # type: ignore[no-any-return]
