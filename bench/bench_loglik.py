"""Benchmark of the L_k engine against the straightforward computation and against the matmul bound.

One run measures, for the paper's 1-layer architecture by default:

(a) this machine's float32 matrix-multiply rate: a 2048³ matmul after warm-up, best of several (the
    highest rate seen, which makes the bound below the hardest one to get close to), plus the rates of the
    decoder-shaped matmuls [rows, 50]x[50, 200], [rows, 200]x[200, 200], [rows, 200]x[200, 784];
(b) the reference: ``reference_log_weights`` (x expanded to [k, B, D], binary cross-entropy with logits)
    chunked over k, then logsumexp;
(c) the engine: ``engine_log_weights``, then logsumexp;

and prints a markdown table with images/s of both, their ratio, and the engine's fraction of the
matmul-bound limit: the decoder's multiply-adds, ``model.decoder_macs_per_sample()`` x k per image, at the
measured 2048³ rate. The machine may be shared, so (a), (b) and (c) are interleaved repetition by
repetition and medians are reported; compile warm-up is timed separately, before any repetition.

    python bench/bench_loglik.py                      # k=5000, default threads, CPU
    python bench/bench_loglik.py --device cuda --images 100
    python bench/bench_loglik.py --sweep 256,512,1024,2048,4096   # engine images/s per chunk size
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.bounds import iwae_bound  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.engine import DEFAULT_CHUNK_ROWS, engine_log_weights, kernels, reference_log_weights  # noqa: E402
from models.networks import IWAE  # noqa: E402


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_gflops(rows: int, inner: int, cols: int, device: torch.device, repeats: int) -> float:
    """Best float32 rate of [rows, inner] x [inner, cols] over ``repeats`` timings (GFLOP/s)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, inner, generator=gen, device=device)
    b = torch.randn(inner, cols, generator=gen, device=device)
    out = torch.empty(rows, cols, device=device)
    flops = 2.0 * rows * inner * cols
    # Small products are timed in batches so that each timing lasts long enough to be meaningful.
    batch = max(1, int(2e9 / flops))

    def run() -> None:
        for _ in range(batch):
            torch.mm(a, b, out=out)

    run()  # warm-up: first-call allocations, thread pool start
    best = min(timed(run, device) for _ in range(repeats))
    return flops * batch / best / 1e9


def make_problem(
    layers: int, images: int, k: int, device: torch.device, seed: int
) -> tuple[IWAE, torch.Tensor, list[torch.Tensor]]:
    """A freshly initialised paper model, binary images with MNIST-like density, and fixed noise."""
    gen = torch.Generator().manual_seed(seed)
    data_mean = torch.rand(784, generator=gen) * 0.3
    model = IWAE(ModelConfig.paper(layers), data_mean=data_mean).to(device).eval()
    x = (torch.rand(images, 784, generator=gen) < data_mean).float().to(device)
    noise = [n.to(device) for n in model.draw_noise(k, images, generator=gen)]
    return model, x, noise


def reference_lk(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """The straightforward L_k: reference log weights chunked over k (only to fit memory), then logsumexp."""
    k = noise[0].shape[0]
    parts = [reference_log_weights(model, x, [n[s : s + chunk] for n in noise]) for s in range(0, k, chunk)]
    return iwae_bound(torch.cat(parts))


def engine_lk(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], chunk_rows: int) -> torch.Tensor:
    return iwae_bound(engine_log_weights(model, x, noise, chunk_rows=chunk_rows))


def fmt_rate(v: float) -> str:
    return f"{v:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--k", type=int, default=5000, help="importance samples per image (default 5000)")
    parser.add_argument("--images", type=int, default=8, help="images per repetition (one batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--layers", type=int, choices=[1, 2], default=1, help="paper architecture")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (medians reported)")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="engine chunk rows")
    parser.add_argument("--ref-chunk", type=int, default=500, help="reference chunk, samples of k")
    parser.add_argument("--sweep", type=str, default="", help="comma-separated chunk rows: engine only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("k", "images", "repeats", "chunk_rows", "ref_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()

    model, x, noise = make_problem(args.layers, args.images, args.k, device, args.seed)
    macs_per_image = model.decoder_macs_per_sample() * args.k

    # Compile warm-up, once, before anything is timed.
    start = time.perf_counter()
    kern = kernels(device, torch.float32)
    warm_s = time.perf_counter() - start
    with torch.inference_mode():
        engine_lk(model, x[:1], [n[:64, :1] for n in noise], args.chunk_rows)
        start = time.perf_counter()
        engine_lk(model, x, noise, args.chunk_rows)
        sync(device)
        first_call_s = time.perf_counter() - start

    if args.sweep:
        sizes = [int(s) for s in args.sweep.split(",")]
        print(f"| chunk rows | engine images/s (median of {args.repeats}) |")
        print("|---:|---:|")
        times: dict[int, list[float]] = {s: [] for s in sizes}
        for _ in range(args.repeats):
            for s in sizes:
                times[s].append(timed(lambda s=s: engine_lk(model, x, noise, s), device))
        for s in sizes:
            print(f"| {s} | {fmt_rate(args.images / statistics.median(times[s]))} |")
        return 0

    rows = args.chunk_rows
    shapes = [(rows, 50, 200), (rows, 200, 200), (rows, 200, 784)] if args.layers == 1 else []
    square: list[float] = []
    shaped: dict[tuple[int, int, int], list[float]] = {s: [] for s in shapes}
    ref_t: list[float] = []
    eng_t: list[float] = []
    with torch.inference_mode():
        ref_val = reference_lk(model, x, noise, args.ref_chunk)  # warm-up, and the agreement check
        eng_val = engine_lk(model, x, noise, rows)
        for rep in range(args.repeats):
            square.append(matmul_gflops(2048, 2048, 2048, device, repeats=3))
            for s in shapes:
                shaped[s].append(matmul_gflops(*s, device, repeats=3))
            # Alternate which goes first, so that neither always runs right after the matmuls.
            order = [("ref", args.ref_chunk), ("eng", rows)]
            for name, chunk in order if rep % 2 == 0 else order[::-1]:
                if name == "ref":
                    ref_t.append(timed(lambda c=chunk: reference_lk(model, x, noise, c), device))
                else:
                    eng_t.append(timed(lambda c=chunk: engine_lk(model, x, noise, c), device))
    load_after = os.getloadavg()

    gflops = max(square)
    ref_ips = args.images / statistics.median(ref_t)
    eng_ips = args.images / statistics.median(eng_t)
    limit_ips = gflops * 1e9 / (2.0 * macs_per_image)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"L_{args.k}, paper({args.layers}) architecture, {args.images} images per repetition, float32, {name}")
    print(
        f"threads: {threads} (torch default here: {default_threads}); engine kernels: {kern.note}; "
        f"chunk rows {rows}, reference chunk {args.ref_chunk} samples"
    )
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}\n")
    print("| quantity | value |")
    print("|---|---:|")
    print(f"| float32 matmul 2048³, best of {3 * args.repeats} (GFLOP/s) | {fmt_rate(gflops)} |")
    print(f"| same, median of per-repetition bests (GFLOP/s) | {fmt_rate(statistics.median(square))} |")
    for (r, i, c), v in shaped.items():
        print(f"| decoder matmul [{r},{i}]x[{i},{c}], median (GFLOP/s) | {fmt_rate(statistics.median(v))} |")
    print(f"| decoder multiply-adds per image (k x {model.decoder_macs_per_sample():,}) | {macs_per_image:,} |")
    print(f"| matmul-bound limit (images/s) | {fmt_rate(limit_ips)} |")
    print(f"| reference (images/s, median of {args.repeats}) | {fmt_rate(ref_ips)} |")
    print(f"| engine (images/s, median of {args.repeats}) | {fmt_rate(eng_ips)} |")
    print(f"| engine / reference | {eng_ips / ref_ips:.2f}x |")
    print(f"| engine / matmul-bound limit | {100 * eng_ips / limit_ips:.0f}% |")
    print(f"| compile warm-up, once per process (s) | {warm_s:.1f} |")
    print(f"| first engine call after warm-up (s) | {first_call_s:.2f} |")
    print(f"| max \\|L_k engine - L_k reference\\| (nats) | {(eng_val - ref_val).abs().max().item():.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
