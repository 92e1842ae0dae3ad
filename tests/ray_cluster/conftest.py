"""A two-node local Ray cluster on loopback, shared by the tests of this folder, with the Serve app on it.

These tests run only inside a private network namespace holding just loopback (tests/test_ray_cluster.py
starts them there with IWAE_RAY_NETNS=1): Ray would otherwise bind to the machine's network address.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.testing import tiny_model, write_checkpoint

INSIDE = os.environ.get("IWAE_RAY_NETNS") == "1"
# Collected only inside the namespace; the outer test run sees just tests/test_ray_cluster.py.
collect_ignore_glob = [] if INSIDE else ["test_*.py"]

LOOPBACK = "127.0.0.1"
APP = "iwae"
SETTINGS = {"default_model": "tiny", "device": "cpu", "threads": 1}


@dataclass
class RayCluster:
    address: str  # the GCS address
    models: Path


@dataclass
class ServeApp:
    url: str
    settings: dict[str, Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    # The local references run here beside the cluster's processes: one thread avoids OpenMP contention.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    import ray
    from ray.cluster_utils import Cluster

    interfaces = [name for _, name in socket.if_nameindex()]
    assert interfaces == ["lo"], f"not inside a loopback-only network namespace: {interfaces}"
    models = tmp_path_factory.mktemp("models")
    write_checkpoint(models / "tiny.safetensors", tiny_model(seed=0))
    write_checkpoint(models / "tiny2l.safetensors", tiny_model(latent_dims=(4, 3), seed=1))
    node = {"num_cpus": 2, "node_ip_address": LOOPBACK}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2
        assert {n["NodeManagerAddress"] for n in nodes} == {LOOPBACK}
        assert cluster.address.split(":")[0] == LOOPBACK
        yield RayCluster(cluster.address, models)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def serve_app(ray_cluster: RayCluster) -> Iterator[ServeApp]:
    from ray import serve

    from service.ray_serve import deployment

    assert os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == "service.ray_serve:proxy_middlewares"
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": port})
    settings = {**SETTINGS, "models": [str(ray_cluster.models)]}
    # 16 ongoing requests per replica: 64 concurrent clients must spread over both replicas.
    app = deployment(settings).options(
        num_replicas=2, max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.5}, health_check_period_s=2
    )
    serve.run(app.bind(), name=APP, route_prefix="/")
    try:
        yield ServeApp(f"http://{LOOPBACK}:{port}", settings)
    finally:
        serve.shutdown()
