"""The HTTP routes, one module per endpoint group; each builds an `APIRouter` from the settings (limits such
as ``le=max_k`` are part of the OpenAPI schema)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from service.routes import active_units, encode, health, loglik, models, sample
from service.settings import Settings

ROUTERS: tuple[Callable[[Settings], APIRouter], ...] = (
    loglik.router,
    encode.router,
    sample.router,
    active_units.router,
    models.router,
    health.router,
)
