"""Dynamic batching: concurrent requests share batches yet each gets its own answer; queue limits, timeouts
and clients that go away."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import from_bytes
from models.engine import bound_stats, engine_log_weights
from service.settings import Settings
from service.testing import InProcessService, serve_in_process, tiny_model, write_checkpoint


def images(n: int, seed: int) -> list[list[float]]:
    return (np.random.default_rng(seed).random((n, 784)) < 0.4).astype(np.float64).tolist()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_checkpoint(tmp_path / "tiny.safetensors", tiny_model(latent_dims=(4, 3)))
    return tmp_path


def settings(model_dir: Path, **kw: Any) -> Settings:
    return Settings(models=[model_dir], default_model="tiny", device="cpu", **kw)


async def wait_depth(svc: InProcessService, depth: int, timeout: float = 10.0) -> None:
    engine = svc.scheduler()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.depth < depth:
        assert loop.time() < deadline, f"queue depth {engine.depth}, expected {depth}"
        await asyncio.sleep(0.002)


def batch_sizes(svc: InProcessService) -> tuple[float, float]:
    """(number of batches, total requests in them) from the batch-size histogram."""
    labels = {"model": "tiny"}
    return svc.metric("iwae_batch_size_count", labels), svc.metric("iwae_batch_size_sum", labels)


async def test_concurrent_requests_are_batched_and_match_alone(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir, max_wait_ms=1)) as svc:
        engine = svc.scheduler()
        reqs = [(f"/loglik?k=40&seed={100 + i}", {"images": images(1 + i % 3, seed=i)}) for i in range(12)]
        engine.pause()  # hold the worker so that all 12 are queued at once: one batch, deterministically
        tasks = [asyncio.create_task(svc.client.post(url, json=body)) for url, body in reqs]
        await wait_depth(svc, len(reqs))
        n_before, total_before = batch_sizes(svc)
        engine.resume()
        batched = [r.json() for r in await asyncio.gather(*tasks)]
        n_after, total_after = batch_sizes(svc)
        assert (n_after - n_before, total_after - total_before) == (1, 12)  # one batch of 12 requests
        assert svc.metric("iwae_batch_images_sum", {"model": "tiny"}) >= sum(len(b["images"]) for _, b in reqs)

        alone = []
        for url, body in reqs:
            alone.append((await svc.client.post(url, json=body)).json())
        assert batch_sizes(svc)[0] == n_after + len(reqs)  # now one batch per request
        for b, a in zip(batched, alone, strict=True):
            assert b["seed"] == a["seed"] and b["n_images"] == a["n_images"]
            for rb, ra in zip(b["results"], a["results"], strict=True):
                # Float32 rounding only (matmuls of other shapes): ~1e-6 relative on the log-weights.
                for key in ("loglik", "elbo"):
                    np.testing.assert_allclose(rb[key], ra[key], rtol=2e-6, err_msg=key)
                for key in ("ess", "stderr"):
                    np.testing.assert_allclose(rb[key], ra[key], rtol=2e-4, err_msg=key)


async def test_batched_requests_match_the_engine(model_dir: Path) -> None:
    path = model_dir / "tiny.safetensors"
    model, _, _ = from_bytes(path.read_bytes(), source=str(path))
    async with serve_in_process(settings(model_dir)) as svc:
        engine = svc.scheduler()
        engine.pause()
        xs = [images(2, seed=50 + i) for i in range(5)]
        tasks = [
            asyncio.create_task(svc.client.post(f"/loglik?k=25&seed={i}", json={"images": x})) for i, x in enumerate(xs)
        ]
        await wait_depth(svc, 5)
        engine.resume()
        for i, (task, x) in enumerate(zip(tasks, xs, strict=True)):
            got = [r["loglik"] for r in (await task).json()["results"]]
            noise = model.draw_noise(25, 2, generator=torch.Generator().manual_seed(i))
            want = bound_stats(engine_log_weights(model, torch.tensor(x, dtype=torch.float32), noise)).loglik
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)


async def test_batches_respect_cost_budget_and_k(model_dir: Path) -> None:
    # Budget 100 (images × k): three k=40 one-image requests cannot share a batch of more than two.
    async with serve_in_process(settings(model_dir, batch_cost=100, max_wait_ms=0)) as svc:
        engine = svc.scheduler()
        engine.pause()
        urls = ["/loglik?k=40&seed=1", "/loglik?k=40&seed=2", "/loglik?k=40&seed=3", "/loglik?k=10&seed=4"]
        tasks = [asyncio.create_task(svc.client.post(u, json={"images": images(1, 0)})) for u in urls]
        await wait_depth(svc, 4)
        before = batch_sizes(svc)
        engine.resume()
        results = [r.json() for r in await asyncio.gather(*tasks)]
        after = batch_sizes(svc)
        # [k40, k40] (cost 80; the third k40 would exceed 100), [k40] alone (k10 has another k), [k10].
        assert (after[0] - before[0], after[1] - before[1]) == (3, 4)
        assert [r["k"] for r in results] == [40, 40, 40, 10]
        assert svc.metric("iwae_batch_cost_sum", {"model": "tiny"}) >= 80 + 40 + 10


async def test_batching_off_with_one_request_per_batch(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir, max_batch_requests=1)) as svc:
        engine = svc.scheduler()
        engine.pause()
        tasks = [
            asyncio.create_task(svc.client.post(f"/loglik?k=5&seed={i}", json={"images": images(1, i)}))
            for i in range(4)
        ]
        await wait_depth(svc, 4)
        before = batch_sizes(svc)
        engine.resume()
        assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
        after = batch_sizes(svc)
        assert (after[0] - before[0], after[1] - before[1]) == (4, 4)


async def test_queue_full_gives_503_with_retry_after(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir, queue_size=2, retry_after_s=3)) as svc:
        engine = svc.scheduler()
        engine.pause()
        tasks = [
            asyncio.create_task(svc.client.post(f"/loglik?k=5&seed={i}", json={"images": images(1, i)}))
            for i in range(2)
        ]
        await wait_depth(svc, 2)
        r = await svc.client.post("/loglik?k=5", json={"images": images(1, 9)})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "3"
        assert r.json()["error"] == "queue_full" and "retry after 3 s" in r.json()["detail"]
        # Other work for the same model is refused too, at once, while the queue is full.
        assert (await svc.client.get("/sample?n=2")).status_code == 503
        assert svc.metric("iwae_queue_rejections_total", {"model": "tiny"}) == 2
        assert svc.metric("iwae_queue_depth", {"model": "tiny"}) == 2
        engine.resume()
        assert [t.status_code for t in await asyncio.gather(*tasks)] == [200, 200]
        assert (await svc.client.post("/loglik?k=5", json={"images": images(1, 9)})).status_code == 200


async def test_timeout_gives_504_and_drops_the_job(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir, timeout_s=0.2)) as svc:
        engine = svc.scheduler()
        samples_before = svc.metric("iwae_samples_evaluated_total", {"model": "tiny"})
        engine.pause()
        r = await svc.client.post("/loglik?k=7", json={"images": images(1, 0)})
        assert r.status_code == 504
        assert r.json()["error"] == "timeout" and "IWAE_TIMEOUT_S" in r.json()["detail"]
        assert engine.depth == 0  # removed from the queue at once
        assert svc.metric("iwae_requests_dropped_total", {"model": "tiny", "reason": "timeout"}) == 1
        engine.resume()
        ok = await svc.client.post("/loglik?k=3", json={"images": images(1, 0)})
        assert ok.status_code == 200
        # Only the second request was computed.
        assert svc.metric("iwae_samples_evaluated_total", {"model": "tiny"}) == samples_before + 3


async def test_client_gone_is_dropped_before_compute(model_dir: Path) -> None:
    async with serve_in_process(settings(model_dir)) as svc:
        engine = svc.scheduler()
        samples_before = svc.metric("iwae_samples_evaluated_total", {"model": "tiny"})
        body = json.dumps({"images": images(1, 0)}).encode()
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/loglik", "raw_path": b"/loglik", "root_path": "", "query_string": b"k=11&seed=1",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("iwae.test", 80),
        }  # fmt: skip
        engine.pause()
        call = asyncio.create_task(svc.app(scope, receive, send))
        await wait_depth(svc, 1)
        gone.set()
        await asyncio.wait_for(call, 5)
        assert engine.depth == 0
        assert svc.metric("iwae_requests_dropped_total", {"model": "tiny", "reason": "client_gone"}) == 1
        engine.resume()
        assert (await svc.client.post("/loglik?k=2", json={"images": images(1, 0)})).status_code == 200
        assert svc.metric("iwae_samples_evaluated_total", {"model": "tiny"}) == samples_before + 2
        assert svc.metric("iwae_requests_total", {"route": "/loglik", "method": "POST", "status": "499"}) == 1


async def test_many_concurrent_requests_without_pausing(model_dir: Path) -> None:
    # Natural arrival: 24 requests in flight with a generous wait end up in fewer than 24 batches.
    async with serve_in_process(settings(model_dir, max_wait_ms=20)) as svc:
        before = batch_sizes(svc)
        x = {"images": images(1, 3)}
        rs = await asyncio.gather(*(svc.client.post(f"/loglik?k=30&seed={i}", json=x) for i in range(24)))
        after = batch_sizes(svc)
        assert all(r.status_code == 200 for r in rs)
        assert after[1] - before[1] == 24
        assert after[0] - before[0] < 24
        alone = (await svc.client.post("/loglik?k=30&seed=5", json=x)).json()
        np.testing.assert_allclose(rs[5].json()["results"][0]["loglik"], alone["results"][0]["loglik"], rtol=1e-5)


async def test_a_lone_client_never_waits_for_company(model_dir: Path) -> None:
    import time

    async with serve_in_process(settings(model_dir, max_wait_ms=400)) as svc:
        engine = svc.scheduler()

        async def timed() -> float:
            start = time.perf_counter()
            assert (await svc.client.post("/loglik?k=5&seed=1", json={"images": images(1, 0)})).status_code == 200
            return time.perf_counter() - start

        assert await timed() < 0.3  # the last batch held one request: no wait
        engine.pause()
        tasks = [
            asyncio.create_task(svc.client.post(f"/loglik?k=5&seed={i}", json={"images": images(1, i)}))
            for i in range(3)
        ]
        await wait_depth(svc, 3)
        engine.resume()
        await asyncio.gather(*tasks)
        assert await timed() >= 0.35  # after a batch of three, a batch waits up to max_wait for more
        assert await timed() < 0.3  # ...which came alone: back to no wait


async def test_noise_prefetch_is_bounded_and_changes_nothing(model_dir: Path) -> None:
    path = model_dir / "tiny.safetensors"
    model, _, _ = from_bytes(path.read_bytes(), source=str(path))
    # Prefetch budget = 2 × batch cost = 20000 samples: four of six k=5000 one-image jobs.
    async with serve_in_process(settings(model_dir, batch_cost=10_000)) as svc:
        engine = svc.scheduler()
        engine.pause()
        xs = [images(1, seed=70 + i) for i in range(6)]
        tasks = [
            asyncio.create_task(svc.client.post(f"/loglik?k=5000&seed={i}", json={"images": x}))
            for i, x in enumerate(xs)
        ]
        await wait_depth(svc, 6)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while sum(j.noise is not None for j in list(engine._queue)) < 4:
            assert loop.time() < deadline, "the prefetcher did not draw ahead"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert sum(j.preparing is not None for j in list(engine._queue)) == 4  # and no more
        engine.resume()
        for i, (task, x) in enumerate(zip(tasks, xs, strict=True)):
            got = (await task).json()["results"][0]["loglik"]
            noise = model.draw_noise(5000, 1, generator=torch.Generator().manual_seed(i))
            want = bound_stats(engine_log_weights(model, torch.tensor(x, dtype=torch.float32), noise)).loglik
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-6)
        assert engine._prefetched_cost == 0
