"""The row engine (models/rows.py): log w per (image, sample) row equals the engine's, whatever rows share a
call (float64)."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.engine import engine_log_weights
from models.networks import IWAE
from models.rows import concat_terms, image_terms, job_rows, row_log_weights

TWO_LAYER = ModelConfig(x_dim=37, latent_dims=(5, 3), hidden_dims=((11, 9), (6,)))
ONE_LAYER = ModelConfig(x_dim=48, latent_dims=(4,), hidden_dims=((10,),))


def _model(config: ModelConfig, seed: int) -> IWAE:
    torch.manual_seed(seed)
    mean = torch.rand(config.x_dim, dtype=torch.float64) * 0.4
    return IWAE(config, data_mean=mean).double().eval()


def _images(config: ModelConfig, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, config.x_dim, generator=g, dtype=torch.float64) < 0.3).double()


def _noise(model: IWAE, k: int, n: int, seed: int) -> list[torch.Tensor]:
    return model.draw_noise(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("config", [ONE_LAYER, TWO_LAYER], ids=["1 layer", "2 layers"])
def test_mixed_jobs_in_one_call_equal_each_job_alone(config: ModelConfig) -> None:
    model = _model(config, 0)
    jobs = [(7, 3, 11), (1, 2, 12), (40, 1, 13), (2, 5, 14)]  # (k, images, seed): mixed k, k = 1 included
    xs = [_images(config, n, seed) for _, n, seed in jobs]
    noises = [_noise(model, k, n, seed) for (k, n, seed) in jobs]

    # All jobs' rows in one call, in a scrambled order, with images from a concatenated table.
    terms = concat_terms([image_terms(model, x) for x in xs])
    offsets = torch.tensor([0] + [n for _, n, _ in jobs]).cumsum(0)
    image = torch.cat([off + job_rows(k, n, 0, k * n) for (k, n, _), off in zip(jobs, offsets, strict=False)])
    noise = [
        torch.cat([nz[layer].reshape(-1, nz[layer].shape[-1]) for nz in noises]) for layer in range(config.n_layers)
    ]
    perm = torch.randperm(image.shape[0], generator=torch.Generator().manual_seed(1))
    log_w = torch.empty(image.shape[0], dtype=torch.float64)
    log_w[perm] = row_log_weights(model, terms, image[perm], [e[perm] for e in noise])

    start = 0
    for (k, n, _), x, nz in zip(jobs, xs, noises, strict=True):
        alone = engine_log_weights(model, x, nz)  # [k, n]
        torch.testing.assert_close(log_w[start : start + k * n].view(k, n), alone, rtol=1e-12, atol=1e-10)
        start += k * n


def test_bad_noise_shapes_are_refused() -> None:
    model = _model(ONE_LAYER, 0)
    terms = image_terms(model, _images(ONE_LAYER, 2, 0))
    with pytest.raises(ValueError, match="noise must be"):
        row_log_weights(model, terms, torch.tensor([0, 1]), [torch.zeros(3, 4, dtype=torch.float64)])
