"""Service benchmark: our server against a plain FastAPI thread-pool endpoint (and, optionally, today's).

Three servers run side by side as subprocesses, started anew for each torch thread setting (1 and 2):

- ours: `python -m service` from this tree (fair chunked scheduler, IWAE_THREADS=t);
- plain: bench/plain_server.py, a FastAPI endpoint that runs a straightforward PyTorch L_k in Starlette's
  thread pool (torch threads t; its chunk size is the best of 256/512/1024 rows, measured in the same run);
- today (with --today DIR): `python -m service` from another checkout, e.g. the main branch before this work.

Cells: single-image /loglik at k=50 with 1 and 32 clients, and k=5000 with 8 clients, closed loop; the
servers are measured in interleaved rounds (ABC, CBA, ...) so that drift on a shared machine hits all
alike. Head-of-line: single-image k=50 requests sent one after another while one 100-image k=5000 request
is in flight: their worst latency, and the big request's time against the same request alone.

    .venv/bin/python bench/bench_service.py --today /path/to/old/checkout   # writes docs/benchmarks.md
    .venv/bin/python bench/bench_service.py --quick                        # short, print only
    .venv/bin/python bench/bench_service.py --loads 50x1 --no-hol --threads 1   # a subset of cells, print only

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

from bench.plain_server import lk_plain  # noqa: E402
from models.checkpoint import from_bytes  # noqa: E402
from models.networks import IWAE  # noqa: E402
from service.settings import DEFAULT_MODEL, DEFAULT_MODELS_DIR  # noqa: E402

LOADS = ((50, 1), (50, 32), (5000, 8))
PLAIN_CHUNKS = (256, 512, 1024)


@dataclass
class Cell:
    server: str
    threads: int
    k: int
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    # Server CPU seconds per completed request over the whole cell (warm-up included): on a shared machine
    # the requests/s move with the other jobs' load, the CPU time a request costs much less.
    cpu_per_request: float = float("nan")

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
    run_load.completed = counter - errors  # type: ignore[attr-defined]  # every answered request, warm-up too
    return len(latencies), duration, latencies, errors


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the server processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    cmd: list[str], cwd: Path, env_extra: dict[str, str], port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IWAE_") and k != "PYTHONPATH"}
    env.update(env_extra)
    env["PYTHONPATH"] = str(cwd)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {cmd} exited; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready within 300 s")


def service_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]


def service_env(ckpt: Path, threads: int) -> dict[str, str]:
    return {
        "IWAE_MODELS": str(ckpt.parent),
        "IWAE_DEFAULT_MODEL": ckpt.name.removesuffix(".safetensors"),
        "IWAE_LOG_LEVEL": "warning",
        "IWAE_THREADS": str(threads),
    }


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tune_plain_chunk(model: IWAE, threads: int) -> int:
    """The plain endpoint's best chunk size (rows) on this machine now: 8 images at k=5000, best of 3."""
    torch.set_num_threads(threads)
    x = (torch.rand(8, model.config.x_dim, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    best: dict[int, float] = {}
    with torch.inference_mode():
        for chunk in PLAIN_CHUNKS:
            lk_plain(model, x, 500, torch.Generator().manual_seed(0), chunk)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                lk_plain(model, x, 5000, torch.Generator().manual_seed(0), chunk)
                times.append(time.perf_counter() - t)
            best[chunk] = min(times)
    print("plain chunk sizes (s per 8 images at k=5000):", {c: round(v, 3) for c, v in best.items()}, flush=True)
    return min(best, key=best.__getitem__)


# --- head-of-line ---------------------------------------------------------------------------------------------
async def head_of_line(port: int, big: bytes, small: list[bytes]) -> tuple[float, float, float, int]:
    """(big request alone s, big request with small ones s, worst small latency s, small requests sent)."""
    conn = await Conn.open(port)
    t = time.perf_counter()
    status, _ = await conn.post("/loglik?k=5000&seed=1", big, "application/x-npy")
    alone = time.perf_counter() - t
    assert status == 200, status
    side = await Conn.open(port)
    t = time.perf_counter()
    task = asyncio.create_task(conn.post("/loglik?k=5000&seed=1", big, "application/x-npy"))
    worst, sent = 0.0, 0
    await asyncio.sleep(0.05)  # the big request is in the server by now
    while not task.done():
        s = time.perf_counter()
        status, _ = await side.post(f"/loglik?k=50&seed={sent}", small[sent % len(small)], "application/x-npy")
        assert status == 200, status
        worst = max(worst, time.perf_counter() - s)
        sent += 1
    status, _ = await task
    assert status == 200, status
    shared = time.perf_counter() - t
    await conn.close()
    await side.close()
    return alone, shared, worst, sent


# --- main ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODELS_DIR / f"{DEFAULT_MODEL}.safetensors")
    p.add_argument("--today", type=Path, help="another checkout to measure as 'today' (e.g. the main branch)")
    p.add_argument("--threads", default="1,2", help="torch thread settings to measure (comma-separated)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell at k=50")
    p.add_argument("--duration-large", type=float, default=10.0, help="seconds measured per cell at k=5000")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (k=5000: x3)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per cell (their requests are pooled)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--quick", action="store_true", help="short cells, one thread setting, print only")
    p.add_argument(
        "--loads",
        default=",".join(f"{k}x{c}" for k, c in LOADS),
        help="cells to measure, KxCLIENTS comma-separated (a subset is printed only, not written)",
    )
    p.add_argument("--no-hol", action="store_true", help="skip the head-of-line measurement (print only)")
    p.add_argument("--servers", default="ours,plain,today", help="servers to measure (a subset: print only)")
    a = p.parse_args(argv)
    loads = [tuple(int(v) for v in cell.split("x")) for cell in a.loads.split(",") if cell]
    servers = set(a.servers.split(","))
    subset = set(loads) != set(LOADS) or a.no_hol or not {"ours", "plain"} <= servers
    if a.quick:
        a.duration, a.duration_large, a.warmup, a.rounds, a.threads = 1.5, 3.0, 0.5, 1, a.threads.split(",")[0]
    thread_settings = [int(t) for t in a.threads.split(",")]
    model, _, _ = from_bytes(a.checkpoint.read_bytes(), source=str(a.checkpoint))
    model.eval()
    rng = np.random.default_rng(0)
    small = [npy_bytes((rng.random((1, model.config.x_dim)) < 0.3).astype(np.uint8)) for _ in range(64)]
    big = npy_bytes((rng.random((100, model.config.x_dim)) < 0.3).astype(np.uint8))
    tmp = Path(tempfile.mkdtemp(prefix="iwae-bench-"))
    log_path = tmp / "servers.log"
    print(f"checkpoint {a.checkpoint}; server logs: {log_path}", flush=True)

    cells: list[Cell] = []
    hol: dict[tuple[str, int], tuple[float, float, float, int]] = {}
    chunks: dict[int, int] = {}
    for threads in thread_settings:
        chunks[threads] = tune_plain_chunk(model, threads)
        ports = {name: free_port() for name in ("ours", "plain", "today")}
        cmds = {
            "ours": (service_cmd(ports["ours"]), ROOT, service_env(a.checkpoint, threads)),
            "plain": (
                [sys.executable, "bench/plain_server.py", "--checkpoint", str(a.checkpoint), "--port",
                 str(ports["plain"]), "--threads", str(threads), "--chunk-rows", str(chunks[threads])],
                ROOT,
                {},
            ),
        }  # fmt: skip
        if a.today:
            cmds["today"] = (service_cmd(ports["today"]), a.today.resolve(), service_env(a.checkpoint, threads))
        cmds = {name: cmd for name, cmd in cmds.items() if name in servers}
        procs = {name: start_server(cmd, cwd, env, ports[name], log_path) for name, (cmd, cwd, env) in cmds.items()}
        try:
            order = list(procs)
            for r in range(a.rounds):
                for k, conc in loads:
                    for name in order if r % 2 == 0 else reversed(order):
                        duration = a.duration if k < 1000 else a.duration_large
                        warmup = a.warmup if k < 1000 else 3 * a.warmup
                        cpu0 = cpu_seconds(procs[name].pid)
                        n, secs, lat, errors = asyncio.run(run_load(ports[name], k, conc, duration, warmup, small))
                        cpu = (cpu_seconds(procs[name].pid) - cpu0) / max(1, run_load.completed)  # type: ignore[attr-defined]
                        cell = Cell(name, threads, k, conc, n, secs, lat, errors, cpu)
                        cells.append(cell)
                        print(f"t={threads} {name:6s} k={k:5d} c={conc:3d}: {cell.rps:8.2f} req/s  p50 {cell.pct(50):8.1f} ms"
                              f"  server CPU {1000 * cpu:7.2f} ms/request"
                              f"  p99 {cell.pct(99):8.1f}  ({n} requests, {errors} errors; load {os.getloadavg()[0]:.1f})",
                              flush=True)  # fmt: skip
            for name in ("ours", "today", "plain"):
                if name in procs and not a.no_hol:
                    hol[(name, threads)] = asyncio.run(head_of_line(ports[name], big, small))
                    alone, shared, worst, sent = hol[(name, threads)]
                    print(f"t={threads} {name:6s} head-of-line: big alone {alone:.2f} s, with small requests "
                          f"{shared:.2f} s ({shared / alone:.2f}x); worst small latency {1000 * worst:.1f} ms "
                          f"over {sent} requests; load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        finally:
            for proc in procs.values():
                stop_server(proc)
    print(f"1-minute load average now: {os.getloadavg()[0]:.2f}", flush=True)
    if a.quick or subset:
        return 0
    write_doc(a, cells, hol, chunks)
    return 0


def pooled(cells: list[Cell], server: str, threads: int, k: int, conc: int) -> Cell | None:
    """All rounds of one cell as one: requests and seconds summed, latencies pooled."""
    sel = [c for c in cells if (c.server, c.threads, c.k, c.concurrency) == (server, threads, k, conc)]
    if not sel:
        return None
    lat = [v for c in sel for v in c.latencies]
    cpu = float(np.mean([c.cpu_per_request for c in sel]))
    return Cell(server, threads, k, conc, sum(c.requests for c in sel), sum(c.seconds for c in sel), lat,
                sum(c.errors for c in sel), cpu)  # fmt: skip


def _commit(checkout: Path | None) -> str:
    if checkout is None:
        return "none"
    out = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return f"commit {out.stdout.strip()[:90]}" if out.returncode == 0 else str(checkout)


def write_doc(a: argparse.Namespace, cells: list[Cell], hol: dict, chunks: dict[int, int]) -> None:  # type: ignore[type-arg]
    shown = a.checkpoint.relative_to(ROOT) if a.checkpoint.is_relative_to(ROOT) else a.checkpoint
    cmd = ".venv/bin/python bench/bench_service.py" + (" --today <main checkout>" if a.today else "")
    threads = sorted({c.threads for c in cells})
    lines = [
        "# Benchmarks",
        "",
        "## Service: our server against a plain FastAPI endpoint",
        "",
        f"Made by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"**no GPU** (CPU only). 1-minute load average when the table was written: {os.getloadavg()[0]:.2f} "
        "(the machine was shared with other jobs; the servers and the load generator share its cores). "
        f"Model `{shown}`. Single binary 28 × 28 images sent as `.npy`, each request with its own seed, "
        f"closed-loop clients; {a.rounds} interleaved rounds per cell, pooled. `plain` = bench/plain_server.py "
        "(a FastAPI route that runs a straightforward PyTorch L_k in Starlette's thread pool, chunk size "
        + ", ".join(f"{chunks[t]} rows at {t} thread(s)" for t in threads)
        + " — the best of 256/512/1024 measured in the same run); `today` = the service from the checkout given "
        f"with --today ({_commit(a.today)}). Same checkpoint and torch thread setting for all.",
        "",
        "| torch threads | k | clients | server | requests/s | vs plain | p50 ms | p99 ms | errors | server CPU ms/request | CPU vs plain |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in threads:
        for k, conc in LOADS:
            base = pooled(cells, "plain", t, k, conc)
            for name in ("ours", "plain", "today"):
                c = pooled(cells, name, t, k, conc)
                if c is None:
                    continue
                ratio = f"{c.rps / base.rps:.2f}×" if base and base.rps else "–"
                cpu_ratio = f"{c.cpu_per_request / base.cpu_per_request:.2f}×" if base else "–"
                lines.append(f"| {t} | {k} | {conc} | {name} | {c.rps:.1f} | {ratio} | {c.pct(50):.1f} | "
                             f"{c.pct(99):.1f} | {c.errors} | {1000 * c.cpu_per_request:.2f} | {cpu_ratio} |")  # fmt: skip
    lines += [
        "",
        "Head-of-line: single-image k=50 requests sent one after another while one 100-image k=5000 request is "
        "in flight.",
        "",
        "| torch threads | server | big alone s | big with small requests s | slowdown | worst small latency ms | small requests |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (name, t), (alone, shared, worst, sent) in sorted(hol.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(
            f"| {t} | {name} | {alone:.2f} | {shared:.2f} | {shared / alone:.2f}× | {1000 * worst:.1f} | {sent} |"
        )
    lines.append("")
    old = a.out.read_text() if a.out.exists() else ""
    notes = old[old.index("\n## Notes") :] if "\n## Notes" in old else ""
    a.out.write_text("\n".join(lines) + notes)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
