"""The networks (models/networks.py): architecture, initialisation, shapes, sampling and posterior means.
The L_k engine's agreement with the textbook computation is tests/test_engine.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from models.config import ModelConfig
from models.networks import IWAE, MEAN_CLIP

TINY_3LAYER = ModelConfig(x_dim=10, latent_dims=(6, 4, 2), hidden_dims=((9,), (7, 7), (5,)))


def _gaussian(prefix: str, d_in: int, hidden: tuple[int, ...], d_out: int) -> dict[str, tuple[int, ...]]:
    shapes, sizes = {}, (d_in, *hidden)
    for i in range(len(hidden)):
        shapes[f"{prefix}.hidden.layers.{i}.weight"] = (sizes[i + 1], sizes[i])
        shapes[f"{prefix}.hidden.layers.{i}.bias"] = (sizes[i + 1],)
    for head in ("mean", "log_std"):
        shapes[f"{prefix}.{head}.weight"] = (d_out, sizes[-1])
        shapes[f"{prefix}.{head}.bias"] = (d_out,)
    return shapes


def _bernoulli(prefix: str, d_in: int, hidden: tuple[int, ...], d_out: int) -> dict[str, tuple[int, ...]]:
    shapes = {k: v for k, v in _gaussian(prefix, d_in, hidden, 1).items() if ".hidden." in k}
    shapes[f"{prefix}.logits.weight"] = (d_out, hidden[-1])
    shapes[f"{prefix}.logits.bias"] = (d_out,)
    return shapes


# The paper's section 5 architectures, written out layer by layer (nn.Linear weights are [out, in]).
PAPER_1LAYER_SHAPES = {
    **_gaussian("q.0", 784, (200, 200), 50),  # x -> 200 -> 200 -> h(50)
    **_bernoulli("p.0", 50, (200, 200), 784),  # h -> 200 -> 200 -> x
}
PAPER_2LAYER_SHAPES = {
    **_gaussian("q.0", 784, (200, 200), 100),  # x -> 200 -> 200 -> h1(100)
    **_gaussian("q.1", 100, (100, 100), 50),  # h1 -> 100 -> 100 -> h2(50)
    **_bernoulli("p.0", 100, (200, 200), 784),  # h1 -> 200 -> 200 -> x
    **_gaussian("p.1", 50, (100, 100), 100),  # h2 -> 100 -> 100 -> h1(100)
}


def _state_shapes(model: IWAE) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("layers", "shapes", "n_params"),
    # Totals worked out by hand from the layer sizes (weights + biases).
    [(1, PAPER_1LAYER_SHAPES, 425_284), (2, PAPER_2LAYER_SHAPES, 521_084)],
)
def test_paper_architectures(layers: int, shapes: dict[str, tuple[int, ...]], n_params: int) -> None:
    model = IWAE(ModelConfig.paper(layers))
    assert _state_shapes(model) == shapes
    assert sum(math.prod(s) for s in shapes.values()) == n_params
    assert model.n_parameters() == n_params
    decoder_macs = sum(math.prod(s) for k, s in shapes.items() if k.startswith("p.") and k.endswith(".weight"))
    assert model.decoder_macs_per_sample() == decoder_macs


def test_other_sizes_and_input_dims(make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]) -> None:
    cfg = ModelConfig.paper(1, x_dim=100)
    shapes = _state_shapes(IWAE(cfg))
    assert shapes["q.0.hidden.layers.0.weight"] == (200, 100)
    assert shapes["p.0.logits.weight"] == (100, 200)
    model = make_model(TINY_3LAYER)
    assert _state_shapes(model) == {
        **_gaussian("q.0", 10, (9,), 6),
        **_gaussian("q.1", 6, (7, 7), 4),
        **_gaussian("q.2", 4, (5,), 2),
        **_bernoulli("p.0", 6, (9,), 10),
        **_gaussian("p.1", 4, (7, 7), 6),
        **_gaussian("p.2", 2, (5,), 4),
    }
    x = make_binary(3, 10)
    assert model.log_weights(x, 4).shape == (4, 3)
    assert [tuple(h.shape) for h in model.sample_latents(x, 4).h] == [(4, 3, 6), (4, 3, 4), (4, 3, 2)]
    assert model.sample(5).shape == (5, 10)


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="1 or 2 stochastic layers"):
        ModelConfig.paper(3)
    with pytest.raises(ValueError, match="hidden_dims has 1 entries"):
        ModelConfig(latent_dims=(5, 3), hidden_dims=((4,),))
    with pytest.raises(ValueError, match="positive"):
        ModelConfig(x_dim=4, latent_dims=(0,), hidden_dims=((4,),))
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"x_dim": 4, "latent_dims": [2], "hidden_dims": [[3]], "depth": 2})
    cfg = ModelConfig.paper(2, x_dim=30)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_output_bias_is_logit_of_clipped_data_mean() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(784, generator=g, dtype=torch.float64)
    mean[:10] = 0.0  # pixels never on in the training set
    mean[10:20] = 1.0
    mean[20] = 5e-4
    for layers in (1, 2):
        model = IWAE(ModelConfig.paper(layers), data_mean=mean.to(torch.float32))
        clipped = mean.to(torch.float32).to(torch.float64).clamp(MEAN_CLIP, 1 - MEAN_CLIP)
        expected = torch.log(clipped / (1 - clipped))
        bias = model.p[0].logits.bias.detach().to(torch.float64)
        assert torch.allclose(bias, expected, rtol=0, atol=1e-5)
        assert abs(bias[0].item() - math.log(1e-3 / (1 - 1e-3))) < 1e-5
        assert abs(bias[10].item() + math.log(1e-3 / (1 - 1e-3))) < 1e-5
        # Every other bias starts at zero.
        others = [p for n, p in model.named_parameters() if n.endswith("bias") and n != "p.0.logits.bias"]
        assert all(bool((p == 0).all()) for p in others)
    assert bool((IWAE(ModelConfig.paper(1)).p[0].logits.bias == 0).all())
    with pytest.raises(ValueError, match="data_mean has 100 entries, expected 784"):
        IWAE(ModelConfig.paper(1), data_mean=torch.rand(100))


def test_glorot_initialisation() -> None:
    torch.manual_seed(0)
    model = IWAE(ModelConfig.paper(2))
    for name, w in model.named_parameters():
        if not name.endswith("weight"):
            continue
        fan_out, fan_in = w.shape
        var = 2.0 / (fan_in + fan_out)
        assert w.detach().abs().max().item() <= math.sqrt(3.0 * var) + 1e-7, name  # uniform on ±sqrt(6 / (in + out))
        # Sample variance of n uniform draws has relative standard error sqrt(0.8 / n): allow 5 of them.
        rel = abs(w.detach().double().var().item() / var - 1.0)
        assert rel < 5 * math.sqrt(0.8 / w.numel()), (name, rel)


@pytest.mark.parametrize("layers", [1, 2])
def test_log_weights_shape_and_seeding(layers: int, make_model: Callable[..., IWAE]) -> None:
    model = make_model(ModelConfig.paper(layers, x_dim=20))
    x = torch.bernoulli(torch.full((3, 20), 0.3, dtype=torch.float64))
    log_w = model.log_weights(x, 7, generator=torch.Generator().manual_seed(1))
    assert log_w.shape == (7, 3)
    assert bool(torch.isfinite(log_w).all())
    again = model.log_weights(x, 7, generator=torch.Generator().manual_seed(1))
    other = model.log_weights(x, 7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(log_w, again)
    assert not torch.equal(log_w, other)
    # log w = log p(x, h) - log q(h | x) with log q evaluated from h itself (not from the noise shortcut).
    lat = model.sample_latents(x, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(log_w, model.log_p(x, lat.h) - model.log_q(x, lat.h), rtol=0, atol=1e-10)
    assert torch.allclose(lat.log_q(), model.log_q(x, lat.h), rtol=0, atol=1e-10)


@pytest.mark.parametrize("layers", [1, 2])
def test_sample_returns_probabilities_reproducibly(layers: int, make_model: Callable[..., IWAE]) -> None:
    model = make_model(ModelConfig.paper(layers, x_dim=30))
    a = model.sample(16, generator=torch.Generator().manual_seed(4))
    b = model.sample(16, generator=torch.Generator().manual_seed(4))
    c = model.sample(16, generator=torch.Generator().manual_seed(5))
    assert a.shape == (16, 30)
    assert bool(((a >= 0) & (a <= 1)).all())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not a.requires_grad
    # Different latent draws give different images.
    assert float((a[0] - a[1]).abs().max()) > 1e-6


@pytest.mark.parametrize("layers", [1, 2])
def test_posterior_means(layers: int, make_model: Callable[..., IWAE]) -> None:
    cfg = ModelConfig.paper(layers, x_dim=30)
    model = make_model(cfg)
    x = torch.bernoulli(torch.full((5, 30), 0.4, dtype=torch.float64))
    means = model.posterior_means(x, samples=4000, generator=torch.Generator().manual_seed(6))
    assert [tuple(m.shape) for m in means] == [(5, d) for d in cfg.latent_dims]
    with torch.no_grad():
        assert torch.equal(means[0], model.q[0](x)[0])
        if layers == 2:
            # E_q[h2 | x]: the average of h2 over many samples of q(h1 | x) q(h2 | h1) agrees within MC error.
            h2 = model.sample_latents(x, 4000, generator=torch.Generator().manual_seed(7)).h[1]
            se = h2.std(0) / math.sqrt(4000)
            assert bool(((means[1] - h2.mean(0)).abs() < 5 * se + 1e-12).all())
    again = model.posterior_means(x, samples=4000, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(means, again, strict=True))
