"""Scaling benchmark on Ray: Serve replicas and sharded evaluation, against `iwae serve` and one shard.

In one run, on one machine: requests/s of single-image /loglik at k=5000 from 16 closed-loop clients against
`iwae serve` (1 torch thread) and against Ray Serve with 1 and 2 replicas (1 thread, 1 CPU each) on a local
two-node Ray cluster (one CPU per node); then the images/s of `evaluate_sharded` at k=5000 with 1 and 2
shards. Prints a markdown table with the scaling ratios and Serve's overhead at one replica.

    .venv/bin/python bench/bench_scale.py             # the full run (about 6 minutes on 2 CPU cores)
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
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_service import checkpoint, free_port, npy_bytes, run_load, start_server, stop_server  # noqa: E402

INSIDE = "IWAE_BENCH_NETNS"
K = 5000
CLIENTS = 16
EVAL_MEMORY = 32 * 2**20  # 8 images per batch at k = 5000: shards split on batch boundaries


def images(n: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [npy_bytes((rng.random((1, 784)) < 0.3).astype(np.float32)) for _ in range(n)]


def load(port: int, duration: float, warmup: float) -> float:
    done, seconds, _, errors = asyncio.run(run_load(port, K, CLIENTS, duration, warmup, images()))
    if errors:
        raise RuntimeError(f"{errors} requests failed")
    return done / seconds


def bench_iwae_serve(ckpt_dir: Path, model: str, duration: float, warmup: float, log: Path) -> float:
    proc, port = start_server(ckpt_dir, model, True, 1, log)
    try:
        return load(port, duration, warmup)
    finally:
        stop_server(proc)


def bench_serve(settings: dict, replicas: int, duration: float, warmup: float) -> float:
    from ray import serve

    from service.ray_serve import deployment

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = deployment(settings).options(
        num_replicas=replicas, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1}
    )
    serve.run(app.bind(), name="iwae", route_prefix="/")
    try:
        return load(port, duration, warmup)
    finally:
        serve.shutdown()


def bench_eval(model_path: Path, n_images: int) -> dict[int, float]:
    from models.checkpoint import from_bytes
    from training.distributed import evaluate_sharded

    model, _, _ = from_bytes(model_path.read_bytes())
    x = (torch.rand(n_images, 784, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    evaluate_sharded(model, x[:16], K, shards=2, device="cpu", memory_bytes=EVAL_MEMORY)  # workers: import, compile
    rates = {}
    for shards in (1, 2):
        res = evaluate_sharded(model, x, K, shards=shards, device="cpu", memory_bytes=EVAL_MEMORY)
        rates[shards] = n_images / res.seconds
    return rates


def run(a: argparse.Namespace) -> str:
    import ray
    from ray.cluster_utils import Cluster

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    ckpt_dir, model, described = checkpoint(tmp, a.checkpoint)
    settings = {"models": [str(ckpt_dir / f"{model}.safetensors")], "default_model": model, "device": "cpu"}
    settings["threads"] = 1
    baseline = bench_iwae_serve(ckpt_dir, model, a.duration, a.warmup, tmp / "server.log")
    print(f"iwae serve: {baseline:.2f} req/s", flush=True)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        serve_rps = {n: bench_serve(settings, n, a.duration, a.warmup) for n in (1, 2)}
        print(f"serve: {serve_rps}", flush=True)
        eval_rate = bench_eval(ckpt_dir / f"{model}.safetensors", a.eval_images)
        print(f"eval: {eval_rate}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return table(described, baseline, serve_rps, eval_rate, a)


def table(described: str, baseline: float, serve_rps: dict[int, float], eval_rate: dict[int, float], a) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Model: {described}. k = {K}, {CLIENTS} closed-loop clients, single-image requests; "
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, one torch thread per server/replica/"
        f"shard; a two-node local Ray cluster with one CPU per node. {a.duration:g} s measured after "
        f"{a.warmup:g} s warm-up per cell; sharded eval over {a.eval_images} images.",
        "",
        "| setup | 1 | 2 | 2 vs 1 |",
        "|---|---|---|---|",
        f"| `iwae serve` (requests/s) | {baseline:.2f} | | |",
        f"| Ray Serve replicas (requests/s) | {serve_rps[1]:.2f} | {serve_rps[2]:.2f} "
        f"| {serve_rps[2] / serve_rps[1]:.2f}× |",
        f"| `evaluate_sharded` shards (images/s) | {eval_rate[1]:.2f} | {eval_rate[2]:.2f} "
        f"| {eval_rate[2] / eval_rate[1]:.2f}× |",
        "",
        f"Serve's overhead at one replica: {(1 - serve_rps[1] / baseline) * 100:.1f}% fewer requests/s than "
        "`iwae serve`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured per cell")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    p.add_argument("--eval-images", type=int, default=48)
    p.add_argument("--checkpoint", type=Path, help="model (default: the shipped default model)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 5 s cells, 16 images")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.eval_images = 5.0, 2.0, 16
    if os.environ.get(INSIDE) != "1":
        env = {**os.environ, INSIDE: "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
        env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "service.ray_serve:proxy_middlewares"
        script = f"ip link set lo up && exec {shlex.quote(sys.executable)} {shlex.join(sys.argv)}"
        return subprocess.run(["unshare", "--net", "sh", "-c", script], env=env).returncode
    print(run(a))
    print(f"\nCommand: `python bench/bench_scale.py {shlex.join(sys.argv[1:])}`".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
