"""End to end: a real server process (the container's command) on a loopback port, driven by the client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models.checkpoint import from_bytes
from models.engine import bound_stats, engine_log_weights
from service.client import InvalidInputError, IWAEClient, NotFoundError
from service.testing import tiny_model, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def container_command() -> list[str]:
    """The Dockerfile's CMD (exec form)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, "the Dockerfile must have exactly one CMD"
    return json.loads(lines[0].removeprefix("CMD "))


def local_command(port: int) -> list[str]:
    """The container's command with this interpreter, bound to loopback on ``port``."""
    cmd = container_command()
    assert cmd[0] == "python"
    out = [sys.executable, *cmd[1:]]
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    models = tmp_path_factory.mktemp("zoo")
    write_checkpoint(models / "tiny.safetensors", tiny_model(seed=3), {"eval": {"test": {"loglik": -99.0}}})
    write_checkpoint(models / "other.safetensors", tiny_model(latent_dims=(3, 2), seed=4))
    (models / "broken.safetensors").write_bytes(b"nope")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IWAE_")},
        "IWAE_MODELS": str(models),
        "IWAE_DEFAULT_MODEL": "tiny",
        "IWAE_DEVICE": "cpu",
        "IWAE_LOG_LEVEL": "info",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path_factory.mktemp("log") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(local_command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with IWAEClient(url) as c:
            try:
                c.wait_ready(timeout=120)
            except TimeoutError:
                proc.kill()
                raise AssertionError(f"server not ready; its log:\n{log.read_text()}") from None
        yield url, models, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = log.read_text()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: exit status 0 or -SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert "broken.safetensors" in text and "cannot load checkpoint" in text  # reported, and skipped


def test_end_to_end(server: tuple[str, Path, subprocess.Popen[bytes]]) -> None:
    url, models, proc = server
    x = (np.random.default_rng(0).random((2, 28, 28)) < 0.3).astype(np.float32)
    with IWAEClient(url) as client:
        assert client.healthy() and client.ready()
        r = client.loglik(x, k=40, seed=9)
        path = models / "tiny.safetensors"
        model, _, _ = from_bytes(path.read_bytes(), source=str(path))
        noise = model.draw_noise(40, 2, generator=torch.Generator().manual_seed(9))
        want = bound_stats(engine_log_weights(model, torch.from_numpy(x.reshape(2, -1)), noise))
        np.testing.assert_allclose(r.loglik, want.loglik.numpy(), rtol=2e-6)
        np.testing.assert_allclose(r.elbo, want.elbo.numpy(), rtol=2e-6)

        names = [m["name"] for m in client.models()]
        assert names == ["other", "tiny"]
        assert client.model("tiny")["card"]["eval"]["test"]["loglik"] == -99.0
        s = client.sample(3, seed=1, model="other")
        assert s.probs.shape == (3, 784) and s.model == "other"
        au = client.active_units(np.concatenate([x, 1 - x]), seed=0, model="other")
        assert [v.shape for v in au.variances] == [(3,), (2,)]

        with pytest.raises(InvalidInputError, match="binarize"):
            client.loglik(np.full((1, 784), 0.25), k=5)
        with pytest.raises(NotFoundError, match="unknown model"):
            client.sample(2, model="broken")

        # Many concurrent requests, each as the same seed alone would answer.
        xs = [(np.random.default_rng(i).random((1, 784)) < 0.5).astype(np.float32) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda i: client.loglik(xs[i], k=30, seed=i), range(16)))
        for i in (0, 7, 15):
            alone = client.loglik(xs[i], k=30, seed=i)
            np.testing.assert_allclose(together[i].loglik, alone.loglik, rtol=2e-6)

    metrics = httpx.get(f"{url}/metrics").text
    rows = float(re.search(r'iwae_rows_computed_total\{model="tiny"\} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    assert rows >= 40 * 2 + 19 * 30  # every /loglik row above was computed (and counted)
    assert 'iwae_queued_cost{model="tiny"} 0.0' in metrics
    assert 'iwae_requests_total{method="POST",route="/loglik",status="422"} 1.0' in metrics
    assert proc.poll() is None  # still serving after the bad requests
