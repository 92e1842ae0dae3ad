"""The reported standard error of L_k is the real spread across seeds, on shipped models and real MNIST test
images (bench/calibration.py is the full measurement; docs/service.md, "Measured calibration", has its tables).

Two checks, 30 seeds each (SD of L_k across the seeds / median reported stderr, per image):
- The default model on the first 8 test images, at k = 50 and 5000. Its weights are heavy-tailed for every
  test image (no image of 3,000 scanned has a median k̂ <= 0.7: docs/service.md), so the check is the
  issue's band [0.67, 1.5] in the median over images, no image's error bar more than 2x too narrow or 2.5x
  too wide, and the old estimator (the delta method) too narrow in the median.
- The issue's per-image band on the images PSIS calls reliable: the shipped IWAE k=5 at k = 50, on 13 of its
  lowest-k̂ test images (12 of them reliable over the 30 seeds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.bounds import iwae_bound_stderr
from models.engine import bound_stats, engine_log_weights
from models.noise import request_noise
from training.checkpoints import load_checkpoint
from training.datasets import binarize, data_dir, load_dataset

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
SEEDS = 30
BAND = (0.67, 1.5)  # empirical SD / median reported stderr
# The IWAE k=5's images with the lowest k̂ in a one-draw scan of the first 2,000 test images at k = 5000.
LOW_KHAT_IMAGES = [1038, 1835, 135, 735, 1753, 314, 1097, 649, 1305, 393, 1812, 521, 682]


def _spread(name: str, images: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: SD across seeds / median reported stderr, the same for the delta method, median k̂."""
    if not any((data_dir() / "mnist").glob("t10k-images*")):
        pytest.skip("real MNIST not in the data dir (set IWAE_DATA_DIR)")
    model, _, _ = load_checkpoint(ZOO / f"{name}.safetensors")
    x = binarize(load_dataset("mnist").test, torch.Generator().manual_seed(0))[images]
    n = x.shape[0]
    lk, stderr, delta, k_hat = (torch.empty(SEEDS, n, dtype=torch.float64) for _ in range(4))
    for seed in range(SEEDS):
        log_w = engine_log_weights(model, x, request_noise(model, k, n, seed))  # type: ignore[arg-type]
        stats = bound_stats(log_w)
        lk[seed], stderr[seed], k_hat[seed] = stats.loglik, stats.stderr, stats.pareto_k
        delta[seed] = iwae_bound_stderr(log_w.double())
    empirical = lk.std(0)
    return empirical / stderr.median(0).values, empirical / delta.median(0).values, k_hat.median(0).values


@pytest.mark.slow
@pytest.mark.parametrize("k", [50, 5000])
def test_default_model_stderr_is_the_spread_across_seeds_in_the_median(k: int) -> None:
    ratio, delta_ratio, _ = _spread("mnist-iwae-k50-1l", list(range(8)), k)
    print(f"k={k}: SD / median stderr per image {[round(float(r), 2) for r in ratio]}")
    lo, hi = BAND
    assert lo <= float(ratio.median()) <= hi, ratio
    assert bool(((ratio >= 0.4) & (ratio <= 2.0)).all()), ratio
    # The old estimator fails this very check: its error bars are far too narrow.
    assert float(delta_ratio.median()) > hi, delta_ratio


@pytest.mark.slow
def test_reliable_images_meet_the_band_one_by_one() -> None:
    ratio, _, k_hat = _spread("mnist-iwae-k5-1l", LOW_KHAT_IMAGES, 50)
    reliable = k_hat <= 0.7
    print(f"SD / median stderr {[round(float(r), 2) for r in ratio]}, reliable {reliable.tolist()}")
    assert int(reliable.sum()) >= 5, k_hat  # the minimum number of reliable images
    lo, hi = BAND
    assert bool(((ratio[reliable] >= lo) & (ratio[reliable] <= hi)).all()), (ratio, reliable)
