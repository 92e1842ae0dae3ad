"""Benchmark of the L_k engine against the straightforward computation and against the matmul bound.

One run measures, for the paper's 1-layer architecture by default:

(a) this machine's float32 matrix-multiply rate: a 2048³ matmul after warm-up, best of several (the
    highest rate seen, which makes the bound below the hardest one to get close to), plus the rates of the
    decoder-shaped matmuls [rows, 50]x[50, 200], [rows, 200]x[200, 200], [rows, 200]x[200, 784];
(b) the reference: ``reference_log_weights`` (x expanded to [k, B, D], binary cross-entropy with logits)
    chunked over k, then logsumexp, at each of a few chunk sizes (``--ref-chunks``, default 256, 512, 1,024
    and 4,000 rows): the fastest in this run is the *tuned reference* the engine is compared with, so that
    the engine's lead is not just a cache-friendlier chunk size (the best chunk is chosen per column);
(c) the engine: ``engine_log_weights``, then logsumexp; with several torch threads also the engine
    data-parallel (the samples split between as many worker threads, each on one torch thread, as the
    service's engine workers run it: no OpenMP fork/join per op);

and prints a markdown table with images/s of each, the engine's ratio to the tuned reference, and both as a
fraction of the
matmul-bound limit: the decoder's multiply-adds, ``model.decoder_macs_per_sample()`` x k per image, at the
measured 2048³ rate. It also times (d) the decoder's matmuls alone on the same rows (no bias, tanh or
softplus): no float32 implementation can beat that, so reference time / matmuls-alone time is the ceiling on
engine / reference.

The machine may be shared, so (a)-(d) are interleaved repetition by repetition and medians are reported;
every rate is given per wall-clock second and per CPU second of this process (all its threads). With one
thread the CPU-time column is insensitive to other jobs taking turns on the core; with several it counts
OpenMP spin-waiting too. Compile warm-up is timed separately, before any repetition.

    python bench/bench_loglik.py                      # k=5000, default threads, CPU
    python bench/bench_loglik.py --threads 1,2        # one process per thread count, then a summary table
    python bench/bench_loglik.py --device cuda --images 100
    python bench/bench_loglik.py --sweep 256,512,1024,2048,4096   # engine images/s per chunk size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.bounds import iwae_bound
from models.config import ModelConfig
from models.engine import (
    DEFAULT_CHUNK_ROWS,
    engine_log_weights,
    reference_log_weights,
    rows_for_budget,
)
from models.kernels import kernels
from models.networks import IWAE

# Reference chunk sizes tried, in rows: 256-1,024 fit the cache, 4,000 was the bench's old fixed choice.
DEFAULT_REF_CHUNKS = "256,512,1024,4000"


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
    """The straightforward L_k: reference log weights ``chunk`` samples (of every image) at a time, then
    logsumexp. The chunk is only there to bound memory, but it sets the speed: ``chunk`` x B rows of [rows, D]
    temporaries that fit the cache run ~1.4x faster than ones that do not, so the bench tunes it."""
    k = noise[0].shape[0]
    parts = [reference_log_weights(model, x, [n[s : s + chunk] for n in noise]) for s in range(0, k, chunk)]
    return iwae_bound(torch.cat(parts))


def ref_samples(rows: int, images: int) -> int:
    """Samples of k per reference chunk for a chunk of about ``rows`` rows of ``images`` images (at least 1)."""
    return max(1, rows // images)


def engine_lk(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], chunk_rows: int) -> torch.Tensor:
    return iwae_bound(engine_log_weights(model, x, noise, chunk_rows=chunk_rows))


def one_torch_thread() -> None:
    """Worker initialiser: this thread's ops run on one core (OpenMP's and MKL's thread counts are per
    calling thread; the service's engine workers do the same)."""
    torch.set_num_threads(1)


def engine_lk_workers(
    pool: ThreadPoolExecutor, workers: int, model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], chunk_rows: int
) -> torch.Tensor:
    """The engine data-parallel: the k samples split into ``workers`` contiguous ranges, each computed by a
    pool thread with one torch thread, as the service's engine workers run chunks. No OpenMP fork/join per
    op, so a descheduled core delays only its own range. Each row's log w depends only on its image and noise
    (up to float32 rounding where the chunk boundaries move), so the result is the engine's."""
    k = noise[0].shape[0]
    cuts = [k * i // workers for i in range(workers + 1)]
    parts = pool.map(
        lambda i: engine_log_weights(model, x, [n[cuts[i] : cuts[i + 1]] for n in noise], chunk_rows=chunk_rows),
        range(workers),
    )
    return iwae_bound(torch.cat(list(parts)))


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


def parse_sizes(text: str, flag: str, parser: argparse.ArgumentParser) -> list[int]:
    """Comma-separated positive integers."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")
    if not sizes or min(sizes) < 1:
        parser.error(f"{flag} must list integers >= 1, got {text!r}")
    return sizes


def best_chunk(times: dict[int, list[tuple[float, float]]], which: int) -> int:
    """The chunk whose median time in column ``which`` (0 wall clock, 1 CPU) is the lowest; ties go to the
    first listed."""
    return min(times, key=lambda c: statistics.median(t[which] for t in times[c]))


def measure(args: argparse.Namespace, device: torch.device, ref_rows: list[int]) -> dict[str, object]:
    """One interleaved run of every timed quantity (see the module docstring). Rates are images/s (or
    GFLOP/s), each as [per wall-clock second, per CPU second]."""
    model, x, noise = make_problem(args.layers, args.images, args.k, device, args.seed)
    macs_per_image = model.decoder_macs_per_sample() * args.k
    if args.chunk_rows is not None:
        rows = args.chunk_rows
    else:  # GPUs want big chunks (what evaluate_batch and the service use there); CPUs cache-sized ones
        rows = DEFAULT_CHUNK_ROWS if device.type == "cpu" else rows_for_budget(model, 2**30)
    # Reference chunk sizes in samples of k; several row counts may round to the same sample count.
    ref_chunks = sorted({ref_samples(r, args.images) for r in ref_rows})

    # Compile warm-up, once, before anything is timed.
    start = time.perf_counter()
    kern = kernels(model)
    warm_s = time.perf_counter() - start

    shapes = [(rows, 50, 200), (rows, 200, 200), (rows, 200, 784)] if args.layers == 1 else []
    chain = decoder_matmuls(model, rows, args.k * args.images, device)
    square: list[tuple[float, float]] = []
    shaped: dict[tuple[int, int, int], list[tuple[float, float]]] = {s: [] for s in shapes}
    chain_t: list[tuple[float, float]] = []
    ref_t: dict[int, list[tuple[float, float]]] = {c: [] for c in ref_chunks}
    eng_t: list[tuple[float, float]] = []
    # With several torch threads, also the engine as the service runs it: one worker per thread, each on one.
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    pool = ThreadPoolExecutor(workers, initializer=one_torch_thread) if workers > 1 else None
    par_t: list[tuple[float, float]] = []
    with torch.inference_mode():
        ref_val = {c: reference_lk(model, x, noise, c) for c in ref_chunks}  # warm-up, and the agreement check
        eng_val = engine_lk(model, x, noise, rows)
        par_val = eng_val if pool is None else engine_lk_workers(pool, workers, model, x, noise, rows)
        for rep in range(args.repeats):
            square.append(matmul_gflops(2048, 2048, 2048, device, repeats=3))
            for s in shapes:
                shaped[s].append(matmul_gflops(*s, device, repeats=3))
            chain_t.append(timed(chain, device))
            # Rotate the order, so that no variant always runs right after the matmuls or right after another.
            runs: list[tuple[list[tuple[float, float]], Callable[[], object]]] = [
                (ref_t[c], lambda c=c: reference_lk(model, x, noise, c)) for c in ref_chunks
            ]
            runs.append((eng_t, lambda: engine_lk(model, x, noise, rows)))
            if pool is not None:
                runs.append((par_t, lambda: engine_lk_workers(pool, workers, model, x, noise, rows)))
            shift = rep % len(runs)
            for times_list, fn in runs[shift:] + runs[:shift]:
                times_list.append(timed(fn, device))

    if pool is not None:
        pool.shutdown()

    def rate(times: list[tuple[float, float]]) -> list[float]:
        return [args.images / statistics.median(v[i] for v in times) for i in (0, 1)]

    best = [max(v[i] for v in square) for i in (0, 1)]
    # The tuned reference: the best chunk, chosen per column from this run's own medians.
    tuned = [best_chunk(ref_t, i) for i in (0, 1)]
    return {
        "threads": torch.get_num_threads(),
        "kernels": kern.note,
        "warm_s": warm_s,
        "engine_rows": rows,
        "macs_per_sample": model.decoder_macs_per_sample(),
        "square_gflops": best,
        "shaped_gflops": {
            f"[{r},{i}]x[{i},{c}]": [statistics.median(t[j] for t in v) for j in (0, 1)]
            for (r, i, c), v in shaped.items()
        },
        "limit": [g * 1e9 / (2.0 * macs_per_image) for g in best],
        "chain": rate(chain_t),
        "ref_by_chunk": {c: rate(v) for c, v in ref_t.items()},
        "ref_tuned_chunk": tuned,
        "ref": [rate(ref_t[tuned[i]])[i] for i in (0, 1)],
        "eng": rate(eng_t),
        "workers": workers,
        "eng_workers": rate(par_t) if par_t else None,
        "max_abs_diff": max(float((e - v).abs().max()) for v in ref_val.values() for e in (eng_val, par_val)),
    }


def print_report(res: dict[str, Any], args: argparse.Namespace, cpu_ok: bool) -> None:
    """The markdown table of one run."""
    images = args.images

    def row(label: str, values: list[str]) -> None:
        print(f"| {label} | {values[0]} | {values[1] if cpu_ok else 'n/a'} |")

    def pct(a: list[float], b: list[float]) -> list[str]:
        return [f"{100 * a[i] / b[i]:.0f}%" for i in (0, 1)]

    print("| quantity | wall clock | CPU time |")
    print("|---|---:|---:|")
    row(f"float32 matmul 2048³, best of {3 * args.repeats} (GFLOP/s)", [fmt_rate(g) for g in res["square_gflops"]])
    for shape, v in res["shaped_gflops"].items():
        row(f"decoder-shaped matmul {shape}, median (GFLOP/s)", [fmt_rate(g) for g in v])
    row(
        f"matmul-bound limit: k x {res['macs_per_sample']:,} multiply-adds per image (images/s)",
        [fmt_rate(v) for v in res["limit"]],
    )
    row("decoder matmuls alone, no bias/tanh/softplus (images/s)", [fmt_rate(v) for v in res["chain"]])
    for c, v in res["ref_by_chunk"].items():
        row(
            f"reference, chunk {int(c) * images} rows ({c} samples x {images} images) (images/s)",
            [fmt_rate(r) for r in v],
        )
    tuned = res["ref_tuned_chunk"]
    row(
        f"**tuned reference** (best chunk above, median of {args.repeats}) (images/s)",
        [f"{fmt_rate(res['ref'][i])} ({int(tuned[i]) * images} rows)" for i in (0, 1)],
    )
    row(
        f"**engine**, chunk {res['engine_rows']} rows (images/s, median of {args.repeats})",
        [fmt_rate(v) for v in res["eng"]],
    )
    row("**engine / tuned reference**", [f"{res['eng'][i] / res['ref'][i]:.2f}x" for i in (0, 1)])
    row("**engine / matmul-bound limit**", pct(res["eng"], res["limit"]))
    row("tuned reference / matmul-bound limit", pct(res["ref"], res["limit"]))
    row("engine / decoder matmuls alone", pct(res["eng"], res["chain"]))
    if res.get("eng_workers"):
        par, w = res["eng_workers"], res["workers"]
        row(
            f"**engine, {w} workers x 1 torch thread** (images/s, median of {args.repeats})", [fmt_rate(v) for v in par]
        )
        row(f"**engine, {w} workers / tuned reference**", [f"{par[i] / res['ref'][i]:.2f}x" for i in (0, 1)])
        row(f"**engine, {w} workers / matmul-bound limit**", pct(par, res["limit"]))
    row(
        "ceiling on engine / tuned reference (matmuls alone / reference)",
        [f"{res['chain'][i] / res['ref'][i]:.2f}x" for i in (0, 1)],
    )
    print(f"\ncompile warm-up, once per process: {res['warm_s']:.1f} s")
    print(f"max |L_k engine - L_k reference| over the images and reference chunks: {res['max_abs_diff']:.2e} nats")


def print_summary(results: list[dict[str, Any]]) -> None:
    """One table across thread counts (each measured in its own process), the key ratios only."""
    print(
        "| torch threads | limit | tuned reference (chunk rows) | engine | engine / tuned ref | ref / limit "
        "| engine / limit | engine, workers x 1 thread | its / tuned ref | its / limit |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for which, label in ((0, "wall"), (1, "CPU")):
            lim, ref, eng = res["limit"][which], res["ref"][which], res["eng"][which]
            rows = int(res["ref_tuned_chunk"][which]) * res["images"]
            par = res.get("eng_workers")
            tail = (
                f"{fmt_rate(par[which])} | **{par[which] / ref:.2f}x** | **{100 * par[which] / lim:.0f}%** |"
                if par
                else "– | – | – |"
            )
            print(
                f"| {res['threads']} ({label}) | {fmt_rate(lim)} | {fmt_rate(ref)} ({rows}) | {fmt_rate(eng)} | "
                f"**{eng / ref:.2f}x** | {100 * ref / lim:.0f}% | **{100 * eng / lim:.0f}%** | {tail}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--k", type=int, default=5000, help="importance samples per image (default 5000)")
    parser.add_argument("--images", type=int, default=8, help="images per repetition (one batch)")
    parser.add_argument(
        "--threads",
        type=str,
        default=None,
        help="torch threads (default: torch's default); a comma-separated list runs each in its own process "
        "and ends with a summary table",
    )
    parser.add_argument("--layers", type=int, choices=[1, 2], default=1, help="paper architecture")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (medians reported)")
    parser.add_argument(
        "--chunk-rows", type=int, default=None, help=f"engine chunk rows (CPU default {DEFAULT_CHUNK_ROWS}; GPU: 1 GiB)"
    )
    parser.add_argument(
        "--ref-chunks",
        type=str,
        default=DEFAULT_REF_CHUNKS,
        help="reference chunk sizes to try, in rows (rounded down to whole samples of every image); the best "
        f"one in this run is the tuned reference (default {DEFAULT_REF_CHUNKS})",
    )
    parser.add_argument("--sweep", type=str, default="", help="comma-separated chunk rows: engine only")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("k", "images", "repeats", "chunk_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    ref_rows = parse_sizes(args.ref_chunks, "--ref-chunks", parser)
    thread_list = parse_sizes(args.threads, "--threads", parser) if args.threads else []

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if len(thread_list) > 1:
        return run_each_thread_count(argv if argv is not None else sys.argv[1:], thread_list, args)
    default_threads = torch.get_num_threads()
    if thread_list:
        torch.set_num_threads(thread_list[0])
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1) and not args.json:
        print(
            f"note: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other jobs share the CPU, "
            "so absolute rates are low and noisy; the interleaved ratios are the meaningful numbers\n"
        )
    cpu_ok = device.type == "cpu"  # on a GPU the host's CPU time says nothing about the work

    if args.sweep:
        return sweep(args, device, parse_sizes(args.sweep, "--sweep", parser), cpu_ok)

    res = measure(args, device, ref_rows)
    load_after = os.getloadavg()
    res.update(images=args.images, k=args.k, load=[load_before[0], load_after[0]])
    if args.json:
        print(json.dumps(res))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"L_{args.k}, paper({args.layers}) architecture, {args.images} images per repetition, float32, {name}")
    print(
        f"threads: {threads} (torch default here: {default_threads}); engine kernels: {res['kernels']}; "
        f"engine chunk {res['engine_rows']} rows; reference chunks tried: "
        f"{', '.join(f'{int(c) * args.images} rows' for c in res['ref_by_chunk'])}"
    )
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}\n")
    print_report(res, args, cpu_ok)
    return 0


def sweep(args: argparse.Namespace, device: torch.device, sizes: list[int], cpu_ok: bool) -> int:
    """Engine images/s per chunk size, interleaved."""
    model, x, noise = make_problem(args.layers, args.images, args.k, device, args.seed)
    kern = kernels(model)
    print(f"threads: {torch.get_num_threads()}; engine kernels: {kern.note}\n")
    print(f"| chunk rows | engine images/s, wall clock (median of {args.repeats}) | per CPU second |")
    print("|---:|---:|---:|")
    times: dict[int, list[tuple[float, float]]] = {s: [] for s in sizes}
    with torch.inference_mode():
        for s in sizes:
            engine_lk(model, x, noise, s)  # warm-up
        for _ in range(args.repeats):
            for s in sizes:
                times[s].append(timed(lambda s=s: engine_lk(model, x, noise, s), device))
    for s in sizes:
        cols = [args.images / statistics.median(t[i] for t in times[s]) for i in (0, 1)]
        print(f"| {s} | {fmt_rate(cols[0])} | {fmt_rate(cols[1]) if cpu_ok else 'n/a'} |")
    return 0


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` without --threads (either spelling, with its value) and --json: what each per-thread-count
    child gets before its own ``--threads N --json``."""
    base: list[str] = []
    args_iter = iter(argv)
    for a in args_iter:
        if a == "--threads":
            next(args_iter, None)
        elif not a.startswith("--threads=") and a != "--json":
            base.append(a)
    return base


def run_each_thread_count(argv: list[str], thread_list: list[int], args: argparse.Namespace) -> int:
    """Run this script once per thread count, each in a fresh process (the compiled kernel's OpenMP thread
    count is fixed when it is compiled), print each run's table, then a summary."""
    base = child_argv(argv)
    results: list[dict[str, Any]] = []
    for n in thread_list:
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--threads", str(n), "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"the {n}-thread run failed (exit code {proc.returncode})")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        lb, la = res["load"]
        print(
            f"### {n} torch thread(s): engine kernels {res['kernels']}; load average (1 min) before/after {lb:.2f} / {la:.2f}\n"
        )
        print_report(res, args, args.device == "cpu")
        print()
    print(
        f"### Summary: L_{args.k}, paper({args.layers}), {args.images} images per repetition, float32, "
        f"CPU, {os.cpu_count()} cores; medians of {args.repeats} interleaved repetitions per process\n"
    )
    print_summary(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
