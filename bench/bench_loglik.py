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
measured 2048³ rate. It also times (d) the decoder's matmuls alone on the same rows (no bias, tanh or
softplus): no float32 implementation can beat that, so reference time / matmuls-alone time is the ceiling on
engine / reference.

The machine may be shared, so (a)-(d) are interleaved repetition by repetition and medians are reported;
every rate is given per wall-clock second and per CPU second of this process (all its threads). With one
thread the CPU-time column is insensitive to other jobs taking turns on the core; with several it counts
OpenMP spin-waiting too. Compile warm-up is timed separately, before any repetition.

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

from models.bounds import iwae_bound
from models.config import ModelConfig
from models.engine import (
    DEFAULT_CHUNK_ROWS,
    engine_log_weights,
    kernels,
    reference_log_weights,
    rows_for_budget,
)
from models.networks import IWAE


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process, all threads) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_gflops(rows: int, inner: int, cols: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best float32 rates of [rows, inner] x [inner, cols] over ``repeats`` timings: (per wall-clock second,
    per CPU second), GFLOP/s."""
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
    times = [timed(run, device) for _ in range(repeats)]
    return flops * batch / min(t[0] for t in times) / 1e9, flops * batch / min(t[1] for t in times) / 1e9


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


def decoder_matmuls(model: IWAE, rows: int, total_rows: int, device: torch.device) -> Callable[[], None]:
    """Just the decoder's matmuls (no bias, no activation) over ``total_rows`` rows, ``rows`` at a time: the
    floor under any implementation that does the decoder's multiply-adds in float32. Every generative layer
    is its hidden chain followed by its heads (logits, or mean and log-std), each from the last hidden."""
    ops: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (input buffer, Wᵀ, output buffer)
    for layer in model.p:
        linears: list[torch.nn.Linear] = list(layer.hidden.layers)
        below = torch.randn(rows, linears[0].in_features, device=device)
        for lin in linears:
            out = torch.empty(rows, lin.out_features, device=device)
            ops.append((below, lin.weight.detach().t(), out))
            below = out
        heads = [layer.logits] if hasattr(layer, "logits") else [layer.mean, layer.log_std]
        ops += [(below, h.weight.detach().t(), torch.empty(rows, h.out_features, device=device)) for h in heads]
    assert sum(w.numel() for _, w, _ in ops) == model.decoder_macs_per_sample()

    def run() -> None:
        for start in range(0, total_rows, rows):
            r = min(rows, total_rows - start)
            for inp, w, out in ops:
                torch.mm(inp[:r], w, out=out[:r])

    return run


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
    parser.add_argument(
        "--chunk-rows", type=int, default=None, help=f"engine chunk rows (CPU default {DEFAULT_CHUNK_ROWS}; GPU: 1 GiB)"
    )
    parser.add_argument("--ref-chunk", type=int, default=500, help="reference chunk, samples of k")
    parser.add_argument("--sweep", type=str, default="", help="comma-separated chunk rows: engine only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("k", "images", "repeats", "chunk_rows", "ref_chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
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
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"note: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other jobs share the CPU, "
            "so absolute rates are low and noisy; the interleaved ratios are the meaningful numbers\n"
        )

    model, x, noise = make_problem(args.layers, args.images, args.k, device, args.seed)
    macs_per_image = model.decoder_macs_per_sample() * args.k

    if args.chunk_rows is not None:
        rows = args.chunk_rows
    else:  # GPUs want big chunks (what evaluate_batch and the service use there); CPUs cache-sized ones
        rows = DEFAULT_CHUNK_ROWS if device.type == "cpu" else rows_for_budget(model, 2**30)

    # Compile warm-up, once, before anything is timed.
    start = time.perf_counter()
    kern = kernels(model)
    warm_s = time.perf_counter() - start

    cpu_ok = device.type == "cpu"  # on a GPU the host's CPU time says nothing about the work

    def col(values: list[tuple[float, float]], per: float, which: int) -> str:
        """``per`` / median seconds (a rate) of column ``which`` (0 wall clock, 1 CPU time)."""
        if which == 1 and not cpu_ok:
            return "n/a"
        return fmt_rate(per / statistics.median(v[which] for v in values))

    if args.sweep:
        sizes = [int(s) for s in args.sweep.split(",")]
        print(f"threads: {threads}; engine kernels: {kern.note}\n")
        print(f"| chunk rows | engine images/s, wall clock (median of {args.repeats}) | per CPU second |")
        print("|---:|---:|---:|")
        times: dict[int, list[tuple[float, float]]] = {s: [] for s in sizes}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for s in sizes:
                    times[s].append(timed(lambda s=s: engine_lk(model, x, noise, s), device))
        for s in sizes:
            print(f"| {s} | {col(times[s], args.images, 0)} | {col(times[s], args.images, 1)} |")
        return 0

    shapes = [(rows, 50, 200), (rows, 200, 200), (rows, 200, 784)] if args.layers == 1 else []
    chain = decoder_matmuls(model, rows, args.k * args.images, device)
    square: list[tuple[float, float]] = []
    shaped: dict[tuple[int, int, int], list[tuple[float, float]]] = {s: [] for s in shapes}
    chain_t: list[tuple[float, float]] = []
    ref_t: list[tuple[float, float]] = []
    eng_t: list[tuple[float, float]] = []
    with torch.inference_mode():
        ref_val = reference_lk(model, x, noise, args.ref_chunk)  # warm-up, and the agreement check
        eng_val = engine_lk(model, x, noise, rows)
        for rep in range(args.repeats):
            square.append(matmul_gflops(2048, 2048, 2048, device, repeats=3))
            for s in shapes:
                shaped[s].append(matmul_gflops(*s, device, repeats=3))
            chain_t.append(timed(chain, device))
            # Alternate which goes first, so that neither always runs right after the matmuls.
            runs = [
                (ref_t, lambda: reference_lk(model, x, noise, args.ref_chunk)),
                (eng_t, lambda: engine_lk(model, x, noise, rows)),
            ]
            for times_list, fn in runs if rep % 2 == 0 else runs[::-1]:
                times_list.append(timed(fn, device))
    load_after = os.getloadavg()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"L_{args.k}, paper({args.layers}) architecture, {args.images} images per repetition, float32, {name}")
    print(
        f"threads: {threads} (torch default here: {default_threads}); engine kernels: {kern.note}; "
        f"engine chunk {rows} rows, reference chunk {args.ref_chunk} samples x {args.images} images"
    )
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}\n")
    print("| quantity | wall clock | CPU time |")
    print("|---|---:|---:|")
    best = [max(v[i] for v in square) for i in (0, 1)]
    limit = [g * 1e9 / (2.0 * macs_per_image) for g in best]
    rate = {
        "ref": [args.images / statistics.median(v[i] for v in ref_t) for i in (0, 1)],
        "eng": [args.images / statistics.median(v[i] for v in eng_t) for i in (0, 1)],
        "chain": [args.images / statistics.median(v[i] for v in chain_t) for i in (0, 1)],
    }

    def row(label: str, values: list[str]) -> None:
        print(f"| {label} | {values[0]} | {values[1] if cpu_ok else 'n/a'} |")

    row(f"float32 matmul 2048³, best of {3 * args.repeats} (GFLOP/s)", [fmt_rate(g) for g in best])
    for (r, i, c), v in shaped.items():
        row(
            f"decoder-shaped matmul [{r},{i}]x[{i},{c}], median (GFLOP/s)",
            [fmt_rate(statistics.median(t[j] for t in v)) for j in (0, 1)],
        )
    row(
        f"matmul-bound limit: k x {model.decoder_macs_per_sample():,} multiply-adds per image (images/s)",
        [fmt_rate(v) for v in limit],
    )
    row("decoder matmuls alone, no bias/tanh/softplus (images/s)", [fmt_rate(v) for v in rate["chain"]])
    row(f"**reference** (images/s, median of {args.repeats})", [fmt_rate(v) for v in rate["ref"]])
    row(f"**engine** (images/s, median of {args.repeats})", [fmt_rate(v) for v in rate["eng"]])
    row("**engine / reference**", [f"{rate['eng'][i] / rate['ref'][i]:.2f}x" for i in (0, 1)])
    row("**engine / matmul-bound limit**", [f"{100 * rate['eng'][i] / limit[i]:.0f}%" for i in (0, 1)])
    row("engine / decoder matmuls alone", [f"{100 * rate['eng'][i] / rate['chain'][i]:.0f}%" for i in (0, 1)])
    row(
        "ceiling on engine / reference (matmuls alone / reference)",
        [f"{rate['chain'][i] / rate['ref'][i]:.2f}x" for i in (0, 1)],
    )
    print(f"\ncompile warm-up, once per process: {warm_s:.1f} s")
    print(f"max |L_k engine - L_k reference| over the images: {(eng_val - ref_val).abs().max().item():.2e} nats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
