"""What the per-image statistics cost (`models.engine.bound_stats`: L_k, calibrated stderr, ESS, ELBO, PSIS k̂),
alone and merged, and that merging does not change an image's bits.

The service computes them for every /loglik image; since they are batch-invariant (models/reductions.py) the
scheduler computes them once per k for all the jobs an engine call completed. This prints, for each k, the
CPU time per image when each image is its own call (one request at a time) and when B images share one call
(a merged burst), their ratio, and whether every image's numbers were the same bits both ways.

    python bench/bench_stats.py                       # k = 50, 500, 5000; B = 32; 1 thread
    python bench/bench_stats.py --ks 50 --batch 64 --threads 2

Log-weights are synthetic, shaped like a trained IWAE's (a Gaussian bulk far below 0 with Pareto right tails),
seeded. Times are the thread's CPU time (time.thread_time), best of --repeats rounds: robust to a loaded machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.engine import BoundStats, bound_stats

FIELDS = ("loglik", "stderr", "ess", "elbo", "pareto_k", "reliable")


def log_weights(k: int, batch: int, seed: int) -> torch.Tensor:
    """Synthetic log-weights [k, batch]: per-image scale and offset, heavy right tails."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, batch)) * rng.uniform(0.5, 4.0, batch) - rng.uniform(80, 120, batch)
    x += np.log1p(rng.pareto(rng.uniform(0.6, 3.0, batch), (k, batch)))
    return torch.from_numpy(x)


def cpu_seconds(fn: object, repeats: int, inner: int) -> float:
    """Best over ``repeats`` rounds of the thread CPU time of ``inner`` calls, per call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(inner):
            fn()  # type: ignore[operator]
        best = min(best, (time.thread_time() - start) / inner)
    return best


def same_bits(merged: BoundStats, alone: list[BoundStats]) -> bool:
    for j, one in enumerate(alone):
        for name in FIELDS:
            a, b = getattr(one, name)[0], getattr(merged, name)[j]
            if not (torch.equal(a, b) or (bool(torch.isnan(a)) and bool(torch.isnan(b)))):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="50,500,5000", help="k values (comma-separated)")
    p.add_argument("--batch", type=int, default=32, help="images merged into one call")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=5, help="rounds; the best is kept")
    a = p.parse_args(argv)
    if a.batch < 1 or a.threads < 1 or a.repeats < 1:
        p.error("--batch, --threads and --repeats must be >= 1")
    try:
        ks = [int(v) for v in a.ks.split(",")]
    except ValueError:
        p.error(f"--ks must be comma-separated integers, got {a.ks!r}")
    if any(k < 2 for k in ks):
        p.error("every k must be >= 2")
    torch.set_num_threads(a.threads)
    print(f"bound_stats, {a.threads} torch thread(s), B = {a.batch}, CPU ms per image (best of {a.repeats})")
    print("| k | alone (B calls of 1) | merged (1 call of B) | alone / merged | same bits |")
    print("|---:|---:|---:|---:|---|")
    for k in ks:
        log_w = log_weights(k, a.batch, seed=k)
        columns = [log_w[:, j : j + 1].contiguous() for j in range(a.batch)]
        inner = max(1, 20_000 // (k * a.batch // 50 + 1))
        alone = cpu_seconds(lambda cols=columns: [bound_stats(c) for c in cols], a.repeats, max(1, inner // 8))
        merged = cpu_seconds(lambda lw=log_w: bound_stats(lw), a.repeats, inner)
        bits = same_bits(bound_stats(log_w), [bound_stats(c) for c in columns])
        per_alone, per_merged = alone / a.batch * 1e3, merged / a.batch * 1e3
        print(
            f"| {k} | {per_alone:.3f} | {per_merged:.3f} | {per_alone / per_merged:.1f}× | {'yes' if bits else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
