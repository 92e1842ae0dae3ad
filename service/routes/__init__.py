"""The HTTP routes, one module per endpoint group. Each module's ``add_routes(router, settings)`` adds its routes
to a router, built from the settings (limits such as ``le=max_k`` are part of the OpenAPI schema).

`create_app` adds them to the app's own router rather than including one `APIRouter` per group: FastAPI
dispatches included routers at request time, a cost each small request would pay.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from service.routes import active_units, encode, health, loglik, models, reconstruct, sample, v2, web
from service.settings import Settings

ROUTE_GROUPS: tuple[Callable[[APIRouter, Settings], None], ...] = (
    loglik.add_routes,
    encode.add_routes,
    sample.add_routes,
    active_units.add_routes,
    models.add_routes,
    health.add_routes,
    reconstruct.add_routes,
    web.add_routes,
    v2.add_routes,  # last: it ends with a catch-all for /v2 paths
)


def router(settings: Settings) -> APIRouter:
    """All the service's routes on one router."""
    r = APIRouter()
    for add_routes in ROUTE_GROUPS:
        add_routes(r, settings)
    return r
