"""The FastAPI application: `create_app(settings)` wires the state, middleware, routes and error handlers.

Each call builds a self-contained app (its own registry, schedulers and metrics registry), so tests can build
several in one process. Routes: service/routes/; request plumbing: service/deps.py; errors:
service/errors.py; what runs where: service/state.py, service/traffic.py, service/fair_queue.py, service/jobs.py;
API keys: service/auth.py; draining on SIGTERM: service/drain.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI

from service.auth import ApiKeyMiddleware, load_api_keys
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.middleware import BodyLimitMiddleware
from service.openapi_truth import refine as refine_openapi
from service.openapi_truth import v2_statuses
from service.registry import ModelRegistry
from service.routes import ROUTE_GROUPS
from service.settings import Settings
from service.state import ServiceState
from service.traffic import InFlightMiddleware

DESCRIPTION = """Density estimation with importance weighted autoencoders (Burda et al., 2016).

`POST /loglik` returns the k-sample bound L_k on log p(x) per image, with its Monte Carlo standard error, the
effective sample size and the ELBO from the same samples. Concurrent requests share engine calls, computed in
chunks so that small requests are not held up by big ones.
Errors are JSON `{"error": code, "detail": message}`. See docs/service.md.
"""


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """A fresh app. ``registry`` may be pre-loaded (the CLI does, to fail fast); otherwise models load at startup."""
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics, registry)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(title="iwae-serve", version=version("iwae-serve"), description=DESCRIPTION, lifespan=lifespan)
    app.state.service = state
    app.state.metrics = metrics
    # Outermost last: metrics see every answer, then keys are checked before anything reads the body.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        on_reject=lambda: metrics.scheduler.reject("too_large"),
    )
    keys = load_api_keys(settings.api_keys.get_secret_value() if settings.api_keys else None)
    app.add_middleware(
        ApiKeyMiddleware,
        keys=keys,
        metrics_public=settings.metrics_public,
        on_reject=lambda: metrics.scheduler.reject("unauthorized"),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(InFlightMiddleware, counter=state.in_flight)
    install_error_handlers(app)
    for add_routes in ROUTE_GROUPS:
        add_routes(app.router, settings)

    def openapi() -> dict[str, Any]:
        # The loaded models' names and image shapes make the schema exact: refined once they are known.
        schema = v2_statuses(FastAPI.openapi(app))
        if state.registry is not None and not schema.get("x-refined"):
            refine_openapi(schema, state.registry, settings)
            schema["x-refined"] = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker runs: settings come from the IWAE_* environment."""
    return create_app(Settings())
