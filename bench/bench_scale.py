"""Scaling benchmark on Ray: Serve replicas and sharded evaluation, against `iwae serve` and one shard.

In one run, on one machine: requests/s of single-image /loglik at k=5000 from 16 closed-loop clients against
`iwae serve` (1 torch thread) and against Ray Serve with 1 and 2 replicas (1 thread, one per node) on a local
two-node Ray cluster (one CPU per node); then the images/s of `evaluate_sharded` at k=5000 with 1 and 2
shards. Setups stay up and are measured in interleaved rounds (a shared machine slows them alike); prints a
markdown table of the best rounds, the scaling ratios and Serve's overhead at one replica.

    .venv/bin/python bench/bench_scale.py             # the full run (about 8 minutes on 2 CPU cores)
    .venv/bin/python bench/bench_scale.py --quick     # a smoke run

Ray binds to the machine's network address, so the benchmark re-runs itself in a private network
namespace holding only loopback (`unshare --net`, needs root or user namespaces); all traffic is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_service import (  # noqa: E402
    Conn,
    free_port,
    npy_bytes,
    service_cmd,
    service_env,
    start_server,
    stop_server,
)

from service.settings import DEFAULT_MODEL, DEFAULT_MODELS_DIR  # noqa: E402

INSIDE = "IWAE_BENCH_NETNS"
K = 5000
CLIENTS = 16
NPY = "application/x-npy"
EVAL_MEMORY = 32 * 2**20  # 8 images per batch at k = 5000: shards split on batch boundaries


def checkpoint(path: Path | None) -> tuple[Path, str]:
    """(the checkpoint, how the table describes it): the shipped default model unless one is given."""
    from models.checkpoint import from_bytes

    path = path or DEFAULT_MODELS_DIR / f"{DEFAULT_MODEL}.safetensors"
    _, card, _ = from_bytes(path.read_bytes(), source=str(path))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return path, f"`{shown}` ({card.get('objective', '?')}, {card.get('epochs', '?')} epochs)"


def images(n: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [npy_bytes((rng.random((1, 784)) < 0.3).astype(np.float32)) for _ in range(n)]


async def closed_loop(port: int, prefix: str, duration: float, warmup: float, bodies: list[bytes]) -> float:
    """Requests/s of CLIENTS keep-alive clients, each sending its next request when its answer arrives."""
    conns = [await Conn.open(port) for _ in range(CLIENTS)]
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + duration
    done = 0

    async def client(i: int, conn: Conn) -> None:
        nonlocal done
        seed = i
        while time.perf_counter() < t1:
            seed += CLIENTS
            status, _ = await conn.post(f"{prefix}/loglik?k={K}&seed={seed}", bodies[seed % len(bodies)], NPY)
            if status != 200:
                raise RuntimeError(f"{prefix or '/'}: HTTP {status}")
            done += t0 <= time.perf_counter() <= t1

    await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
    for c in conns:
        await c.close()
    return done / duration


def deploy_serve(settings: dict, replicas: int) -> str:
    """An application of ``replicas`` replicas (one per node) at /r<replicas>; returns its route prefix."""
    from ray import serve

    from service.ray_serve import deployment

    app = deployment(settings).options(
        name=f"IwaeService{replicas}",
        num_replicas=replicas,
        max_ongoing_requests=64,
        max_replicas_per_node=1,
        ray_actor_options={"num_cpus": 0.5},
    )
    serve.run(app.bind(), name=f"r{replicas}", route_prefix=f"/r{replicas}")
    return f"/r{replicas}"


def bench_eval(model_path: Path, n_images: int, rounds: int) -> dict[int, list[float]]:
    from models.checkpoint import from_bytes
    from training.distributed import evaluate_sharded

    model, _, _ = from_bytes(model_path.read_bytes())
    x = (torch.rand(n_images, 784, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    evaluate_sharded(model, x[:16], K, shards=2, device="cpu", memory_bytes=EVAL_MEMORY)  # workers: import, compile
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for shards in (1, 2):
            res = evaluate_sharded(model, x, K, shards=shards, device="cpu", memory_bytes=EVAL_MEMORY)
            rates[shards].append(n_images / res.seconds)
    return rates


def run(a: argparse.Namespace) -> str:
    """Every setup stays up; rounds of measurements interleave them, so slow phases of a shared machine
    hit all setups alike. The table reports the best round of each (the least disturbed) and the range."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    ckpt, described = checkpoint(a.checkpoint)
    model = ckpt.name.removesuffix(".safetensors")
    # One thread and one engine worker everywhere: the comparison is per core.
    settings = {"models": [str(ckpt)], "default_model": model, "device": "cpu", "threads": 1, "engine_workers": 1}
    server_port = free_port()
    env = {**service_env(ckpt, 1), "IWAE_ENGINE_WORKERS": "1"}
    proc = start_server(service_cmd(server_port), ROOT, env, server_port, tmp / "server.log")
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        serve_port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": serve_port})
        setups = {"iwae serve": (server_port, ""), **{n: (serve_port, deploy_serve(settings, n)) for n in (1, 2)}}
        rps: dict[object, list[float]] = {name: [] for name in setups}
        bodies = images()
        for _ in range(a.rounds):
            for name, (port, prefix) in setups.items():
                rps[name].append(asyncio.run(closed_loop(port, prefix, a.duration, a.warmup, bodies)))
                print(f"{name}: {rps[name][-1]:.2f} req/s", flush=True)
        serve.shutdown()
        stop_server(proc)
        eval_rate = bench_eval(ckpt, a.eval_images, a.rounds)
        print(f"eval: {eval_rate}", flush=True)
    finally:
        if proc.poll() is None:
            stop_server(proc)
        ray.shutdown()
        cluster.shutdown()
    return table(described, rps, eval_rate, a)


def _cell(values: list[float]) -> str:
    return f"{max(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def table(described: str, rps: dict[object, list[float]], eval_rate: dict[int, list[float]], a) -> str:
    best = {name: max(v) for name, v in rps.items()}
    cpu = platform.processor() or platform.machine()
    return "\n".join(
        [
            f"Model: {described}. k = {K}, {CLIENTS} closed-loop clients, single-image `.npy` requests; "
            f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, one torch thread per server, replica "
            f"and shard; a two-node local Ray cluster with one CPU per node. {a.rounds} interleaved rounds of "
            f"{a.duration:g} s cells (after {a.warmup:g} s of load); best round (range); sharded eval over "
            f"{a.eval_images} images.",
            "",
            "| setup | 1 | 2 | 2 vs 1 (best rounds) |",
            "|---|---|---|---|",
            f"| `iwae serve` (requests/s) | {_cell(rps['iwae serve'])} | | |",
            f"| Ray Serve replicas (requests/s) | {_cell(rps[1])} | {_cell(rps[2])} | {best[2] / best[1]:.2f}× |",
            f"| `evaluate_sharded` shards (images/s) | {_cell(eval_rate[1])} | {_cell(eval_rate[2])} "
            f"| {max(eval_rate[2]) / max(eval_rate[1]):.2f}× |",
            "",
            f"Serve at one replica vs `iwae serve`: {(best[1] / best['iwae serve'] - 1) * 100:+.1f}% requests/s.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per cell")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurements of every setup")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    p.add_argument("--eval-images", type=int, default=48)
    p.add_argument("--checkpoint", type=Path, help="model (default: the shipped default model)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 5 s cells, 16 images")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.eval_images, a.rounds = 5.0, 2.0, 16, 1
    if os.environ.get(INSIDE) != "1":
        env = {**os.environ, INSIDE: "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
        env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "service.ray_serve:proxy_middlewares"
        # One proxy, on the head node (proxy_location="HeadOnly"): by default it sends every request to the
        # replica on its own node while that one has room (max_ongoing_requests), so the second replica sat
        # idle (top showed one replica busy, the other not). Spread the load as a load balancer would.
        env.setdefault("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
        script = f"ip link set lo up && exec {shlex.quote(sys.executable)} {shlex.join(sys.argv)}"
        return subprocess.run(["unshare", "--net", "sh", "-c", script], env=env).returncode
    print(run(a))
    print(f"\nCommand: `python bench/bench_scale.py {shlex.join(sys.argv[1:])}`".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
