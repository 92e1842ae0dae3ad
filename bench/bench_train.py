"""Benchmark of a training epoch against a straightforward training step and against the matmul bound.

One run measures, for IWAE k=50, IWAE k=5 and VAE k=1 at batch 20 (the paper's 1-layer architecture by
default), interleaved repetition by repetition (medians reported):

(a) the matmul bound: every matrix product of one training step at its real shapes and layouts, timed
    alone (forward; and backward's two products per layer: the gradient of the input and of the weights).
    Their FLOPs over that time is this machine's matmul rate at the training shapes, and one over it is the
    FLOP-bound limit on steps/s: no float32 implementation that does these products can be faster;
(b) the reference: a training step written plainly here: x expanded to [k, B, D], binary cross-entropy
    with logits, logsumexp (IWAE) or the mean (VAE), autograd, torch.optim.Adam with its defaults;
(c) ours: ``training.train.train`` itself, for one epoch of ``--steps`` batches (loop included: batches,
    binarization, schedule, the step, the running bound, the end-of-epoch checkpoint and a validation pass
    over 20 images at k=1), after a warm-up run that pays torch.compile.

It prints steps/s of each (per wall-clock second and per CPU second of this process: with one thread the
CPU column is insensitive to other jobs taking turns on the core), ours / reference and ours / limit.
``--compare-tree DIR`` also times (c) with the package imported from another checkout (e.g. an export of
the previous version), in a subprocess after this run's repetitions.

    python bench/bench_train.py                      # 1 thread, CPU
    python bench/bench_train.py --threads 2 --steps 100
    python bench/bench_train.py --compare-tree /tmp/old-iwae-serve
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Which checkout's package to time: this one, or (the --compare-tree subprocess) IWAE_BENCH_TREE.
sys.path.insert(0, os.environ.get("IWAE_BENCH_TREE") or str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.networks import IWAE, MLP
from training.datasets import Dataset, load_dataset
from training.train import TrainConfig, train

if not os.environ.get("IWAE_BENCH_TREE"):  # only this checkout has the pieces that --ablation takes apart
    from models.estimators import get_surrogate
    from models.fused import output_kernel, softplus_sum_sigmoid_eager
    from training.step import ADAM_BETAS, ADAM_EPS, TrainStep, keep_freed_memory, make_optimizer

CASES = [("iwae", 50), ("iwae", 5), ("vae", 1)]
LOG_2PI = math.log(2 * math.pi)
Timing = tuple[float, float]  # (wall-clock seconds, CPU seconds of this process)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Timing:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


# --- (a) the matmul bound ---------------------------------------------------------------------------


def step_linears(model: IWAE, k: int, batch: int) -> list[tuple[int, int, int, bool]]:
    """(rows, in, out, input needs a gradient) of every linear layer in one training step. The bottom
    encoder runs once per image; every other layer runs on each of the k samples of each image."""
    layers = []
    for idx, part in enumerate([*model.q, *model.p]):
        rows = batch if idx == 0 else k * batch
        for m in part.modules():
            if isinstance(m, torch.nn.Linear):
                layers.append((rows, m.in_features, m.out_features, not (idx == 0 and m is part.hidden.layers[0])))
    return layers


def step_flops(model: IWAE, k: int, batch: int) -> float:
    """Multiply-adds x 2 of forward and backward: per layer rows·in·out forward, as much again for the weight
    gradient, and again for the input gradient (not for the data's own layer: x needs no gradient)."""
    return sum(2.0 * r * i * o * (3 if grad_in else 2) for r, i, o, grad_in in step_linears(model, k, batch))


def matmul_chain(model: IWAE, k: int, batch: int, device: torch.device) -> Callable[[], None]:
    """The step's products alone, at their shapes and in autograd's layouts (weights [out, in])."""
    ops: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    for rows, d_in, d_out, grad_in in step_linears(model, k, batch):
        a, w, g = rand(rows, d_in), rand(d_out, d_in), rand(rows, d_out)
        ops.append((a, w.t(), torch.empty(rows, d_out, device=device)))  # forward
        ops.append((g.t(), a, torch.empty(d_out, d_in, device=device)))  # weight gradient
        if grad_in:
            ops.append((g, w, torch.empty(rows, d_in, device=device)))  # input gradient

    def run() -> None:
        for a, b, out in ops:
            torch.mm(a, b, out=out)

    return run


# --- (b) the reference step -------------------------------------------------------------------------


def gaussian(h: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((h - mean) / torch.exp(log_std)) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)


def reference_loss(model: IWAE, x: torch.Tensor, noise: list[torch.Tensor], objective: str) -> torch.Tensor:
    """-L_k (iwae) or -ELBO (vae), averaged over the batch, computed the textbook way."""
    below, hs, log_q = x, [], 0.0
    for layer, eps in zip(model.q, noise, strict=True):
        mean, log_std = layer(below)
        h = mean + torch.exp(log_std) * eps
        log_q = log_q + gaussian(h, mean, log_std)
        hs.append(h)
        below = h
    log_p = (-0.5 * hs[-1] ** 2 - 0.5 * LOG_2PI).sum(-1)
    for idx in range(1, len(hs)):
        mean, log_std = model.p[idx](hs[idx])
        log_p = log_p + gaussian(hs[idx - 1], mean, log_std)
    logits = model.p[0](hs[0])
    log_p = log_p - F.binary_cross_entropy_with_logits(logits, x.expand(logits.shape), reduction="none").sum(-1)
    log_w = log_p - log_q
    if objective == "vae":
        return -log_w.mean()
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])).mean()


def reference_steps(model: IWAE, batches: torch.Tensor, k: int, objective: str) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-4)

    def run() -> None:
        for x in batches:
            noise = [torch.randn(k, x.shape[0], d, device=x.device) for d in model.config.latent_dims]
            loss = reference_loss(model, x, noise, objective)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return run


# --- (c) our training loop --------------------------------------------------------------------------


def bench_data(images: int, seed: int = 0) -> Dataset:
    """MNIST's first ``images`` training images when it is on disk, else random intensities with MNIST's
    density; a 20-image validation set (validation is not what is timed)."""
    try:
        real = load_dataset("mnist")
        train_x, mean = real.train[:images], real.train[:images].mean(0)
    except Exception:  # no data: synthetic intensities
        gen = torch.Generator().manual_seed(seed)
        train_x = torch.rand(images, 784, generator=gen) * (torch.rand(784, generator=gen) < 0.2)
        mean = train_x.mean(0)
    return Dataset("mnist", train_x, train_x[:20], train_x[:20], "dynamic", mean, "bench")


def our_epoch(data: Dataset, objective: str, k: int, layers: int, device: str, out: Path) -> None:
    cfg = TrainConfig(
        out=out, objective=objective, k=k, layers=layers, epochs=1, schedule="constant", val_k=1, progress=False
    )
    cfg.device, cfg.checkpoint_minutes = device, 1e9
    train(cfg, data)


def measure(args: argparse.Namespace, objective: str, k: int, ours_only: bool = False) -> dict[str, list[Timing]]:
    """Per-step (wall, CPU) seconds of the matmul chain, the reference and ours, ``--repeats`` interleaved
    repetitions each (only ours with ``ours_only``)."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data = bench_data(args.steps * args.batch, args.seed)
    model = IWAE(ModelConfig.paper(args.layers), data_mean=data.train_mean).to(device)
    # The reference runs enough steps for a timing of about --ref-seconds (k=50 takes ~25 ms a step).
    n_ref = max(3, min(args.steps, int(args.ref_seconds / (k * 5e-4 + 2e-3))))
    x = torch.bernoulli(data.train[: n_ref * args.batch]).to(device).view(n_ref, args.batch, -1)
    chain = matmul_chain(model, k, args.batch, device)
    ref = reference_steps(model, x, k, objective)
    times: dict[str, list[Timing]] = {"chain": [], "ref": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.safetensors"
        # Warm-up: torch.compile, first-call allocations, the thread pool.
        our_epoch(bench_data(3 * args.batch, args.seed), objective, k, args.layers, args.device, out)
        if not ours_only:
            ref()
            chain()
        for _ in range(args.repeats):
            if not ours_only:
                times["chain"].append(min((timed(chain, device) for _ in range(5)), key=lambda t: t[1]))
                wall, cpu = timed(ref, device)
                times["ref"].append((wall / n_ref, cpu / n_ref))
            wall, cpu = timed(lambda: our_epoch(data, objective, k, args.layers, args.device, out), device)
            times["ours"].append((wall / args.steps, cpu / args.steps))
    return times


def ablation(args: argparse.Namespace, k: int = 50, steps: int = 20) -> list[tuple[str, float, float]]:
    """(variant, median ms per bare IWAE step, wall clock and CPU) as the step's tricks are added one by one,
    interleaved; keeping freed memory is process-wide and cannot be undone, so it is measured last."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = IWAE(ModelConfig.paper(args.layers)).to(device)
    x = torch.bernoulli(torch.full((args.batch, model.config.x_dim), 0.15)).to(device)
    surrogate = get_surrogate("iwae")
    plain_adam = torch.optim.Adam(model.parameters(), lr=1e-4, betas=ADAM_BETAS, eps=ADAM_EPS)
    kernel, _ = output_kernel(device, torch.float32, model.config.x_dim)
    variants = [
        ("autograd step, torch.optim.Adam defaults (the previous step)", None, False, plain_adam),
        ("+ fused Adam", None, False, make_optimizer(model, 1e-4)),
        ("+ fused output layer, eager kernel", softplus_sum_sigmoid_eager, False, make_optimizer(model, 1e-4)),
        ("+ compiled kernel (pooled logs)", kernel, False, make_optimizer(model, 1e-4)),
        ("+ fused linear + tanh", kernel, True, make_optimizer(model, 1e-4)),
    ]
    mlps = [m for m in model.modules() if isinstance(m, MLP)]

    def run(fused: object, fused_tanh: bool, opt: torch.optim.Optimizer) -> Callable[[], None]:
        step = TrainStep(model, opt, surrogate, k)

        def go() -> None:
            model.p[0].fused_kernel = fused
            for mlp in mlps:
                mlp.fused_tanh = fused_tanh
            for _ in range(steps):
                step(x)

        return go

    runs = [(name, run(fused, fused_tanh, opt)) for name, fused, fused_tanh, opt in variants]
    times: dict[str, list[Timing]] = {name: [] for name, _ in runs}
    for _, fn in runs:
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs:
            times[name].append(timed(fn, device))
    last_name, last = runs[-1]
    if keep_freed_memory():
        last_name = "+ keep freed memory (measured after the others)"
        times[last_name] = [timed(last, device) for _ in range(args.repeats)]
    return [(n, *(1e3 * statistics.median(t[i] for t in v) / steps for i in (0, 1))) for n, v in times.items()]


def compare_tree(args: argparse.Namespace, tree: str) -> dict[str, list[Timing]]:
    """Ours, with the package imported from ``tree``, in a subprocess: {"objective k": per-step timings}."""
    cmd = [sys.executable, __file__, "--ours-only", "--json", *_passed_args(args)]
    env = {**os.environ, "IWAE_BENCH_TREE": str(Path(tree).resolve())}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"--compare-tree {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _passed_args(args: argparse.Namespace) -> list[str]:
    flags = ("device", "threads", "layers", "steps", "batch", "repeats", "seed")
    return [f for name in flags for f in (f"--{name}", str(getattr(args, name)))]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--layers", type=int, choices=[1, 2], default=1, help="paper architecture")
    parser.add_argument("--steps", type=int, default=300, help="batches in our timed epoch (default 300)")
    parser.add_argument("--batch", type=int, default=20, help="images per batch (default 20, the paper's)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians reported)")
    parser.add_argument("--ref-seconds", type=float, default=2.0, help="about how long one reference timing runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-tree", default=None, help="also time ours from this checkout of the package")
    parser.add_argument("--ablation", action="store_true", help="time the bare step as each trick is added")
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "steps", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


def rate(values: list[Timing], which: int) -> float:
    """Steps/s from the median per-step seconds of column ``which`` (0 wall clock, 1 CPU time)."""
    return 1.0 / statistics.median(v[which] for v in values)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.ablation:
        print(f"bare IWAE k=50 step, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}\n")
        print("| step | ms per step, wall clock | ms per step, CPU time |\n|---|---:|---:|")
        for name, wall, cpu in ablation(args):
            print(f"| {name} | {wall:.2f} | {cpu:.2f} |")
        return 0
    if args.ours_only:
        print(json.dumps({f"{o} {k}": measure(args, o, k, ours_only=True)["ours"] for o, k in CASES}))
        return 0
    load_before = os.getloadavg()
    results = {f"{o} {k}": measure(args, o, k) for o, k in CASES}
    load_after = os.getloadavg()
    other = compare_tree(args, args.compare_tree) if args.compare_tree else None
    cpu_ok = args.device == "cpu"
    name = torch.cuda.get_device_name() if not cpu_ok else f"CPU, {os.cpu_count()} cores"
    model = IWAE(ModelConfig.paper(args.layers))
    print(
        f"training step, paper({args.layers}) architecture, batch {args.batch}, float32, {name}, {args.threads} thread(s)"
    )
    print(f"ours: train() for one epoch of {args.steps} batches, median of {args.repeats} interleaved repetitions")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}\n")
    cols = ["wall clock", "CPU time"] if cpu_ok else ["wall clock"]
    print(
        "| case | GFLOP/step | matmul rate at these shapes (GFLOP/s) | limit (steps/s) | reference (steps/s) "
        "| **ours** (steps/s) | **ours / reference** | **ours / limit** |"
        + (" ours, compared tree (steps/s) | ours / compared |" if other else "")
    )
    print("|---|" + "---:|" * (7 + (2 if other else 0)))
    for case, t in results.items():
        flops = step_flops(model, int(case.split()[1]), args.batch)
        for which, col in enumerate(cols):
            lim, ref, ours = (rate(t[n], which) for n in ("chain", "ref", "ours"))
            row = [
                f"{case.replace(' ', ' k=')} ({col})",
                f"{flops / 1e9:.3f}",
                f"{flops * lim / 1e9:.1f}",
                f"{lim:.1f}",
                f"{ref:.1f}",
                f"{ours:.1f}",
                f"{ours / ref:.2f}x",
                f"{100 * ours / lim:.0f}%",
            ]
            if other:
                theirs = rate(other[case], which)
                row += [f"{theirs:.1f}", f"{ours / theirs:.2f}x"]
            print("| " + " | ".join(row) + " |")
    if other:
        print(f"\ncompared tree: {args.compare_tree} (timed in a subprocess after this run's repetitions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
