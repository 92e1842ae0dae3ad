"""Helpers for testing code against the service without a network: tiny checkpoints and an in-process app.

async with serve_in_process(Settings(models=[tmp_dir], default_model="tiny")) as svc:
    r = await svc.client.post("/loglik?k=10", json={"images": [...]})
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI

from models.checkpoint import to_bytes
from models.config import ModelConfig
from models.networks import IWAE
from service.app import create_app
from service.fair_queue import FairScheduler
from service.registry import ModelRegistry
from service.settings import Settings
from service.state import ServiceState


def tiny_model(x_dim: int = 784, latent_dims: tuple[int, ...] = (4,), seed: int = 0) -> IWAE:
    """A small randomly initialised IWAE (hidden layers of 16 units)."""
    torch.manual_seed(seed)
    hidden = tuple((16,) for _ in latent_dims)
    return IWAE(ModelConfig(x_dim=x_dim, latent_dims=latent_dims, hidden_dims=hidden)).eval()


def write_checkpoint(path: Path, model: IWAE, card: dict[str, Any] | None = None) -> Path:
    card = {
        "name": path.name.removesuffix(".safetensors"),
        "dataset": "test",
        "binarization": "none",
        "objective": "iwae",
        "k": 1,
        "estimator": "iwae",
        **(card or {}),
    }
    path.write_bytes(to_bytes(model, card=card))
    return path


@dataclass
class InProcessService:
    app: FastAPI
    client: httpx.AsyncClient
    transport: httpx.ASGITransport

    @property
    def state(self) -> ServiceState:
        return self.app.state.service

    def scheduler(self, name: str | None = None) -> FairScheduler:
        """The scheduler of the named model (the default model's when None)."""
        assert self.state.schedulers is not None
        return self.state.schedulers[name or self.state.models().default]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value from the app's own Prometheus registry (0 when absent)."""
        value = self.app.state.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else float(value)


@asynccontextmanager
async def serve_in_process(
    settings: Settings, registry: ModelRegistry | None = None, ready_timeout: float = 120.0
) -> AsyncIterator[InProcessService]:
    """Run the app's startup (load, warm up), yield an httpx client bound to it, then shut it down."""
    app = create_app(settings, registry=registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iwae.test") as client:
            deadline = asyncio.get_running_loop().time() + ready_timeout
            while (await client.get("/readyz")).status_code != 200:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError("in-process service not ready")
                await asyncio.sleep(0.005)
            yield InProcessService(app, client, transport)


@contextmanager
def service_process(env: dict[str, str], log: Path, ready_timeout: float = 120.0) -> Iterator[str]:
    """`python -m service` on a free loopback port, with the caller's `IWAE_*` settings only (none inherited):
    yields its URL once /readyz says ready, then stops it with SIGTERM. Its output goes to ``log``."""
    from service.client import IWAEClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("IWAE_")}, **env}
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with IWAEClient(url) as c:
            try:
                c.wait_ready(timeout=ready_timeout)
            except TimeoutError:
                raise AssertionError(f"server not ready; its log:\n{log.read_text()}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
