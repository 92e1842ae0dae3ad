"""The service on the fair scheduler, in-process: mixed-k requests share engine calls yet each gets its own
answer; a small request finishes while a big one is still computing (an ordering, not a timing); timeout_ms
and client disconnects stop a big job early (rows computed); queue limits and drain answer 503 with a
computed Retry-After; API keys on and off; the Python client's api_key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.config import ModelConfig
from models.networks import IWAE
from service.client import AsyncIWAEClient, UnauthorizedError
from service.settings import Settings
from service.testing import serve_in_process, tiny_model, write_checkpoint

ROWS = {"model": "tiny"}


def images(n: int, seed: int) -> list[list[float]]:
    return (np.random.default_rng(seed).random((n, 784)) < 0.4).astype(np.float64).tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_checkpoint(d / "tiny.safetensors", tiny_model(latent_dims=(4, 3)))
    # The paper's 1-layer widths: rows slow enough that a big job takes a while on any machine.
    write_checkpoint(d / "wide.safetensors", IWAE(ModelConfig(x_dim=784, latent_dims=(50,), hidden_dims=((200, 200),))))
    return d


def settings(model_dir: Path, **kw: Any) -> Settings:
    return Settings(models=[model_dir], default_model="tiny", device="cpu", **kw)


async def wait_for(cond: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.002)


async def test_mixed_k_requests_share_engine_calls_and_match_alone(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir)) as svc:
        sched = svc.scheduler()
        reqs = [
            (f"/loglik?k={k}&seed={100 + i}", {"images": images(1 + i % 3, seed=i)})
            for i, k in enumerate([3, 40, 7, 40, 1, 25])
        ]
        calls = svc.metric("iwae_engine_call_seconds_count", ROWS)
        sched.pause()
        tasks = [asyncio.create_task(svc.client.post(url, json=body)) for url, body in reqs]
        await wait_for(lambda: sched.depth == len(reqs))
        sched.resume()
        together = [r.json() for r in await asyncio.gather(*tasks)]
        assert svc.metric("iwae_engine_call_seconds_count", ROWS) - calls <= 2  # six jobs, k from 1 to 40
        for (url, body), got in zip(reqs, together, strict=True):
            alone = (await svc.client.post(url, json=body)).json()
            for a, b in zip(got["results"], alone["results"], strict=True):
                np.testing.assert_allclose(a["loglik"], b["loglik"], rtol=2e-6)
                np.testing.assert_allclose(a["ess"], b["ess"], rtol=1e-4)


async def test_small_request_finishes_while_a_big_one_computes(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir, memory_bytes=2**20)) as svc:
        sched = svc.scheduler()
        sched.pause()
        big = asyncio.create_task(svc.client.post("/loglik?k=2000&seed=1", json={"images": images(50, 0)}))
        await wait_for(lambda: sched.depth == 1)
        small = asyncio.create_task(svc.client.post("/loglik?k=50&seed=2", json={"images": images(1, 1)}))
        await wait_for(lambda: sched.depth == 2)
        sched.resume()
        r = await small
        assert r.status_code == 200
        assert not big.done() and sched.rows_computed < 50 * 2000  # the big one is still computing
        assert (await big).status_code == 200


async def test_timeout_ms_is_validated_and_only_shortens(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir, timeout_s=0.3)) as svc:
        body = {"images": images(1, 0)}
        for bad in ("0", "-5", "abc", "nan", "inf"):
            r = await svc.client.post(f"/loglik?k=5&timeout_ms={bad}", json=body)
            assert r.status_code == 422, bad
            assert r.json()["error"] == "invalid_parameter" and "timeout_ms" in r.json()["detail"]
        assert (await svc.client.post("/loglik?k=5&timeout_ms=10000", json=body)).status_code == 200
        sched = svc.scheduler()
        sched.pause()
        loop = asyncio.get_running_loop()
        start = loop.time()
        r = await svc.client.post("/loglik?k=5&timeout_ms=100000", json=body)  # cannot lengthen 0.3 s
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert loop.time() - start < 5
        r = await svc.client.get("/sample?n=2&timeout_ms=20")
        assert r.status_code == 504
        sched.resume()
        assert svc.metric("iwae_rejections_total", {"reason": "timeout"}) == 2


async def test_deadline_stops_a_big_job_between_chunks(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir)) as svc:
        sched = svc.scheduler("wide")
        total = 100 * 5000
        r = await svc.client.post("/loglik?model=wide&k=5000&timeout_ms=200", json={"images": images(100, 0)})
        assert r.status_code == 504
        assert await asyncio.to_thread(sched.wait_idle, 30)
        computed = svc.metric("iwae_rows_computed_total", {"model": "wide"})
        assert 0 < computed < total / 2, computed  # stopped early, well before the end
        assert svc.metric("iwae_jobs_dropped_total", {"model": "wide", "reason": "timeout"}) == 1


async def test_client_disconnect_stops_a_big_job(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir)) as svc:
        sched = svc.scheduler("wide")
        body = json.dumps({"images": images(100, 1)}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/loglik", "raw_path": b"/loglik", "root_path": "", "query_string": b"model=wide&k=5000&seed=1",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("iwae.test", 80),
        }  # fmt: skip
        call = asyncio.create_task(svc.app(scope, receive, send))
        await wait_for(lambda: sched.rows_computed > 0)  # computing
        gone.set()
        await asyncio.wait_for(call, 30)
        assert await asyncio.to_thread(sched.wait_idle, 30)
        assert sched.rows_computed < 100 * 5000 / 2
        assert svc.metric("iwae_jobs_dropped_total", {"model": "wide", "reason": "client_gone"}) == 1
        assert svc.metric("iwae_requests_total", {"route": "/loglik", "method": "POST", "status": "499"}) == 1


async def test_full_queue_and_drain_answer_503_with_computed_retry_after(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir, queue_size=2)) as svc:
        sched = svc.scheduler()
        sched.pause()
        held = [
            asyncio.create_task(svc.client.post(f"/loglik?k=5000&seed={i}", json={"images": images(50, i)}))
            for i in range(2)
        ]
        await wait_for(lambda: sched.depth == 2)
        r = await svc.client.post("/loglik?k=5", json={"images": images(1, 9)})
        assert r.status_code == 503 and r.json()["error"] == "queue_full"
        retry = int(r.headers["retry-after"])
        assert retry == sched.retry_after() and 1 <= retry <= 60
        assert svc.metric("iwae_queued_cost", ROWS) == 2 * 50 * 5000
        assert svc.metric("iwae_rejections_total", {"reason": "queue_full"}) == 1

        svc.state.begin_drain()
        ready = await svc.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"] == "draining"
        r = await svc.client.get("/sample?n=2")
        assert r.status_code == 503 and r.json()["error"] == "shutting_down" and "retry-after" in r.headers
        assert svc.metric("iwae_rejections_total", {"reason": "draining"}) == 1
        sched.resume()
        assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200]  # the work in hand finishes
        assert await svc.state.drained(10.0)


async def test_api_keys_on(model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# keys\nkey-one\nkey-two\n")
    async with serve_in_process(settings(model_dir, api_keys=str(key_file))) as svc:
        body = {"images": images(1, 0)}
        r = await svc.client.post("/loglik?k=5", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "unauthorized"
        wrong = await svc.client.post("/loglik?k=5", json=body, headers={"Authorization": "Bearer key-three"})
        assert wrong.status_code == 401
        ok = await svc.client.post("/loglik?k=5", json=body, headers={"Authorization": "Bearer key-two"})
        assert ok.status_code == 200
        assert (await svc.client.get("/healthz")).status_code == 200
        assert (await svc.client.get("/readyz")).status_code == 200
        assert (await svc.client.get("/metrics")).status_code == 401
        assert (await svc.client.get("/openapi.json")).status_code == 401
        async with AsyncIWAEClient("http://iwae.test", transport=svc.transport, api_key="key-one") as client:
            assert (await client.loglik(np.array(body["images"]), k=5, seed=1)).loglik.shape == (1,)
        async with AsyncIWAEClient("http://iwae.test", transport=svc.transport) as client:
            with pytest.raises(UnauthorizedError):
                await client.sample(2)
        metrics = (await svc.client.get("/metrics", headers={"Authorization": "Bearer key-one"})).text
        assert 'iwae_rejections_total{reason="unauthorized"} 5.0' in metrics
        assert "key-one" not in metrics and "key-two" not in metrics
    assert "key-one" not in caplog.text and "key-two" not in caplog.text
    async with serve_in_process(settings(model_dir, api_keys="k1", metrics_public=True)) as svc:
        assert (await svc.client.get("/metrics")).status_code == 200
        assert (await svc.client.get("/models")).status_code == 401


async def test_api_keys_off_by_default(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir)) as svc:
        assert (await svc.client.get("/models")).status_code == 200
        assert (await svc.client.get("/metrics")).status_code == 200


async def test_a_burst_of_tiny_requests_is_merged_and_matches_alone(model_dir: Path) -> None:
    """Tiny requests that arrive together go to the workers and share engine calls (the first of them is not
    computed on the event loop before the others are counted in flight); each answer is its answer alone."""
    async with serve_in_process(settings(model_dir)) as svc:
        reqs = [(f"/loglik?k=50&seed={200 + i}", {"images": images(1, seed=50 + i)}) for i in range(12)]
        calls = svc.metric("iwae_engine_call_seconds_count", ROWS)
        together = [r.json() for r in await asyncio.gather(*(svc.client.post(u, json=b) for u, b in reqs))]
        assert svc.metric("iwae_engine_call_seconds_count", ROWS) - calls < len(reqs)
        for (url, body), got in zip(reqs, together, strict=True):
            alone = (await svc.client.post(url, json=body)).json()
            assert got["results"] == alone["results"]  # bit for bit: the JSON floats round-trip exactly
