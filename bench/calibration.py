"""Are the reported Monte Carlo standard errors of L_k the real spread? Which images does PSIS flag?

For each image and each k, L_k is estimated with S independent seeds. The empirical standard deviation of
those S estimates is the truth a standard error should report; each candidate estimator reports one
standard error per seed, and the table shows empirical SD / median reported stderr (1 = calibrated, 2 =
error bars half as wide as they should be). An image counts as reliable when the median over seeds of its
PSIS k̂ is <= 0.7. docs/service.md quotes the output.

    PYTHONPATH=. IWAE_DATA_DIR=/work/shared/data python bench/calibration.py --first 40
    PYTHONPATH=. IWAE_DATA_DIR=/work/shared/data python bench/calibration.py --images 1038,1359,...
    PYTHONPATH=. IWAE_DATA_DIR=/work/shared/data python bench/calibration.py --flagged 1000
    PYTHONPATH=. IWAE_DATA_DIR=/work/shared/data python bench/calibration.py --flagged 10000 --ks 5000 --lowest 20

Candidates: ``delta`` (the delta method on the k weights, models/bounds.py, the old estimator), ``batch10``
(L over 10 blocks of k/10 samples, spread / sqrt(10)), ``bootstrap`` (200 resamples of the k weights),
``psis-delta`` (the delta method on Pareto-smoothed weights), and ``subsampling`` (models/uncertainty.py: the
spread of L over blocks of k/10 samples carried to k at the average of a measured and a tail-shape rate; the
one the service reports) with ``sub-measured`` and ``sub-tail``, the same with only one of the two rates.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.bounds import iwae_bound, iwae_bound_stderr, log_mean_exp
from models.engine import engine_log_weights
from models.kernels import kernels
from models.psis import RELIABLE_K_HAT, pareto_k, psis
from models.uncertainty import block_sizes, block_spread, convergence_rate, lk_stderr, tail_rate
from training.checkpoints import load_checkpoint
from training.datasets import binarize, load_dataset

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "zoo" / "mnist-iwae-k50-1l.safetensors"
BOOTSTRAP_RESAMPLES = 200


def batch_means(log_w: torch.Tensor, blocks: int = 10) -> torch.Tensor:
    """sd of L over ``blocks`` disjoint blocks, / sqrt(blocks) (the CLT scaling): [k, B] -> [B]."""
    k, batch = log_w.shape
    b = k // blocks
    l_b = log_mean_exp(log_w[: b * blocks].reshape(blocks, b, batch), dim=1)
    return l_b.std(0) / math.sqrt(blocks)


def bootstrap(log_w: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES) -> torch.Tensor:
    """sd of L_k over resamples (with replacement) of the k weights: [k, B] -> [B]."""
    k, batch = log_w.shape
    w = torch.softmax(log_w, 0)  # L_k* - L_k = log Σ_i w~_{idx_i}
    gen = torch.Generator().manual_seed(0)
    out = torch.empty(resamples, batch, dtype=torch.float64)
    for r in range(resamples):
        out[r] = torch.log(w[torch.randint(0, k, (k,), generator=gen)].sum(0))
    return out.std(0)


def psis_delta(log_w: torch.Tensor) -> torch.Tensor:
    """The delta method on the Pareto-smoothed weights: [k, B] -> [B]."""
    return iwae_bound_stderr(psis(log_w)[0])


def subsampling_one_rate(log_w: torch.Tensor, which: str) -> torch.Tensor:
    """The subsampling estimator with only one of its two rates (``measured`` or ``tail``): [k, B] -> [B]."""
    k = log_w.shape[0]
    b1, b2 = block_sizes(k)
    sd_b1 = block_spread(log_w, b1)
    if which == "tail":
        return sd_b1 * (b1 / k) ** tail_rate(pareto_k(log_w), k)
    return sd_b1 * (b1 / k) ** convergence_rate(sd_b1, block_spread(log_w, b2), b1, b2)


ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "delta": iwae_bound_stderr,
    "batch10": batch_means,
    "bootstrap": bootstrap,
    "psis-delta": psis_delta,
    "sub-measured": lambda log_w: subsampling_one_rate(log_w, "measured"),
    "sub-tail": lambda log_w: subsampling_one_rate(log_w, "tail"),
    "subsampling": lk_stderr,
}


def test_images(indices: list[int], seed: int = 0) -> torch.Tensor:
    """MNIST test images, binarized once with ``seed`` (as `iwae eval` does): [len(indices), 784]."""
    x = load_dataset("mnist").test
    return binarize(x, torch.Generator().manual_seed(seed))[indices]


def log_weights(model: torch.nn.Module, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The service's draw for (images, k, seed), in float64: [k, B]."""
    noise = model.draw_noise(k, x.shape[0], generator=torch.Generator().manual_seed(seed))  # type: ignore[operator]
    return engine_log_weights(model, x, noise).double()  # type: ignore[arg-type]


def calibrate(
    model: torch.nn.Module, x: torch.Tensor, k: int, seeds: int, names: list[str], seed_base: int = 1000
) -> dict:
    """Per image: empirical SD of L_k over seeds (seed_base, seed_base + 1, ...), median reported stderr per
    estimator, median k̂; also the per-seed L_k and reported stderrs [seeds, images] for intervals."""
    lk = torch.empty(seeds, x.shape[0], dtype=torch.float64)
    k_hat = torch.empty_like(lk)
    reported = {n: torch.empty_like(lk) for n in names}
    for s in range(seeds):
        log_w = log_weights(model, x, k, seed_base + s)
        lk[s], k_hat[s] = iwae_bound(log_w), pareto_k(log_w)
        for n in names:
            reported[n][s] = ESTIMATORS[n](log_w)
    emp = lk.std(0)
    return {
        "empirical_sd": emp,
        "median_k_hat": k_hat.median(0).values,
        "ratio": {n: emp / r.median(0).values for n, r in reported.items()},
        "lk": lk,
        "reported": reported,
    }


def ratio_interval(
    lk: torch.Tensor, reported: torch.Tensor, draws: int = 2000, level: float = 0.9
) -> tuple[float, float]:
    """Bootstrap interval of one image's SD / median stderr over its seeds (lk, reported: [seeds]): how much
    the ratio itself moves with the draw of seeds (a heavy-tailed image's SD over 30 seeds is noisy)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, lk.shape[0], (draws, lk.shape[0]), generator=g)
    ratios = lk[idx].std(1) / reported[idx].median(1).values
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=ratios.dtype))
    return float(lo), float(hi)


def _summary(ratio: torch.Tensor) -> str:
    if ratio.numel() == 0:
        return "–"
    return f"{ratio.median():.2f} [{ratio.min():.2f}, {ratio.max():.2f}]"


def flagged_fraction(
    model: torch.nn.Module, n: int, ks: list[int], lowest: int = 0, batch: int = 100
) -> dict[int, float]:
    """Fraction of the first n test images with k̂ > 0.7 at each k (one draw, seed 7 + first index); with
    ``lowest``, also print the indices of the images with the lowest k̂ (the candidates for --images)."""
    x = test_images(list(range(n)))
    out = {}
    for k in ks:
        k_hat = torch.cat([pareto_k(log_weights(model, x[i : i + batch], k, 7 + i)) for i in range(0, n, batch)])
        out[k] = float((k_hat > RELIABLE_K_HAT).double().mean())
        print(f"k={k}: {100 * out[k]:.2f}% of {n} test images have k̂ > {RELIABLE_K_HAT}", flush=True)
        if lowest:
            order = torch.argsort(k_hat)[:lowest].tolist()
            print(f"k={k}: the {lowest} lowest k̂: --images {','.join(map(str, order))}", flush=True)
            print("  their k̂: " + ", ".join(f"{float(k_hat[i]):.3f}" for i in order), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--first", type=int, default=0, help="the first N test images")
    p.add_argument("--images", default="", help="comma-separated test image indices")
    p.add_argument("--ks", default="50,500,5000")
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    p.add_argument("--flagged", type=int, default=0, help="instead: fraction flagged among the first N images")
    p.add_argument("--lowest", type=int, default=0, help="with --flagged: print the N images with the lowest k̂")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the per-image numbers here")
    p.add_argument("--seed-base", type=int, default=1000, help="seeds used: seed-base, seed-base + 1, ...")
    p.add_argument(
        "--per-image",
        action="store_true",
        help="also print each image's ratio for the reported estimator (subsampling) with a bootstrap 90%% "
        "interval over its seeds",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _, _ = load_checkpoint(a.ckpt)
    kernels(model)
    ks = [int(k) for k in a.ks.split(",")]
    if a.flagged:
        flagged_fraction(model, a.flagged, ks, a.lowest)
        return
    indices = [int(i) for i in a.images.split(",")] if a.images else list(range(a.first))
    names = a.estimators.split(",")
    x = test_images(indices)
    print(f"{a.ckpt.name}, {len(indices)} test images, {a.seeds} seeds; empirical SD / median reported stderr:")
    print("median [min, max] over images; 'reliable': images whose median k̂ <= 0.7\n")
    print("| k | images (reliable) | " + " | ".join(f"{n}: all | {n}: reliable" for n in names) + " |")
    print("|---" * (2 + 2 * len(names)) + "|")
    dump = {"images": indices, "seeds": a.seeds, "k": {}}
    for k in ks:
        start = time.perf_counter()
        res = calibrate(model, x, k, a.seeds, names, a.seed_base)
        ok = res["median_k_hat"] <= RELIABLE_K_HAT
        cells = [f"{_summary(res['ratio'][n])} | {_summary(res['ratio'][n][ok])}" for n in names]
        print(f"| {k} | {len(indices)} ({int(ok.sum())}) | " + " | ".join(cells) + " |", flush=True)
        dump["k"][k] = {
            "seconds": round(time.perf_counter() - start, 1),
            "empirical_sd": res["empirical_sd"].tolist(),
            "median_k_hat": res["median_k_hat"].tolist(),
            "ratio": {n: r.tolist() for n, r in res["ratio"].items()},
        }
        if a.per_image and "subsampling" in names:
            for j, index in enumerate(indices):
                lo, hi = ratio_interval(res["lk"][:, j], res["reported"]["subsampling"][:, j])
                verdict = "reliable" if bool(ok[j]) else "unreliable"
                print(
                    f"  k={k} image {index}: median k̂ {float(res['median_k_hat'][j]):.2f} ({verdict}), "
                    f"SD / median stderr {float(res['ratio']['subsampling'][j]):.2f}, bootstrap 90% [{lo:.2f}, {hi:.2f}]"
                )
    if a.json:
        a.json.write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
