"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from service.client.calls import DEFAULT_URL, Call, ClientBase, ImagesLike
from service.client.results import (
    ActiveUnitsResult,
    EncodeResult,
    LoglikResult,
    SampleResult,
    active_units_result,
    encode_result,
    loglik_result,
    sample_result,
)


class IWAEClient(ClientBase):
    """Synchronous client. ``sleep`` is how it waits before a retry and between readiness polls (replaceable for tests)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 300.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        api_key: str | None = None,
    ) -> None:
        super().__init__(max_retries, max_retry_wait)
        headers = self.auth_headers(api_key)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport, headers=headers)
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IWAEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call) -> httpx.Response:
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
        return loglik_result(
            self._send(self._loglik_call(images, k, model, seed, binarize, resize, target_stderr)).json()
        )

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
        return encode_result(self._send(self._encode_call(images, samples, model, seed, binarize, resize)).json())

    def sample(self, n: int = 16, *, model: str | None = None, seed: int | None = None) -> SampleResult:
        return sample_result(self._send(self._sample_call(n, "json", model, seed)).json())

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
        return active_units_result(self._send(call).json())

    def models(self) -> list[dict[str, Any]]:
        return self._send(Call("GET", "/models", {}, {})).json()["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self._send(Call("GET", f"/models/{name}", {}, {})).json()

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
        """Block until /readyz answers 200 (polling every ``interval`` s with the client's ``sleep``);
        TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {timeout:g} s")
            self._sleep(interval)
