"""The shared model summaries in models/: posterior moments, active units, request noise, the chunk-size policy
and device names (the service and `iwae eval` both call these)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.device import DEVICE_CHOICES, resolve_device
from models.engine import DEFAULT_CHUNK_ROWS, chunk_rows_for, rows_for_budget
from models.networks import IWAE
from models.noise import request_noise, seeded_generator
from models.posterior import (
    ACTIVE_UNIT_THRESHOLD,
    active_unit_variances,
    active_units,
    count_active,
    posterior_moments,
)

SMALL_1L = ModelConfig(x_dim=12, latent_dims=(3,), hidden_dims=((8,),))
SMALL_2L = ModelConfig(x_dim=12, latent_dims=(4, 2), hidden_dims=((8,), (6,)))


def test_bottom_layer_moments_are_the_encoder_outputs(
    make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model = make_model(SMALL_1L)
    x = make_binary(5, 12)
    (layer,) = posterior_moments(model, x)
    w1, b1 = model.q[0].hidden.layers[0].weight, model.q[0].hidden.layers[0].bias
    hidden = torch.tanh(x @ w1.T + b1)
    mean = hidden @ model.q[0].mean.weight.T + model.q[0].mean.bias
    log_std = hidden @ model.q[0].log_std.weight.T + model.q[0].log_std.bias
    assert layer.exact and layer.mean.dtype == torch.float64
    torch.testing.assert_close(layer.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.std, log_std.exp(), rtol=0, atol=1e-12)


def test_upper_layer_moments_match_direct_ancestral_sampling(
    make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    """Law of total variance vs. the plain mean and variance of h_2 drawn through h_1 (float64)."""
    model = make_model(SMALL_2L)
    x = make_binary(3, 12)
    samples = 20_000
    bottom, top = posterior_moments(model, x, generator=torch.Generator().manual_seed(1), samples=samples)
    assert bottom.exact and not top.exact and top.mean.shape == (3, 2)

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        m1, s1 = model.q[0](x)
        h1 = m1 + s1.exp() * torch.randn((samples, *m1.shape), generator=g, dtype=torch.float64)
        m2, s2 = model.q[1](h1)
        h2 = (m2 + s2.exp() * torch.randn(m2.shape, generator=g, dtype=torch.float64)).numpy()
    direct_mean, direct_std = h2.mean(0), h2.std(0)
    # Both are Monte Carlo estimates from independent draws: 6 standard errors of the mean apart at most.
    tol = 6 * direct_std / np.sqrt(samples) * np.sqrt(2)
    assert np.all(np.abs(top.mean.numpy() - direct_mean) < tol)
    assert np.allclose(top.std.numpy(), direct_std, rtol=0.03)


def test_active_unit_variances_are_the_variance_of_the_posterior_means(
    make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model = make_model(SMALL_1L)
    x = make_binary(40, 12, seed=3)
    (a_u,) = active_unit_variances(model, x)
    means = model.q[0](x)[0].detach().numpy()
    assert a_u.dtype == torch.float64 and a_u.device.type == "cpu"
    np.testing.assert_allclose(a_u.numpy(), np.var(means, axis=0, ddof=1), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2 images"):
        active_unit_variances(model, x[:1])


def test_active_unit_variances_of_two_layers_are_seeded(
    make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model = make_model(SMALL_2L)
    x = make_binary(10, 12, seed=4)
    first = active_unit_variances(model, x, generator=torch.Generator().manual_seed(5))
    again = active_unit_variances(model, x, generator=torch.Generator().manual_seed(5))
    assert [a.shape for a in first] == [(4,), (2,)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_a_unit_is_active_strictly_above_the_threshold() -> None:
    assert ACTIVE_UNIT_THRESHOLD == 1e-2  # the paper's value
    a_u = torch.tensor([0.5, 1e-2, 0.0099, 0.011, 0.0], dtype=torch.float64)
    assert active_units(a_u).tolist() == [0, 3]
    assert count_active([a_u, torch.tensor([1e-3, 2e-2])]) == [2, 1]
    assert count_active([a_u], threshold=1e-3) == [4]


def test_request_noise_is_a_function_of_the_seed_alone(make_model: Callable[..., IWAE]) -> None:
    model = make_model(SMALL_2L)
    torch.manual_seed(123)
    a = request_noise(model, 7, 3, seed=42)
    torch.manual_seed(456)  # the global RNG plays no part
    b = request_noise(model, 7, 3, seed=42)
    c = request_noise(model, 7, 3, seed=43)
    assert [n.shape for n in a] == [(7, 3, 4), (7, 3, 2)]
    assert all(n.dtype == torch.float32 and n.device.type == "cpu" for n in a)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    # The contract: one CPU generator seeded with the seed, layers drawn in order.
    g = torch.Generator().manual_seed(42)
    assert torch.equal(a[0], torch.randn(7, 3, 4, generator=g)) and torch.equal(a[1], torch.randn(7, 3, 2, generator=g))


def test_seeded_generator_repeats_its_stream() -> None:
    cpu = torch.device("cpu")
    x = torch.randn(5, generator=seeded_generator(cpu, 9))
    assert torch.equal(x, torch.randn(5, generator=seeded_generator(cpu, 9)))
    assert not torch.equal(x, torch.randn(5, generator=seeded_generator(cpu, 10)))


def test_chunk_rows_policy_caps_cpu_chunks_at_the_cache_size() -> None:
    model = IWAE(ModelConfig.paper(1))
    big = 1 << 30
    assert rows_for_budget(model, big) > DEFAULT_CHUNK_ROWS
    assert chunk_rows_for(model, torch.device("cpu"), big) == DEFAULT_CHUNK_ROWS
    assert chunk_rows_for(model, torch.device("cuda"), big) == rows_for_budget(model, big)
    small = 1 << 20
    assert chunk_rows_for(model, torch.device("cpu"), small) == rows_for_budget(model, small) < DEFAULT_CHUNK_ROWS
    with pytest.raises(ValueError, match="memory_bytes"):
        chunk_rows_for(model, torch.device("cpu"), 0)


def test_resolve_device_names_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEVICE_CHOICES == ("auto", "cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda was asked for but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
