"""The training surrogates (models/estimators.py): exact gradient identities for fixed noise, and unbiasedness
of the DReG and STL encoder gradients in expectation, on tiny float64 models."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from models.bounds import elbo, iwae_bound, normalized_weights
from models.config import ModelConfig
from models.estimators import ESTIMATORS, get_surrogate
from models.networks import IWAE

TINY_1LAYER = ModelConfig(x_dim=12, latent_dims=(3,), hidden_dims=((10, 9),))
TINY_2LAYER = ModelConfig(x_dim=12, latent_dims=(4, 3), hidden_dims=((10, 9), (8, 7)))
CONFIGS = pytest.mark.parametrize("config", [TINY_1LAYER, TINY_2LAYER], ids=["1layer", "2layer"])


def fix_noise(model: IWAE, noise: list[torch.Tensor]) -> None:
    """Make every draw of the model's noise return ``noise``, so surrogates and references see the same samples."""

    def draw(k: int, batch: int, *args: object, **kwargs: object) -> list[torch.Tensor]:
        assert [tuple(n.shape[:2]) for n in noise] == [(k, batch)] * len(noise)
        return noise

    model.draw_noise = draw  # type: ignore[method-assign]


def new_noise(model: IWAE, k: int, batch: int, seed: int) -> list[torch.Tensor]:
    return IWAE.draw_noise(model, k, batch, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    # The graph is kept: several tests differentiate one loss with respect to two parameter groups.
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def assert_grads_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for ga, gb in zip(a, b, strict=True):
        scale = max(1.0, float(gb.abs().max()))
        assert torch.allclose(ga, gb, rtol=0, atol=atol * scale), float((ga - gb).abs().max())


def _setup(
    config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor], k: int
) -> tuple[IWAE, torch.Tensor, list[torch.Tensor]]:
    model = make_model(config, seed=1)
    x = make_binary(5, config.x_dim, seed=2)
    noise = new_noise(model, k, x.shape[0], seed=3)
    fix_noise(model, noise)
    return model, x, noise


@CONFIGS
def test_iwae_surrogate_gradient_is_the_gradient_of_lk(
    config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model, x, noise = _setup(config, make_model, make_binary, k=7)
    params = list(model.parameters())
    loss, bound = get_surrogate("iwae")(model, x, 7)
    lk = iwae_bound(model.log_weights(x, 7, noise=noise))
    assert_grads_close(grads(loss, params), grads(-lk.mean(), params))
    assert torch.allclose(bound, lk.detach(), rtol=0, atol=1e-12)
    assert not bound.requires_grad


@CONFIGS
def test_vae_surrogate_gradient_is_the_gradient_of_the_elbo(
    config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model, x, noise = _setup(config, make_model, make_binary, k=4)
    params = list(model.parameters())
    loss, bound = get_surrogate("vae")(model, x, 4)
    ref = elbo(model.log_weights(x, 4, noise=noise))
    assert_grads_close(grads(loss, params), grads(-ref.mean(), params))
    assert torch.allclose(bound, ref.detach(), rtol=0, atol=1e-12)


@CONFIGS
@pytest.mark.parametrize("name", ["iwae", "stl", "dreg"])
def test_importance_weighted_surrogates_return_lk(
    name: str, config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model, x, noise = _setup(config, make_model, make_binary, k=6)
    loss, bound = ESTIMATORS[name](model, x, 6)
    with torch.no_grad():
        expected = iwae_bound(model.log_weights(x, 6, noise=noise))
    assert bound.shape == (x.shape[0],)
    assert torch.allclose(bound, expected, rtol=0, atol=1e-12)
    assert loss.dim() == 0 and loss.requires_grad


@CONFIGS
@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_decoder_gradient_is_unchanged_from_iwae(
    name: str, config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model, x, _ = _setup(config, make_model, make_binary, k=6)
    decoder, encoder = list(model.p.parameters()), list(model.q.parameters())
    loss_iwae, _ = ESTIMATORS["iwae"](model, x, 6)
    loss_other, _ = ESTIMATORS[name](model, x, 6)
    assert_grads_close(grads(loss_other, decoder), grads(loss_iwae, decoder))
    # The encoder gradients are different estimators (equal only in expectation).
    diff = max(
        float((a - b).abs().max()) for a, b in zip(grads(loss_other, encoder), grads(loss_iwae, encoder), strict=True)
    )
    assert diff > 1e-3


def test_weights_are_detached(make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]) -> None:
    model, x, noise = _setup(TINY_1LAYER, make_model, make_binary, k=8)
    params = list(model.parameters())
    loss, _ = get_surrogate("iwae")(model, x, 8)
    log_w = model.log_weights(x, 8, noise=noise)
    # The classic bug: differentiating through the normalised weights too.
    naive = -(normalized_weights(log_w) * log_w).sum(0).mean()
    assert abs((naive - loss).item()) < 1e-12  # same value ...
    got, wrong = grads(loss, params), grads(naive, params)
    gap = max(float((a - b).abs().max()) for a, b in zip(got, wrong, strict=True))
    assert gap > 1e-3  # ... but a different gradient, which this test would catch
    assert_grads_close(got, grads(-iwae_bound(log_w).mean(), params))


def test_unknown_estimator_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'"):
        get_surrogate("reinforce")


# --- expected encoder gradients --------------------------------------------------------------------------------
GRAD_CONFIGS = {
    "1layer": ModelConfig(x_dim=6, latent_dims=(2,), hidden_dims=((5,),)),
    "2layer": ModelConfig(x_dim=6, latent_dims=(3, 2), hidden_dims=((5,), (4,))),
}
REPS = 200  # independent gradient estimates; each averages 20 draws for each of 3 images


def paired_encoder_differences(
    config: ModelConfig, name: str, k: int, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """[REPS, n_encoder_params]: (estimator - IWAE) encoder gradient for the same noise, rep by rep.

    Pairing cancels most of the Monte Carlo noise, so a small bias stands out.
    """
    model = make_model(config, seed=0)
    x = make_binary(3, config.x_dim, seed=1).repeat(20, 1)
    encoder = list(model.q.parameters())
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(REPS):
        noise = IWAE.draw_noise(model, k, x.shape[0], generator=g, dtype=torch.float64)
        fix_noise(model, noise)
        flat = []
        for est in (name, "iwae"):
            loss, _ = ESTIMATORS[est](model, x, k)
            flat.append(torch.cat([t.reshape(-1) for t in grads(loss, encoder)]))
        out.append(flat[0] - flat[1])
    return torch.stack(out)


def max_abs_z(d: torch.Tensor) -> float:
    """Largest |mean / standard error| over parameters. Parameters whose gradient is always zero (weights from a
    pixel that is 0 in every image) have no spread: their differences must be exactly zero."""
    se = d.std(0) / math.sqrt(d.shape[0])
    constant = se == 0
    assert bool((d.mean(0)[constant].abs() < 1e-12).all())
    return float((d.mean(0)[~constant] / se[~constant]).abs().max())


# With ~50 parameters, max |z| > 4.5 has probability < 1e-3 when the estimators agree in expectation.
Z_LIMIT = 4.5


@pytest.mark.parametrize("layers", ["1layer", "2layer"])
@pytest.mark.parametrize("k", [1, 5])
def test_dreg_encoder_gradient_is_unbiased(
    layers: str, k: int, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    d = paired_encoder_differences(GRAD_CONFIGS[layers], "dreg", k, make_model, make_binary)
    assert max_abs_z(d) < Z_LIMIT
    # The two are genuinely different estimators, rep by rep.
    assert float(d.abs().max()) > 1e-3


def test_stl_encoder_gradient_is_unbiased_for_one_sample(
    make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    d = paired_encoder_differences(GRAD_CONFIGS["1layer"], "stl", 1, make_model, make_binary)
    assert max_abs_z(d) < Z_LIMIT
    assert float(d.abs().max()) > 1e-3


def test_stl_encoder_gradient_is_biased_for_several_samples(
    make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    """STL drops Σ w~_i ∂log q(h_i)/∂φ, whose expectation is zero only for k = 1 (Tucker et al. 2018 show STL is
    biased for L_k, k > 1; DReG is the unbiased fix). This also shows the comparison above can detect a bias."""
    d = paired_encoder_differences(GRAD_CONFIGS["1layer"], "stl", 5, make_model, make_binary)
    assert max_abs_z(d) > 10 * Z_LIMIT


def _dreg_two_pass(model: IWAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """DReG written out as two separate terms (the textbook form): decoder term on detached samples, encoder
    term with every parameter detached and squared weights."""
    lat = model.sample_latents(x, k)
    log_p_decoder = model.log_p(x, [h.detach() for h in lat.h])
    w = normalized_weights((log_p_decoder - lat.log_q()).detach())
    log_w_path = model.log_p(x, lat.h, detach_params=True) - model.log_q(x, lat.h, detach_params=True)
    return -(w * log_p_decoder).sum(0).mean() - ((w * w) * log_w_path).sum(0).mean()


@CONFIGS
def test_one_pass_dreg_equals_the_two_term_form_exactly(
    config: ModelConfig, make_model: Callable[..., IWAE], make_binary: Callable[..., torch.Tensor]
) -> None:
    model, x, _ = _setup(config, make_model, make_binary, k=7)
    params = list(model.parameters())
    loss, _ = ESTIMATORS["dreg"](model, x, 7)
    assert_grads_close(grads(loss, params), grads(_dreg_two_pass(model, x, 7), params))
