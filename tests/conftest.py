"""Shared test fixtures: small, generic helpers only (several test files use them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from models.config import ModelConfig
from models.networks import IWAE


@pytest.fixture(autouse=True)
def _seed_global_rng() -> Iterator[None]:
    """Every test starts from the same global RNG state, so any unseeded draw is still reproducible."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


def build_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float64, data_mean: torch.Tensor | None = None
) -> IWAE:
    """A freshly initialised model with seeded weights, float64 by default (the tests' reference precision)."""
    torch.manual_seed(seed)
    return IWAE(config, data_mean=data_mean).to(dtype)


def random_binary(batch: int, x_dim: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Seeded binary images [batch, x_dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((batch, x_dim), 0.4, dtype=dtype), generator=g)


@pytest.fixture
def make_model() -> Callable[..., IWAE]:
    return build_model


@pytest.fixture
def make_binary() -> Callable[..., torch.Tensor]:
    return random_binary
