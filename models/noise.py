"""The determinism contract: which noise a (k, n, seed) request gets, shared by the service and `iwae eval`."""

from __future__ import annotations

import torch

from models.networks import IWAE


def request_noise(model: IWAE, k: int, n: int, seed: int) -> list[torch.Tensor]:
    """Standard normal noise [k, n, d_l] per layer, float32, drawn on the CPU from a generator seeded with
    ``seed`` (so the answer for a seed does not depend on the device that computes it)."""
    return model.draw_noise(k, n, generator=torch.Generator().manual_seed(seed))


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)
