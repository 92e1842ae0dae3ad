"""The Python client: results as NumPy arrays, typed errors carrying the server's message, 503 retries that
honour Retry-After (against a mock transport and against the real app with a full queue)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import (
    AsyncIWAEClient,
    BadRequestError,
    GatewayTimeoutError,
    InvalidInputError,
    IWAEClient,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
)
from service.settings import Settings
from service.testing import InProcessService, serve_in_process, tiny_model, write_checkpoint

LOGLIK_BODY = {
    "model": "m",
    "k": 3,
    "seed": 5,
    "binarize": "none",
    "n_images": 2,
    "results": [
        {"loglik": -1.5, "stderr": 0.1, "ess": 2.0, "elbo": -2.0, "bits_per_dim": 0.2},
        {"loglik": -3.0, "stderr": None, "ess": 1.0, "elbo": -3.0, "bits_per_dim": 0.4},
    ],
}


def binary(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 28, 28)) < 0.3).astype(np.float32)


def test_retries_honour_retry_after() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "0.2"}, json={"error": "queue_full", "detail": "full"})
        return httpx.Response(200, json=LOGLIK_BODY)

    with IWAEClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        result = client.loglik(binary(2), k=3)
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.2 and calls[2] - calls[1] >= 0.2
    np.testing.assert_array_equal(result.loglik, [-1.5, -3.0])
    assert np.isnan(result.stderr[1]) and result.stderr[0] == 0.1
    assert (result.model, result.k, result.seed) == ("m", 3, 5)


def test_gives_up_after_max_retries() -> None:
    slept: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "4"}, json={"error": "queue_full", "detail": "busy"})

    client = IWAEClient("http://svc", transport=httpx.MockTransport(handler), max_retries=2, sleep=slept.append)
    with pytest.raises(ServiceUnavailableError) as err:
        client.sample(2)
    assert slept == [4.0, 4.0]
    assert err.value.retry_after == 4.0 and err.value.message == "busy" and err.value.code == "queue_full"


def test_request_carries_images_as_npy_and_parameters() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=LOGLIK_BODY)

    x = binary(2, seed=1)
    IWAEClient("http://svc", transport=httpx.MockTransport(handler)).loglik(x, k=3, seed=5, binarize="threshold")
    (req,) = seen
    assert req.url.path == "/loglik"
    assert dict(req.url.params) == {"k": "3", "seed": "5", "binarize": "threshold"}
    assert req.headers["content-type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(req.content)), x)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (404, NotFoundError),
        (413, PayloadTooLargeError),
        (415, UnsupportedMediaTypeError),
        (422, InvalidInputError),
        (503, ServiceUnavailableError),
        (504, GatewayTimeoutError),
        (500, ServerError),
    ],
)
def test_typed_errors(status: int, cls: type[Exception]) -> None:
    body = {"error": "some_code", "detail": f"the server says {status}"}
    transport = httpx.MockTransport(lambda r: httpx.Response(status, json=body))
    with pytest.raises(cls) as err, IWAEClient("http://svc", transport=transport, max_retries=0) as client:
        client.models()
    assert err.value.status == status  # type: ignore[attr-defined]
    assert err.value.message == f"the server says {status}"  # type: ignore[attr-defined]
    assert err.value.code == "some_code"  # type: ignore[attr-defined]


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[InProcessService]:
    write_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    settings = Settings(models=[tmp_path], default_model="tiny", device="cpu", queue_size=1, retry_after_s=2)
    async with serve_in_process(settings) as s:
        yield s


async def test_async_client_against_the_app(svc: InProcessService, tmp_path: Path) -> None:
    async with AsyncIWAEClient("http://iwae.test", transport=svc.transport) as client:
        x = binary(3, seed=2)
        r = await client.loglik(x, k=12, seed=4)
        raw = (await svc.client.post("/loglik?k=12&seed=4", json={"images": x.reshape(3, -1).tolist()})).json()
        np.testing.assert_array_equal(r.loglik, [row["loglik"] for row in raw["results"]])
        assert r.loglik.shape == r.stderr.shape == r.ess.shape == r.elbo.shape == r.bits_per_dim.shape == (3,)

        paths = []
        for i, img in enumerate(x):
            p = tmp_path / f"img{i}.png"
            Image.fromarray((img * 255).astype(np.uint8), mode="L").save(p)
            paths.append(p)
        from_files = await client.loglik(paths, k=12, seed=4)
        np.testing.assert_array_equal(from_files.loglik, r.loglik)

        enc = await client.encode(x, samples=2, seed=1)
        assert enc.layers[0].mean.shape == (3, 4) and enc.layers[0].samples is not None
        assert enc.layers[0].samples.shape == (3, 2, 4)
        s = await client.sample(4, seed=3)
        assert s.probs.shape == (4, 784) and s.images().shape == (4, 28, 28) and s.seed == 3
        png = await client.sample_png(4, seed=3)
        assert Image.open(io.BytesIO(png)).format == "PNG"
        au = await client.active_units(binary(8, seed=5), seed=0)
        assert len(au.variances) == 1 and au.variances[0].shape == (4,)
        assert au.total == int((au.variances[0] > au.threshold).sum())
        models = await client.models()
        assert [m["name"] for m in models] == ["tiny"]
        assert (await client.model("tiny"))["config"]["latent_dims"] == [4]
        assert await client.ready()

        with pytest.raises(InvalidInputError, match="binarize=threshold") as err:
            await client.loglik(np.full((1, 784), 0.5), k=5)
        assert err.value.code == "not_binary"
        with pytest.raises(NotFoundError, match="unknown model 'nope'"):
            await client.loglik(x, k=5, model="nope")


async def test_async_client_retries_a_full_queue(svc: InProcessService) -> None:
    engine = svc.scheduler()
    engine.pause()
    blocker = asyncio.create_task(
        svc.client.post("/loglik?k=5&seed=0", json={"images": binary(1).reshape(1, -1).tolist()})
    )
    while engine.depth < 1:
        await asyncio.sleep(0.002)
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        # The server asked us to wait: let its queue drain meanwhile.
        waits.append(seconds)
        engine.resume()
        await blocker

    async with AsyncIWAEClient("http://iwae.test", transport=svc.transport, sleep=fake_sleep) as client:
        result = await client.loglik(binary(1, seed=1), k=5, seed=1)
    assert waits == [1.0]  # the server's Retry-After: its queued cost at its throughput, at least 1 s
    assert result.loglik.shape == (1,)
    assert svc.metric("iwae_rejections_total", {"reason": "queue_full"}) == 1
    assert blocker.result().status_code == 200


def test_error_from_non_json_body() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(502, text="bad gateway from a proxy"))
    with pytest.raises(ServerError, match="bad gateway from a proxy"):
        IWAEClient("http://svc", transport=transport).models()


def test_client_payload_for_lists_and_bytes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=LOGLIK_BODY)

    client = IWAEClient("http://svc", transport=httpx.MockTransport(handler))
    client.loglik([[0, 1] * 392], k=3)
    np.testing.assert_array_equal(np.load(io.BytesIO(seen[0].content)), [[0, 1] * 392])
    client.loglik([b"\x89PNG fake"], k=3)
    assert seen[1].headers["content-type"].startswith("multipart/form-data")
    assert b"\x89PNG fake" in seen[1].content
    assert b'filename="image0.png"' in seen[1].content


def _readiness_transport(not_ready_first: int) -> tuple[httpx.MockTransport, list[str]]:
    """/readyz answers 503 the first ``not_ready_first`` times, then 200; /healthz always 200."""
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if paths.count("/readyz") <= not_ready_first:
            return httpx.Response(503, json={"error": "not_ready", "detail": "warming up"})
        return httpx.Response(200, json={"status": "ready", "models": ["m"]})

    return httpx.MockTransport(handler), paths


def _refusing(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def test_sync_wait_ready_polls_with_the_injected_sleep() -> None:
    transport, paths = _readiness_transport(not_ready_first=2)
    slept: list[float] = []
    with IWAEClient("http://svc", transport=transport, sleep=slept.append) as client:
        assert client.healthy()
        client.wait_ready(timeout=60, interval=0.25)
    assert slept == [0.25, 0.25] and paths.count("/readyz") == 3
    assert not IWAEClient("http://svc", transport=httpx.MockTransport(_refusing)).healthy()


async def test_async_client_has_healthy_and_wait_ready() -> None:
    transport, paths = _readiness_transport(not_ready_first=3)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async with AsyncIWAEClient("http://svc", transport=transport, sleep=fake_sleep) as client:
        assert await client.healthy()
        await client.wait_ready(timeout=60, interval=0.5)
    assert slept == [0.5, 0.5, 0.5] and paths.count("/readyz") == 4

    never, _ = _readiness_transport(not_ready_first=10**9)
    async with AsyncIWAEClient("http://svc", transport=never, sleep=fake_sleep) as client:
        with pytest.raises(TimeoutError, match="not ready after 0 s"):
            await client.wait_ready(timeout=0)
    async with AsyncIWAEClient("http://svc", transport=httpx.MockTransport(_refusing)) as client:
        assert not await client.healthy() and not await client.ready()


def test_both_clients_have_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(AsyncIWAEClient) - {"aclose"} == public(IWAEClient) - {"close"}
