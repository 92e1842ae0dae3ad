"""Ray Serve hosting: every replica runs the service's own FastAPI app (`create_app`), so routes, batching,
metrics and errors are exactly those of `iwae serve`.

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.ray_serve:proxy_middlewares serve run deploy/ray/serve.yaml

`app_builder` is the config's import path; its `args` are `Settings` fields (over the `IWAE_*` environment).
Serve's replica health check is the app's `/readyz`, and a replica starts taking traffic only once `/readyz`
says ready (models loaded and warmed up). On scale-down Serve stops routing to the replica, waits for its
ongoing requests (`graceful_shutdown_timeout_s`), then runs the app's lifespan shutdown (the engine drain).
`proxy_middlewares` turns a request lost with a dead replica into a 503 with Retry-After (the proxy would
otherwise answer 500): L_k requests are idempotent under their seed, so the client can simply retry.

Ray is imported lazily: the service itself runs without it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import create_app
from service.settings import Settings

if TYPE_CHECKING:
    from ray.serve import Application

DEPLOYMENT_NAME = "IwaeService"
READY_TIMEOUT_S = 600.0
# Serve-side settings with no meaning inside a replica: Serve's proxy binds the port and runs the replicas.
_PROCESS_FIELDS = frozenset({"host", "port", "workers"})


def settings_from_args(args: dict[str, Any]) -> Settings:
    """The config's `args` as Settings (they override `IWAE_*` variables); unknown names are refused."""
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown service setting(s) in the Serve config's args: {', '.join(unknown)}")
    ignored = sorted(set(args) & _PROCESS_FIELDS)
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: set by Serve (http_options, num_replicas), not by the app's args")
    return Settings(**args)


async def readiness(app: ASGIApp) -> tuple[int, dict[str, Any]]:
    """The app's own `GET /readyz`, called in-process: (status code, JSON body)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        r = await client.get("/readyz")
    return r.status_code, r.json()


async def wait_until_ready(app: ASGIApp, timeout_s: float) -> None:
    """Poll `/readyz` until 200; a failed warm-up or the deadline raises (Serve then replaces the replica)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = await readiness(app)
        if status == 200:
            return
        detail = str(body.get("detail", ""))
        if "failed" in detail or time.monotonic() > deadline:
            raise RuntimeError(f"replica not ready: {detail or body}")
        await asyncio.sleep(0.05)


def ready_before_traffic(app: FastAPI, timeout_s: float = READY_TIMEOUT_S) -> FastAPI:
    """Make the app's startup end only when `/readyz` says ready: Serve routes to a replica once startup ends."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            await wait_until_ready(app, timeout_s)
            yield state

    app.router.lifespan_context = lifespan
    return app


def deployment(settings_args: dict[str, Any] | None = None) -> Any:
    """The Serve deployment class: one `create_app(Settings(**settings_args))` per replica."""
    from ray import serve

    args = dict(settings_args or {})
    settings_from_args(args)  # fail at deploy time, not in every replica

    def build() -> FastAPI:
        app = create_app(settings_from_args(args))
        app.add_middleware(ReplicaHeaderMiddleware, replica=serve.get_replica_context().replica_id.unique_id)
        return ready_before_traffic(app)

    @serve.deployment(name=DEPLOYMENT_NAME)
    @serve.ingress(build)
    class IwaeService:
        async def check_health(self) -> None:
            # Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it.
            status, body = await readiness(self.app)
            if status != 200:
                raise RuntimeError(f"/readyz answered {status}: {body.get('detail', body)}")

    return IwaeService


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder (`import_path: service.ray_serve:app_builder`): args are Settings fields."""
    return deployment(args).bind()


class ReplicaHeaderMiddleware:
    """Names the replica that answered in an `X-IWAE-Replica` header (which replica served what, in logs and tests)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (b"x-iwae-replica", replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header if scope["type"] == "http" else send)


class ReplicaLostMiddleware:
    """In Serve's HTTP proxy: a request whose replica died answers 503 with Retry-After instead of 500.

    The proxy sends nothing when the replica's actor dies mid-request (uvicorn then sends a bare 500); every
    answer of the app itself, errors included, starts a response, so "no response" means "replica lost".
    """

    def __init__(self, app: ASGIApp, retry_after_s: int = 1) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, tracking_send)
        if not started:
            body = json.dumps(
                {"error": "replica_unavailable", "detail": "the replica serving this request stopped; retry"}
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self.retry_after_s).encode()),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Any]:
    """Serve's HTTP proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=service.ray_serve:proxy_middlewares`)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware, retry_after_s=Settings().retry_after_s)]
