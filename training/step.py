"""The training step and the epoch loop around it, made fast (docs/training.md has the measurements).

- The step: the estimator's surrogate, backward, Adam (fused where torch has it). The bottom decoder's
  Bernoulli output runs through the fused layer of models/fused.py (no [k, B, D] temporaries, one compiled
  pass over the logits), which computes exactly the same log p(x | h) and gradients.
- The loop: an epoch's batches are gathered and binarized a block of steps at a time (one call each, the same
  random stream as one call per step), each batch is a view into its block, the learning rate is looked up
  once per step and set only when it changes, and the bound is summed on the device (no sync per step).

Random streams are those of the original per-step loop: per step, the batch's pixels from the binarization
generator, then the noise from torch's global generator; so a training state saved by an earlier version
resumes here, and vice versa.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from models.estimators import Surrogate
from models.fused import output_kernel
from models.networks import IWAE, MLP
from training.datasets import binarize

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-4
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Steps binarized per call: 100 batches of 20 MNIST images are 6 MiB of pixels.
BLOCK_STEPS = 100


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    A k=50 step allocates and frees [k·B, D] blocks of 3 MiB; by default glibc hands them back to the OS and
    every step faults them in again (~750 page faults a step, ~2 ms of a 24 ms step measured). Raising the trim
    and mmap thresholds keeps them for reuse. A no-op (False) where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and ok  # 32 MiB: the most glibc allows


def use_fused_output(model: IWAE) -> str:
    """Route the model's log p(x | h) through the fused output layer and, in training mode, every tanh layer
    through the fused linear + tanh node (models/fused.py); returns which output kernel it got."""
    param = model.p[0].logits.weight
    kernel, note = output_kernel(param.device, param.dtype, model.config.x_dim)
    model.p[0].fused_kernel = kernel
    for module in model.modules():
        if isinstance(module, MLP):
            module.fused_tanh = True
    return note


def make_optimizer(model: IWAE, lr: float) -> torch.optim.Adam:
    """Adam with the paper's betas and eps; torch's fused implementation where the device has one."""
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)


def restore_fast_adam(opt: torch.optim.Adam) -> None:
    """load_state_dict replaces each group's settings with the saved ones (a state written by an earlier
    version says fused=None, foreach=None): put back the implementation chosen by ``make_optimizer``."""
    for group in opt.param_groups:
        group["fused"], group["foreach"] = opt.defaults["fused"], opt.defaults["foreach"]


class TrainStep:
    """One optimisation step on a batch: minimise the surrogate's loss, return its bound [B] (detached)."""

    def __init__(self, model: IWAE, opt: torch.optim.Optimizer, surrogate: Surrogate, k: int) -> None:
        self.model, self.opt, self.surrogate, self.k = model, opt, surrogate, k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        loss, bound = self.surrogate(self.model, x, self.k)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return bound


class BoundSum:
    """The running sum of the steps' mean bounds since the last epoch's log line, kept on the device (no sync
    per step), accumulated in float64 in the order of the original loop's Python floats."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {"bound": 0.0, "steps": 0}
        self.total = torch.tensor(float(saved["bound"]), dtype=torch.float64, device=device)
        self.steps = int(saved["steps"])

    def add(self, bound: torch.Tensor) -> None:
        self.total += bound.mean()
        self.steps += 1

    def as_dict(self) -> dict[str, Any]:
        """The training state's ``sums``: {"bound": float, "steps": int}."""
        return {"bound": float(self.total), "steps": self.steps}

    def mean(self) -> float:
        return float(self.total) / max(1, self.steps)


class EpochBatches:
    """An epoch's batches in permutation order: ``batch(step)`` is [B, D] on the device.

    Batches are gathered (and, for dynamic binarization, binarized) ``block`` steps at a time; each batch is
    a view into its block. torch.bernoulli draws one number per pixel in order, so a block draws exactly what
    one call per step would; ``generator_state(step)`` recovers the generator's state before ``step``'s draws
    (for a checkpoint in the middle of a block) by replaying the block's first steps on a copy.
    """

    def __init__(
        self,
        train_x: torch.Tensor,
        perm: torch.Tensor,
        batch_size: int,
        generator: torch.Generator | None,
        device: torch.device,
        block: int = BLOCK_STEPS,
    ) -> None:
        self.x, self.perm, self.batch_size, self.gen = train_x, perm, batch_size, generator
        self.device, self.block = device, block
        self.start = self.stop = -1  # steps [start, stop) are in the current block, once ``ready``
        self.ready = False
        self.start_state: torch.Tensor | None = None
        self.data = train_x.new_empty(0)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        return self.x[self.perm[start * self.batch_size : stop * self.batch_size]]

    def batch(self, step: int) -> torch.Tensor:
        if not (self.ready and self.start <= step < self.stop):
            if step != self.stop and self.stop != -1:
                raise ValueError(f"batches are drawn in order: step {step} after block [{self.start}, {self.stop})")
            # Position and generator state first: an interrupt while drawing must still know the state
            # before ``step`` (generator_state below).
            state = None if self.gen is None else self.gen.get_state()
            stop = min(self.perm.shape[0] // self.batch_size, step + self.block)
            self.ready, self.start, self.stop, self.start_state = False, step, stop, state
            rows = self._rows(step, stop)
            if self.gen is not None:
                rows = binarize(rows, self.gen)
            self.data, self.ready = rows.to(self.device), True
        offset = (step - self.start) * self.batch_size
        return self.data[offset : offset + self.batch_size]

    def generator_state(self, step: int) -> torch.Tensor | None:
        """The binarization generator's state before ``step``'s draws (None for fixed binarization)."""
        if self.gen is None:
            return None
        if self.start_state is None or (self.ready and step == self.stop):
            return self.gen.get_state()  # nothing drawn yet this epoch, or the whole block drawn
        replay = torch.Generator().manual_seed(0)
        replay.set_state(self.start_state)
        if step > self.start:
            binarize(self._rows(self.start, step), replay)
        return replay.get_state()
