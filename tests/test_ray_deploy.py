"""Ray pieces that need no cluster: the Serve and KubeRay configs, the replica's middlewares and readiness
gate, and the shard arithmetic of sharded evaluation (equal to the local evaluation, image for image)."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from models.checkpoint import to_bytes
from service.app import create_app
from service.ray_serve import (
    DEPLOYMENT_NAME,
    ReplicaLostMiddleware,
    readiness,
    ready_before_traffic,
    settings_from_args,
)
from service.settings import Settings
from service.testing import tiny_model, write_checkpoint
from training.distributed import ShardTask, evaluate_shard, merge_shards, noise_states, shard_bounds
from training.evaluate import evaluate_dataset, images_per_batch

ROOT = Path(__file__).parents[1]
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
RAYSERVICE_YAML = ROOT / "deploy" / "k8s" / "rayservice.yaml"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Hundreds of small engine chunks: one thread avoids OpenMP fork/join costs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resolve(import_path: str) -> Any:
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)


def test_serve_config_names_a_real_builder_valid_args_and_the_deployment() -> None:
    config = yaml.safe_load(SERVE_YAML.read_text())
    (app,) = config["applications"]
    assert callable(_resolve(app["import_path"]))
    settings = settings_from_args(app["args"])
    (dep,) = app["deployments"]
    assert dep["name"] == DEPLOYMENT_NAME
    assert settings.threads == dep["ray_actor_options"]["num_cpus"]
    assert dep["autoscaling_config"]["target_ongoing_requests"] <= dep["max_ongoing_requests"]
    assert dep["graceful_shutdown_timeout_s"] > 0 and dep["health_check_period_s"] > 0
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(config)  # Ray's own validation of `serve run` configs


def test_rayservice_runs_the_same_application_as_serve_yaml() -> None:
    manifest = yaml.safe_load(RAYSERVICE_YAML.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config["applications"] == yaml.safe_load(SERVE_YAML.read_text())["applications"]
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert container["image"] == "iwae-serve:latest"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert callable(_resolve(env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]))


def test_settings_from_args_refuses_unknown_and_serve_owned_settings() -> None:
    assert settings_from_args({"max_k": 10, "device": "cpu"}).max_k == 10
    with pytest.raises(ValueError, match=r"unknown service setting.*max_kk"):
        settings_from_args({"max_kk": 10})
    with pytest.raises(ValueError, match="port: set by Serve"):
        settings_from_args({"port": 9000})


async def _call(app: Any, path: str = "/x") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.get(path)


async def test_a_request_whose_replica_died_gets_503_with_retry_after() -> None:
    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Serve's proxy does when the replica's actor died mid-request

    async def answering(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"tea"})

    r = await _call(ReplicaLostMiddleware(silent, retry_after_s=3))
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json()["error"] == "replica_unavailable"
    r = await _call(ReplicaLostMiddleware(answering))
    assert (r.status_code, r.text, r.headers.get("retry-after")) == (418, "tea", None)


async def test_replica_startup_ends_only_when_readyz_says_ready(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    app = create_app(Settings(models=[tmp_path], default_model="tiny", device="cpu"))
    assert (await readiness(app))[0] == 503  # not started
    gated = ready_before_traffic(app)
    async with gated.router.lifespan_context(gated):
        status, body = await readiness(gated)  # no wait: startup already waited for the warm-up
        assert (status, body["models"]) == (200, ["tiny"])
    assert (await readiness(app))[0] == 503  # shut down


def test_shards_start_on_batch_boundaries_and_cover_the_data_set() -> None:
    for n, per_batch, shards in ((300, 16, 2), (300, 16, 7), (10, 16, 4), (17, 16, 2), (1000, 7, 13)):
        bounds = shard_bounds(n, per_batch, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a % per_batch == 0 and a < b for a, b in bounds)
        assert all(b1 == a2 for (_, b1), (a2, _) in itertools.pairwise(bounds))
        assert len(bounds) == min(shards, -(-n // per_batch))
    with pytest.raises(ValueError, match="shards >= 1"):
        shard_bounds(10, 4, 0)


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.usefixtures("one_thread")
def test_shards_reproduce_the_local_evaluation_image_for_image(shards: int) -> None:
    model = tiny_model(latent_dims=(4, 3), seed=1)
    x = torch.bernoulli(torch.full((100, 784), 0.3), generator=torch.Generator().manual_seed(0))
    k, seed, memory = 30, 5, 4 * 30 * 7 * 4 * 16  # 16 images per batch
    local = evaluate_dataset(model, x, k, seed=seed, memory_bytes=memory)
    per_batch = images_per_batch(model, k, memory)
    assert per_batch == 16
    bounds = shard_bounds(100, per_batch, shards)
    states = noise_states(model, k, 100, per_batch, [a for a, _ in bounds], seed)
    checkpoint = to_bytes(model, {"name": "shard"})
    parts = [
        evaluate_shard(ShardTask(checkpoint, x[a:b].numpy(), k, state, memory, "cpu", None))
        for (a, b), state in zip(bounds, states, strict=True)
    ]
    merged = merge_shards(parts, k, 0.0)
    assert torch.equal(merged.per_image, local.per_image)
    assert (merged.loglik, merged.loglik_stderr, merged.n_images) == (local.loglik, local.loglik_stderr, 100)
    assert merged.elbo == pytest.approx(local.elbo, rel=1e-12)
    assert merged.mc_stderr == pytest.approx(local.mc_stderr, rel=1e-12)
    with pytest.raises(ValueError, match="not an increasing multiple"):
        noise_states(model, k, 100, per_batch, [0, 5], seed)
