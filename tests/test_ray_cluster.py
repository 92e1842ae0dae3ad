"""Runs tests/ray_cluster/ (a two-node Ray cluster: Serve replicas, sharded eval, the grid) inside a private
network namespace that holds only loopback, so every Ray process is reachable on 127.0.0.1 alone."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NETNS = ["unshare", "--net", "sh", "-c"]


def _why_not() -> str | None:
    if os.environ.get("IWAE_RAY_NETNS") == "1":
        return "already inside the namespace (tests/ray_cluster runs directly)"
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'iwae-serve[ray]')"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip not found: cannot make a loopback-only network namespace"
    probe = subprocess.run([*NETNS, "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no private network namespace here (unshare --net: {probe.stderr.strip() or probe.returncode})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))
def test_ray_cluster_suite_in_a_loopback_only_network_namespace() -> None:
    env = {
        **os.environ,
        "IWAE_RAY_NETNS": "1",
        # Ray's workers import this checkout (ahead of any installed copy).
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "service.ray_serve:proxy_middlewares",
        "RAY_USAGE_STATS_ENABLED": "0",
        # The eager L_k kernel (same sums): compiling in every replica and task would dominate the run time.
        "IWAE_ENGINE_COMPILE": "0",
    }
    script = 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider tests/ray_cluster'
    r = subprocess.run([*NETNS, script, sys.executable], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        # Seen once on a loaded machine: the Serve fixture failed after the job tests, and the same suite then
        # passed alone. One rerun, with the first failure kept in the output, so a real bug still fails twice.
        print(
            "first run failed:\n"
            + "\n".join(line for line in r.stdout.splitlines() if line.startswith(("E ", "FAILED", "ERROR")))[-4000:],
            file=sys.stderr,
        )
        r = subprocess.run(
            [*NETNS, script, sys.executable], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "error" not in summary, tail
    print(summary)
