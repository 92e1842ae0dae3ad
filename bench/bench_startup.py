"""Where `python -m service` spends its start-up: wall time to /healthz and to /readyz, the server's CPU time
at ready, and its log lines with their times, for the shipped models (or any `iwae serve` arguments).

    python bench/bench_startup.py                          # the shipped zoo, default settings, 3 starts
    python bench/bench_startup.py --runs 1 -- --models models/zoo/mnist-iwae-k50-1l.safetensors
    python bench/bench_startup.py --importtime             # also: the server's slowest imports (-X importtime)
    python bench/bench_startup.py --phases                 # the same work step by step in one fresh process

Each start is a fresh process on a free loopback port, polled every 10 ms with the standard library only (so
the probe itself costs the server nothing) and stopped with SIGTERM once ready. CPU time is user + system of
the server and every process it started (torch.compile's workers), read from /proc just after /readyz
first answers 200. The compile cache (TORCHINDUCTOR_CACHE_DIR) is whatever the environment gives: the first
start after a change of torch or of the kernels compiles, later ones load from the cache.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Start:
    healthz_s: float  # wall seconds from spawn to the first 200 on /healthz
    readyz_s: float  # ... and on /readyz
    cpu_s: float  # the server's process tree's CPU seconds when /readyz first said 200
    log: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (those alive, plus the children it reaped)."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: the fields start after the last ')'.
            stats[int(entry)] = text[text.rindex(")") + 2 :].split()
    tree, frontier = set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {p for p, f in stats.items() if int(f[1]) in frontier} - tree
    # Fields after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14).
    return sum(sum(int(stats[p][i]) for i in (11, 12, 13, 14)) for p in tree if p in stats) / TICK


def one_start(serve_args: list[str], env: dict[str, str], timeout_s: float, importtime: Path | None) -> Start:
    port = _free_port()
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "service"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *serve_args]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        healthz = readyz = cpu = None
        try:
            while readyz is None:
                if proc.poll() is not None:
                    err.seek(0)
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{err.read()[-3000:]}")
                now = time.perf_counter() - t0
                if now > timeout_s:
                    raise TimeoutError(f"not ready after {timeout_s} s")
                if healthz is None and _ok(base + "/healthz"):
                    healthz = time.perf_counter() - t0
                if healthz is not None and _ok(base + "/readyz"):
                    readyz = time.perf_counter() - t0
                    cpu = _tree_cpu_s(proc.pid)
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err.seek(0)
        log = err.read()
    if importtime is not None:
        importtime.write_text(log)
    lines = [line for line in log.splitlines() if not line.startswith("import time:")]
    assert healthz is not None and cpu is not None
    return Start(healthz, readyz, cpu, "\n".join(lines))


def slowest_imports(importtime_log: str, top: int) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the top-level imports (the modules the server itself imported)."""
    rows = []
    for line in importtime_log.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) == 1:  # depth 0: imported by the server's own code
            rows.append((int(m.group(2)) / 1e6, m.group(4)))
    return sorted(rows, reverse=True)[:top]


PHASES = r"""
import resource, time
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
t, c = time.perf_counter(), cpu()
def mark(what):
    global t, c
    print(f"  {what:48s} wall {time.perf_counter() - t:6.2f} s   CPU {cpu() - c:6.2f} s", flush=True)
    t, c = time.perf_counter(), cpu()
import torch
mark("import torch")
import service.__main__, service.app, service.auth, service.drain, service.registry, uvicorn
mark("import the service and uvicorn")
from service.settings import Settings
from service.registry import ModelRegistry
registry = ModelRegistry.load(Settings())
mark(f"load {len(registry.models)} checkpoints")
import torch._dynamo, torch._inductor.compile_fx
mark("import torch._dynamo and inductor (torch.compile)")
from models.kernels import kernels
for name, loaded in registry.models.items():
    note = kernels(loaded.model).note
    mark(f"L_k kernel of {name} ({note})")
"""


def phases(env: dict[str, str]) -> None:
    """The server's start-up work in order, timed step by step (compile cache as configured)."""
    print("phases (one process; a kernel is compiled once per architecture, later models reuse it):")
    subprocess.run([sys.executable, "-c", PHASES], cwd=ROOT, env=env, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="starts to measure (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for ready (default: %(default)s)")
    p.add_argument("--importtime", action="store_true", help="also list the server's slowest imports")
    p.add_argument("--phases", action="store_true", help="also time the start-up work step by step")
    p.add_argument("serve_args", nargs="*", help="after --: arguments for python -m service")
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"host: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"command: python -m service {' '.join(a.serve_args)}")
    starts = []
    for i in range(a.runs):
        imp = Path(tempfile.gettempdir()) / f"iwae-startup-importtime-{os.getpid()}.txt" if a.importtime else None
        s = one_start(a.serve_args, env, a.timeout, imp)
        starts.append(s)
        print(f"start {i + 1}: /healthz {s.healthz_s:.2f} s, /readyz {s.readyz_s:.2f} s, CPU {s.cpu_s:.2f} s")
        if imp is not None:
            for secs, name in slowest_imports(imp.read_text(), 8):
                print(f"  import {name}: {secs:.2f} s")
            imp.unlink()
    if a.phases:
        phases(env)
    print("last start's log:")
    print(starts[-1].log)
    best = min(starts, key=lambda s: s.readyz_s)
    print(
        f"best of {len(starts)}: /healthz {best.healthz_s:.2f} s, /readyz {best.readyz_s:.2f} s, CPU {best.cpu_s:.2f} s"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
