"""Liveness, readiness and the Prometheus metrics."""

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import schemas
from service.deps import State
from service.errors import DrainingError, NotReadyError
from service.routes.openapi import error_responses
from service.settings import Settings


def add_routes(r: APIRouter, settings: Settings) -> None:

    @r.get("/healthz", response_model=schemas.HealthResponse, summary="Liveness: the process answers")
    async def healthz() -> schemas.HealthResponse:
        return schemas.HealthResponse(status="ok")

    @r.get(
        "/readyz",
        response_model=schemas.ReadyResponse,
        responses=error_responses(503)
        | {503: {"model": schemas.ErrorResponse, "description": "Not loaded or warmed yet, or draining."}},
        summary="Readiness: every model loaded and warmed up",
    )
    async def readyz(state: State) -> schemas.ReadyResponse:
        if state.draining:
            raise DrainingError(settings.retry_after_s)
        if state.ready and state.registry is not None:
            return schemas.ReadyResponse(status="ready", models=state.registry.names())
        why = f"warm-up failed: {state.warm_error}" if state.warm_error else "models are loading or warming up"
        raise NotReadyError(why, settings.retry_after_s)

    @r.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics(state: State) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
