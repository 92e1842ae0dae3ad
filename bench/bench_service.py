"""Service benchmark: requests/s and latency percentiles of single-image /loglik requests.

Starts two servers (`python -m service`, as subprocesses): batching on (the defaults) and off
(IWAE_MAX_BATCH_REQUESTS=1). Against both it runs closed-loop load at concurrency 1, 8 and 32 for k=50 and
k=5000, and in the same run measures the L_k engine offline (engine_log_weights on batches of images, no
HTTP) for comparison. Writes the table to docs/benchmarks.md (or --out) with the command that made it.

    .venv/bin/python bench/bench_service.py --threads 1   # the full run (about 8 minutes on 2 CPU cores)
    .venv/bin/python bench/bench_service.py --quick    # a short smoke run, nothing written

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio streams: on a 2-core machine a
heavier client would take CPU time from the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import from_bytes, to_bytes  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.engine import chunk_rows_for, engine_log_weights  # noqa: E402
from models.networks import IWAE  # noqa: E402
from service.settings import DEFAULT_MODEL, DEFAULT_MODELS_DIR, Settings  # noqa: E402

CONCURRENCY = (1, 8, 32)
KS = (50, 5000)


@dataclass
class Cell:
    mode: str
    k: int
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


# --- a small HTTP/1.1 client ------------------------------------------------------------------------------
class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


async def run_load(
    port: int, k: int, concurrency: int, duration: float, warmup: float, images: list[bytes]
) -> tuple[int, float, list[float], int]:
    """Closed loop: each of ``concurrency`` connections sends its next request when the last one returns.
    Requests completing within [warmup, warmup + duration] are counted."""
    conns = [await Conn.open(port) for _ in range(concurrency)]
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors = 0
    counter = 0

    async def worker(conn: Conn) -> None:
        nonlocal errors, counter
        while True:
            sent = time.perf_counter()
            if sent >= t1:
                return
            counter += 1
            seed = counter
            status, body = await conn.post(
                f"/loglik?k={k}&seed={seed}", images[seed % len(images)], "application/x-npy"
            )
            done = time.perf_counter()
            if status != 200:
                errors += 1
            elif t0 <= done <= t1:
                json.loads(body)  # a real client parses the answer
                latencies.append(done - sent)

    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        await c.close()
    return len(latencies), duration, latencies, errors


# --- the server process -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    ckpt_dir: Path, model: str, batching: bool, threads: int | None, log_path: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IWAE_")}
    env.update({"IWAE_MODELS": str(ckpt_dir), "IWAE_DEFAULT_MODEL": model, "IWAE_LOG_LEVEL": "warning"})
    if threads:
        env["IWAE_THREADS"] = str(threads)
    if not batching:
        env["IWAE_MAX_BATCH_REQUESTS"] = "1"
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready within 300 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- offline engine -----------------------------------------------------------------------------------------
def engine_images_per_s(model: IWAE, k: int, batch: int, seconds: float, with_noise: bool) -> float:
    """Images/s of engine_log_weights on [batch] images at k samples, chunked as the service chunks."""
    chunk_rows = chunk_rows_for(model, torch.device("cpu"), Settings().memory_bytes)
    x = (torch.rand(batch, model.config.x_dim, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    gen = torch.Generator().manual_seed(1)
    noise = model.draw_noise(k, batch, generator=gen)
    engine_log_weights(model, x, noise, chunk_rows=chunk_rows)  # warm-up (and compile)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        if with_noise:
            noise = model.draw_noise(k, batch, generator=gen)
        engine_log_weights(model, x, noise, chunk_rows=chunk_rows)
        done += batch
    return done / (time.perf_counter() - start)


# --- main ---------------------------------------------------------------------------------------------------
def checkpoint(tmp: Path, path: Path | None) -> tuple[Path, str, str]:
    """(folder holding the checkpoint, model name, description)."""
    if path is None:
        shipped = DEFAULT_MODELS_DIR / f"{DEFAULT_MODEL}.safetensors"
        path = shipped if shipped.exists() else None
    if path is not None:
        _, card, _ = from_bytes(path.read_bytes(), source=str(path))
        name = path.name.removesuffix(".safetensors")
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        trained = f"{card.get('epochs', '?')} of {card.get('schedule', {}).get('epochs', '?')} epochs"
        return path.parent, name, f"`{shown}` ({card.get('objective', '?')}, k={card.get('k', '?')}, trained {trained})"
    torch.manual_seed(0)
    model = IWAE(ModelConfig.paper(1))
    out = tmp / "paper-1l-random.safetensors"
    out.write_bytes(to_bytes(model, card={"name": "paper-1l-random", "note": "random init, for speed only"}))
    return (
        tmp,
        "paper-1l-random",
        "the paper's 1-layer architecture (784-200-200-50) with random weights (no trained model was in "
        "models/zoo; speed does not depend on the weights)",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the shipped model, else random init)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per cell at k=50")
    p.add_argument("--duration-large", type=float, default=20.0, help="seconds measured per cell at k=5000")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (k=5000: x3)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the server's engine and of the offline measurement (default: torch's)",
    )
    p.add_argument("--quick", action="store_true", help="short cells, print only")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.duration, a.duration_large, a.warmup = 2.0, 4.0, 0.5

    tmp = Path(tempfile.mkdtemp(prefix="iwae-bench-"))
    ckpt_dir, name, described = checkpoint(tmp, a.checkpoint)
    model, _, _ = from_bytes((ckpt_dir / f"{name}.safetensors").read_bytes(), source=name)
    rng = np.random.default_rng(0)
    images = [npy_bytes((rng.random((1, model.config.x_dim)) < 0.3).astype(np.uint8)) for _ in range(64)]
    log_path = tmp / "server.log"
    print(f"checkpoint: {described}; server log: {log_path}", flush=True)

    offline: dict[str, list[float]] = {"engine": [], "engine+noise": []}

    def measure_offline() -> None:
        seconds = 2.0 if a.quick else 5.0
        offline["engine"].append(engine_images_per_s(model, 5000, 32, seconds, with_noise=False))
        offline["engine+noise"].append(engine_images_per_s(model, 5000, 32, seconds, with_noise=True))
        print(f"offline k=5000: engine {offline['engine'][-1]:.2f} images/s, with noise drawing "
              f"{offline['engine+noise'][-1]:.2f}", flush=True)  # fmt: skip

    # Both servers run side by side (an idle one costs nothing) and every cell measures batching on and off
    # back to back, alternating which goes first, with the offline engine measured between the k=5000
    # cells: on a machine shared with other jobs the available CPU drifts over minutes, and this keeps
    # each comparison within the same minute.
    servers = {
        mode: start_server(ckpt_dir, name, batching, a.threads, log_path)
        for mode, batching in (("batching", True), ("no batching", False))
    }
    cells: list[Cell] = []
    try:
        flip = False
        for k in KS:
            for conc in CONCURRENCY:
                modes = ["batching", "no batching"]
                for mode in reversed(modes) if flip else modes:
                    port = servers[mode][1]
                    duration = a.duration if k < 1000 else a.duration_large
                    warmup = a.warmup if k < 1000 else 3 * a.warmup
                    n, secs, lat, errors = asyncio.run(run_load(port, k, conc, duration, warmup, images))
                    cell = Cell(mode, k, conc, n, secs, lat, errors)
                    cells.append(cell)
                    print(f"{mode:12s} k={k:5d} c={conc:3d}: {cell.rps:8.2f} req/s  p50 {cell.pct(50):8.1f} ms  "
                          f"p95 {cell.pct(95):8.1f}  p99 {cell.pct(99):8.1f}  ({n} requests, {errors} errors)",
                          flush=True)  # fmt: skip
                flip = not flip
                if k >= 1000:
                    measure_offline()
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    cells.sort(key=lambda c: (c.mode != "batching", c.k, c.concurrency))

    eng = statistics.mean(offline["engine"])
    eng_noise = statistics.mean(offline["engine+noise"])
    get = {(c.mode, c.k, c.concurrency): c for c in cells}
    speedup = get[("batching", 50, 32)].rps / get[("no batching", 50, 32)].rps
    best_5000 = max(c.rps for c in cells if c.k == 5000 and c.mode == "batching")
    ratio = best_5000 / eng
    print(f"k=50, c=32: batching / no batching = {speedup:.2f}x (target >= 5)")
    print(
        f"k=5000: best service {best_5000:.2f} images/s = {100 * ratio:.0f}% of offline engine {eng:.2f} (target >= 85%)"
    )
    if a.quick:
        return 0

    cmd = ".venv/bin/python bench/bench_service.py" + "".join(
        f" {flag} {value}" for flag, value in (("--checkpoint", a.checkpoint), ("--threads", a.threads)) if value
    )
    lines = [
        "# Benchmarks",
        "",
        "## Service: single-image `/loglik` requests",
        "",
        f"Made by `{cmd}` on {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), "
        "**no GPU** in this environment (the device was the CPU). 1-minute load average when the table was "
        f"written: {os.getloadavg()[0]:.2f} (the servers and the load generator share the same cores); the "
        "comparisons below are between measurements taken within the same minute.",
        "",
        f"Model: {described}. Each request is one binary 28 × 28 image sent as `.npy` with its own seed; "
        "closed-loop load (each client sends its next request when the previous answer arrives) from a "
        "minimal HTTP/1.1 keep-alive client on the same machine. Both servers ran side by side and each cell was "
        "measured with batching on and off back to back. Batching on = default settings "
        f"(`IWAE_MAX_WAIT_MS={Settings().max_wait_ms:g}`, `IWAE_BATCH_COST={Settings().batch_cost}`); "
        "batching off = `IWAE_MAX_BATCH_REQUESTS=1` (one request per engine call).",
        "",
        "| batching | k | concurrency | requests/s | p50 ms | p95 ms | p99 ms | requests measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        lines.append(
            f"| {'on' if c.mode == 'batching' else 'off'} | {c.k} | {c.concurrency} | {c.rps:.2f} | "
            f"{c.pct(50):.1f} | {c.pct(95):.1f} | {c.pct(99):.1f} | {c.requests} |"
        )
    lines += [
        "",
        f"Offline L_k engine at k=5000 (`engine_log_weights` on batches of 32 images, service chunking, no HTTP; "
        f"mean of {len(offline['engine'])} measurements taken between the k=5000 cells): **{eng:.2f} images/s** "
        f"({eng_noise:.2f} images/s including drawing the noise, which the service also does).",
        "",
        "Targets:",
        "",
        f"- k=50, concurrency 32: batching gives **{speedup:.1f}×** the requests/s of no batching (target ≥ 5×): "
        + ("met." if speedup >= 5 else "**not met**."),
        f"- k=5000: the service's best rate, {best_5000:.2f} images/s, is **{100 * ratio:.0f}%** of the engine's "
        f"offline images/s (target ≥ 85%): " + ("met." if ratio >= 0.85 else "**not met**."),
        "",
    ]
    # Hand-written notes after the table (a "## Notes" section) survive a re-run.
    old = a.out.read_text() if a.out.exists() else ""
    notes = old[old.index("\n## Notes") :] if "\n## Notes" in old else ""
    a.out.write_text("\n".join(lines) + notes)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
