"""Python client for the service: `IWAEClient` (sync) and `AsyncIWAEClient`, on httpx.

    from service.client import IWAEClient
    with IWAEClient("http://127.0.0.1:8000") as c:
        r = c.loglik(images, k=5000, seed=0)   # images: [N, 28, 28] or [N, 784] array of 0/1
        r.loglik, r.stderr                     # NumPy arrays, one entry per image

Images go as an .npy body (exact and compact); file paths or bytes go as a multipart PNG/JPEG upload.
Errors come back as `IWAEError` subclasses carrying the server's message. A 503 (queue full) is retried
after the server's Retry-After, up to ``max_retries`` times.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

DEFAULT_URL = "http://127.0.0.1:8000"


# --- errors ---------------------------------------------------------------------------------------------
class IWAEError(Exception):
    """A non-2xx answer: ``status``, the server's ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BadRequestError(IWAEError):
    """400: malformed body (invalid JSON, undecodable image or .npy, empty body)."""


class NotFoundError(IWAEError):
    """404: unknown model or endpoint."""


class PayloadTooLargeError(IWAEError):
    """413: body, image count or images × k over the server's limits."""


class UnsupportedMediaTypeError(IWAEError):
    """415: the body's content type is not one the server reads."""


class InvalidInputError(IWAEError):
    """422: an invalid parameter or invalid images (shape, range, NaN, non-binary pixels)."""


class ServiceUnavailableError(IWAEError):
    """503: queue full, not ready or shutting down (still so after the retries)."""


class GatewayTimeoutError(IWAEError):
    """504: the request was not done within the server's timeout."""


class ServerError(IWAEError):
    """Any other error status."""


_BY_STATUS: dict[int, type[IWAEError]] = {
    400: BadRequestError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidInputError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: not sent by this server


def error_from_response(response: httpx.Response) -> IWAEError:
    try:
        body = response.json()
        code, message = str(body.get("error", "error")), str(body.get("detail", response.text))
    except (ValueError, AttributeError):
        code, message = "error", response.text or response.reason_phrase
    cls = _BY_STATUS.get(response.status_code, ServerError)
    return cls(response.status_code, code, message, _retry_after(response))


# --- results ----------------------------------------------------------------------------------------------
@dataclass
class LoglikResult:
    model: str
    k: int
    seed: int
    loglik: np.ndarray
    stderr: np.ndarray  # NaN where undefined (k = 1)
    ess: np.ndarray
    elbo: np.ndarray
    bits_per_dim: np.ndarray
    pareto_k: np.ndarray  # PSIS k̂ of each image's weights; NaN where undefined (k < 21)
    reliable: np.ndarray  # bool: pareto_k <= 0.7
    k_used: np.ndarray  # int: samples behind each estimate (< k where target_stderr was met earlier)


@dataclass
class LayerEncoding:
    layer: int
    mean: np.ndarray  # [N, d]
    std: np.ndarray  # [N, d]
    samples: np.ndarray | None  # [N, m, d]
    exact: bool


@dataclass
class EncodeResult:
    model: str
    seed: int
    layers: list[LayerEncoding]


@dataclass
class SampleResult:
    model: str
    seed: int
    probs: np.ndarray  # [n, x_dim]
    binary: np.ndarray  # [n, x_dim], uint8
    image_shape: tuple[int, int] | None

    def images(self) -> np.ndarray:
        """The probabilities reshaped to [n, H, W] (when the model has an image shape)."""
        if self.image_shape is None:
            raise ValueError("this model's samples have no image shape")
        return self.probs.reshape(-1, *self.image_shape)


@dataclass
class ActiveUnitsResult:
    model: str
    seed: int
    threshold: float
    variances: list[np.ndarray]  # A_u per layer
    active: list[int]  # count per layer

    @property
    def total(self) -> int:
        return sum(self.active)


def _loglik_result(body: dict[str, Any]) -> LoglikResult:
    rows = body["results"]

    def col(name: str) -> np.ndarray:
        return np.array([np.nan if r.get(name) is None else r[name] for r in rows], dtype=np.float64)

    return LoglikResult(
        body["model"],
        body["k"],
        body["seed"],
        col("loglik"),
        col("stderr"),
        col("ess"),
        col("elbo"),
        col("bits_per_dim"),
        col("pareto_k"),
        np.array([bool(r.get("reliable", False)) for r in rows]),
        np.array([int(r.get("k_used", body["k"])) for r in rows], dtype=np.int64),
    )


def _encode_result(body: dict[str, Any]) -> EncodeResult:
    layers = [
        LayerEncoding(
            layer=lay["layer"],
            mean=np.asarray(lay["mean"], dtype=np.float64),
            std=np.asarray(lay["std"], dtype=np.float64),
            samples=None if lay.get("samples") is None else np.asarray(lay["samples"], dtype=np.float64),
            exact=bool(lay["exact"]),
        )
        for lay in body["layers"]
    ]
    return EncodeResult(body["model"], body["seed"], layers)


def _sample_result(body: dict[str, Any]) -> SampleResult:
    shape = body.get("image_shape")
    return SampleResult(
        body["model"],
        body["seed"],
        np.asarray(body["probs"], dtype=np.float64),
        np.asarray(body["binary"], dtype=np.uint8),
        (int(shape[0]), int(shape[1])) if shape else None,
    )


def _active_units_result(body: dict[str, Any]) -> ActiveUnitsResult:
    return ActiveUnitsResult(
        body["model"],
        body["seed"],
        body["threshold"],
        [np.asarray(lay["variances"], dtype=np.float64) for lay in body["layers"]],
        [int(lay["active"]) for lay in body["layers"]],
    )


# --- request building --------------------------------------------------------------------------------------
ImagesLike = np.ndarray | Sequence[Any]


def _is_file_list(images: Any) -> bool:
    return (
        isinstance(images, list | tuple) and len(images) > 0 and all(isinstance(i, str | Path | bytes) for i in images)
    )


def _image_payload(images: ImagesLike) -> dict[str, Any]:
    """httpx keyword arguments carrying the images: .npy for arrays, multipart for files."""
    if _is_file_list(images):
        files = []
        for i, item in enumerate(images):
            if isinstance(item, bytes):
                files.append(("files", (f"image{i}.png", item, "application/octet-stream")))
            else:
                p = Path(item)
                files.append(("files", (p.name, p.read_bytes(), "application/octet-stream")))
        return {"files": files}
    arr = np.asarray(images)
    if arr.dtype.kind not in "biuf":
        arr = arr.astype(np.float64)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {"content": buf.getvalue(), "headers": {"content-type": "application/x-npy"}}


def _params(**kwargs: Any) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if v is None:
            continue
        out[k] = str(v).lower() if isinstance(v, bool) else v
    return out


@dataclass
class _Call:
    method: str
    path: str
    params: dict[str, Any]
    payload: dict[str, Any]


class _Base:
    def __init__(self, max_retries: int, max_retry_wait: float) -> None:
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if response.status_code != 503 or attempt >= self.max_retries:
            return None
        after = _retry_after(response)
        return min(after if after is not None else 1.0, self.max_retry_wait)

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        raise error_from_response(response)

    # Request descriptions shared by both clients.
    @staticmethod
    def _loglik_call(
        images: ImagesLike,
        k: int,
        model: str | None,
        seed: int | None,
        binarize: str,
        resize: bool,
        target_stderr: float | None = None,
    ) -> _Call:
        return _Call(
            "POST",
            "/loglik",
            _params(k=k, model=model, seed=seed, binarize=binarize, resize=resize or None, target_stderr=target_stderr),
            _image_payload(images),
        )

    @staticmethod
    def _encode_call(
        images: ImagesLike, samples: int, model: str | None, seed: int | None, binarize: str, resize: bool
    ) -> _Call:
        return _Call(
            "POST",
            "/encode",
            _params(samples=samples, model=model, seed=seed, binarize=binarize, resize=resize or None),
            _image_payload(images),
        )

    @staticmethod
    def _active_units_call(
        images: ImagesLike, samples: int | None, model: str | None, seed: int | None, binarize: str, resize: bool
    ) -> _Call:
        return _Call(
            "POST",
            "/active-units",
            _params(samples=samples, model=model, seed=seed, binarize=binarize, resize=resize or None),
            _image_payload(images),
        )

    @staticmethod
    def _sample_call(n: int, fmt: str, model: str | None, seed: int | None, pixels: str | None = None) -> _Call:
        return _Call("GET", "/sample", _params(n=n, format=fmt, model=model, seed=seed, pixels=pixels), {})


class IWAEClient(_Base):
    """Synchronous client. ``sleep`` is how it waits before a retry (replaceable for tests)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 300.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(max_retries, max_retry_wait)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IWAEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.request(call.method, call.path, params=call.params, **call.payload)
            delay = self._retry_delay(response, attempt)
            if delay is None:
                return self._check(response)
            attempt += 1
            self._sleep(delay)

    def loglik(
        self,
        images: ImagesLike,
        k: int = 5000,
        *,
        model: str | None = None,
        seed: int | None = None,
        binarize: str = "none",
        resize: bool = False,
        target_stderr: float | None = None,
    ) -> LoglikResult:
        """L_k per image; with ``target_stderr`` (nats) the server stops each image's sampling once its
        standard error is at most that (``k`` is then the cap; ``k_used`` says where each stopped)."""
        call = self._loglik_call(images, k, model, seed, binarize, resize, target_stderr)
        return _loglik_result((self._send(call)).json())

    def encode(
        self,
        images: ImagesLike,
        *,
        samples: int = 0,
        model: str | None = None,
        seed: int | None = None,
        binarize: str = "none",
        resize: bool = False,
    ) -> EncodeResult:
        return _encode_result(self._send(self._encode_call(images, samples, model, seed, binarize, resize)).json())

    def sample(self, n: int = 16, *, model: str | None = None, seed: int | None = None) -> SampleResult:
        return _sample_result(self._send(self._sample_call(n, "json", model, seed)).json())

    def sample_png(
        self, n: int = 16, *, model: str | None = None, seed: int | None = None, pixels: str = "probs"
    ) -> bytes:
        return self._send(self._sample_call(n, "png", model, seed, pixels)).content

    def active_units(
        self,
        images: ImagesLike,
        *,
        samples: int | None = None,
        model: str | None = None,
        seed: int | None = None,
        binarize: str = "none",
        resize: bool = False,
    ) -> ActiveUnitsResult:
        call = self._active_units_call(images, samples, model, seed, binarize, resize)
        return _active_units_result(self._send(call).json())

    def models(self) -> list[dict[str, Any]]:
        return self._send(_Call("GET", "/models", {}, {})).json()["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self._send(_Call("GET", f"/models/{name}", {}, {})).json()

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> None:
        """Block until /readyz answers 200; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {timeout:g} s")
            time.sleep(interval)


class AsyncIWAEClient(_Base):
    """Asynchronous client with the same methods as `IWAEClient` (awaitable)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 300.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(max_retries, max_retry_wait)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)
        self._sleep = sleep

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncIWAEClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            response = await self._http.request(call.method, call.path, params=call.params, **call.payload)
            delay = self._retry_delay(response, attempt)
            if delay is None:
                return self._check(response)
            attempt += 1
            await self._sleep(delay)

    async def loglik(
        self,
        images: ImagesLike,
        k: int = 5000,
        *,
        model: str | None = None,
        seed: int | None = None,
        binarize: str = "none",
        resize: bool = False,
        target_stderr: float | None = None,
    ) -> LoglikResult:
        """L_k per image; with ``target_stderr`` (nats) the server stops each image's sampling once its
        standard error is at most that (``k`` is then the cap; ``k_used`` says where each stopped)."""
        call = self._loglik_call(images, k, model, seed, binarize, resize, target_stderr)
        return _loglik_result((await self._send(call)).json())

    async def encode(
        self,
        images: ImagesLike,
        *,
        samples: int = 0,
        model: str | None = None,
        seed: int | None = None,
        binarize: str = "none",
        resize: bool = False,
    ) -> EncodeResult:
        call = self._encode_call(images, samples, model, seed, binarize, resize)
        return _encode_result((await self._send(call)).json())

    async def sample(self, n: int = 16, *, model: str | None = None, seed: int | None = None) -> SampleResult:
        return _sample_result((await self._send(self._sample_call(n, "json", model, seed))).json())

    async def sample_png(
        self, n: int = 16, *, model: str | None = None, seed: int | None = None, pixels: str = "probs"
    ) -> bytes:
        return (await self._send(self._sample_call(n, "png", model, seed, pixels))).content

    async def active_units(
        self,
        images: ImagesLike,
        *,
        samples: int | None = None,
        model: str | None = None,
        seed: int | None = None,
        binarize: str = "none",
        resize: bool = False,
    ) -> ActiveUnitsResult:
        call = self._active_units_call(images, samples, model, seed, binarize, resize)
        return _active_units_result((await self._send(call)).json())

    async def models(self) -> list[dict[str, Any]]:
        return (await self._send(_Call("GET", "/models", {}, {}))).json()["models"]

    async def model(self, name: str) -> dict[str, Any]:
        return (await self._send(_Call("GET", f"/models/{name}", {}, {}))).json()

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
