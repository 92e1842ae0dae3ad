"""The Serve app on a two-node cluster: the same answers as the service in-process, and a killed replica."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
import numpy as np

from service.settings import Settings
from service.testing import serve_in_process

from .conftest import APP, ServeApp

K = 200


def _image(i: int) -> list[float]:
    return (np.random.default_rng(i).random(784) < 0.3).astype(np.float64).tolist()


async def _in_process(settings: dict, n: int) -> list[dict]:
    async with serve_in_process(Settings(**settings)) as svc:
        out = []
        for i in range(n):
            r = await svc.client.post("/loglik", params={"k": K, "seed": 1000 + i}, json={"images": [_image(i)]})
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


async def test_two_replicas_answer_64_concurrent_requests_like_the_app_in_process(serve_app: ServeApp) -> None:
    async with httpx.AsyncClient(base_url=serve_app.url, timeout=120) as client:

        async def one(i: int) -> httpx.Response:
            return await client.post("/loglik", params={"k": K, "seed": 1000 + i}, json={"images": [_image(i)]})

        responses = await asyncio.gather(*(one(i) for i in range(64)))
    assert [r.status_code for r in responses] == [200] * 64, [r.text for r in responses if r.status_code != 200]
    expected = await _in_process(serve_app.settings, 64)
    for r, want in zip(responses, expected, strict=True):
        got = r.json()
        assert (got["model"], got["k"], got["seed"]) == (want["model"], want["k"], want["seed"])
        # Float32 sums in another process (thread count, batch mates): the tolerances of tests/test_service.py.
        for key, rtol, atol in (("loglik", 1e-6, 1e-4), ("elbo", 1e-6, 1e-4), ("stderr", 1e-4, 1e-6), ("ess", 1e-4, 0)):
            np.testing.assert_allclose(got["results"][0][key], want["results"][0][key], rtol=rtol, atol=atol)
    served = collections.Counter(r.headers["x-iwae-replica"] for r in responses)
    assert len(served) == 2, served
    # Errors and routes are the app's own.
    async with httpx.AsyncClient(base_url=serve_app.url, timeout=60) as client:
        bad = await client.post("/loglik", params={"k": 0}, json={"images": [_image(0)]})
        models = await client.get("/models")
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_parameter"
    assert {m["name"] for m in models.json()["models"]} == {"tiny", "tiny2l"}


def _replicas() -> list[str]:
    from ray.util import list_named_actors

    return sorted(a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::"))


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["IwaeService"]
    return int(status.replica_states.get("RUNNING", 0))


async def test_a_replica_killed_mid_load_is_replaced_and_clients_see_only_200_or_503(serve_app: ServeApp) -> None:
    import ray

    statuses: collections.Counter[int] = collections.Counter()
    served: collections.Counter[str] = collections.Counter()
    no_retry_after: list[str] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=serve_app.url, timeout=120) as c:
            while not stop.is_set():
                r = await c.post("/loglik", params={"k": 2000, "seed": i}, json={"images": [_image(i)]})
                statuses[r.status_code] += 1
                served[r.headers.get("x-iwae-replica", "-")] += 1
                if r.status_code == 503 and not r.headers.get("retry-after"):
                    no_retry_after.append(r.text)

    before = _replicas()
    assert len(before) == 2
    clients = [asyncio.create_task(client(i)) for i in range(16)]
    await asyncio.sleep(2)
    victim = before[0]
    ray.kill(ray.get_actor(victim, namespace="serve"))
    victim_id = victim.rsplit("#", 1)[1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = _replicas()
        new = [r.rsplit("#", 1)[1] for r in now if r not in before]
        if victim not in now and new and served[new[0]] > 0 and _running_replicas() == 2:
            break
    stop.set()
    await asyncio.gather(*clients)
    assert victim not in _replicas() and len(_replicas()) == 2 and _running_replicas() == 2
    assert new and served[new[0]] > 0, f"the replacement replica served nothing: {served}"
    assert served[victim_id] > 0
    assert set(statuses) <= {200, 503}, statuses
    assert not no_retry_after
    assert statuses[200] > 0
