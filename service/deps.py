"""Request plumbing shared by the routes, as FastAPI dependencies: the app's state, the model a request names,
its seed, its images, the refusal of unknown or invalid query parameters, and running a job on the model's
scheduler.

All are ``async``: FastAPI runs a plain function in a worker thread, a costly hop for such small work.

`check_query` is the first dependency of every route that computes. FastAPI calls a dependency as soon as its
own parameters are valid, even when another parameter of the route is not; checking every query parameter
first means a request with a bad parameter is refused before its model is looked up or its body is read.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import torch
from fastapi import Depends, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from service.errors import PayloadTooLargeError, UnknownParameterError
from service.inputs import Binarize, InputSpec, read_images
from service.jobs import Job
from service.registry import LoadedModel
from service.settings import Settings
from service.state import ServiceState

T = TypeVar("T")
MAX_SEED = 2**63 - 1


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: State) -> Settings:
    return state.settings


AppSettings = Annotated[Settings, Depends(get_settings)]


# --- the query parameters every computing route shares ------------------------------------------------------
ModelQuery = Annotated[str | None, Query(description="Model name (see GET /models); the default model when omitted.")]
SeedQuery = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_SEED,
        description="Random seed: the same seed (and inputs) gives the same answer. A random one is chosen "
        "and returned when omitted.",
    ),
]
BinarizeQuery = Annotated[
    Binarize,
    Query(
        description="none: pixels must be 0 or 1 (grayscale is refused); threshold: pixel > 0.5; "
        "stochastic: Bernoulli(pixel) drawn with the seed."
    ),
]
ResizeQuery = Annotated[
    bool, Query(description="Resize uploaded PNG/JPEG images of other sizes to the model's image size.")
]


async def loaded_model(state: State, model: ModelQuery = None) -> LoadedModel:
    """The model the request names (404 unknown_model), or the default one."""
    return state.loaded(model)


Model = Annotated[LoadedModel, Depends(loaded_model)]


async def request_seed(seed: SeedQuery = None) -> int:
    # 53 bits when chosen here: exact in every JSON client, including JavaScript's doubles.
    return seed if seed is not None else secrets.randbits(53)


Seed = Annotated[int, Depends(request_seed)]


@dataclass(frozen=True)
class Images:
    """The request's images, decoded, validated and binarized: x [N, x_dim] float32 0/1 on the CPU."""

    x: torch.Tensor
    binarize: Binarize

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


async def request_images(
    request: Request,
    settings: AppSettings,
    loaded: Model,
    seed: Seed,
    binarize: BinarizeQuery = Binarize.none,
    resize: ResizeQuery = False,
) -> Images:
    spec = InputSpec(loaded.x_dim, loaded.image_shape, settings.max_images)
    x = await read_images(request, spec, binarize, seed, resize, settings.max_body_bytes)
    return Images(x, binarize)


RequestImages = Annotated[Images, Depends(request_images)]


def check_cost(settings: Settings, n: int, per_image: int, what: str) -> None:
    """413 request_too_large when n images × ``per_image`` samples is over IWAE_MAX_REQUEST_COST."""
    if n * per_image > settings.max_request_cost:
        raise PayloadTooLargeError(
            f"request too large: {n} images × {what} {per_image} = {n * per_image}, over the per-request limit "
            f"of {settings.max_request_cost} (IWAE_MAX_REQUEST_COST); send fewer images or a smaller {what}"
        )


@dataclass(frozen=True)
class Runner:
    """Runs jobs on the request's model: queued on its scheduler, within IWAE_TIMEOUT_S, dropped if the
    client goes away."""

    state: ServiceState
    loaded: LoadedModel
    request: Request

    async def __call__(self, job: Job[T]) -> T:
        scheduler = self.state.scheduler(self.loaded)
        return await scheduler.run(job, self.state.settings.timeout_s, self.request.receive)


async def job_runner(request: Request, state: State, loaded: Model) -> Runner:
    return Runner(state, loaded, request)


Run = Annotated[Runner, Depends(job_runner)]


# --- query parameter checks -------------------------------------------------------------------------------
def _query_params(dependant: Dependant) -> list[Any]:
    """The query parameters of a route and of all its dependencies, in the order the OpenAPI schema lists them."""
    seen: set[str] = set()
    out: list[Any] = []
    stack: list[Dependant] = [dependant]
    while stack:
        d = stack.pop()
        for param in d.query_params:
            if param.alias not in seen:
                seen.add(param.alias)
                out.append(param)
        stack.extend(reversed(d.dependencies))
    return out


def check_query() -> Sequence[Any]:
    """A route's first dependency: 422 unknown_parameter for a parameter the route does not take (``?K=50`` is
    not silently ignored), then 422 invalid_parameter for every invalid one, before any other dependency runs.
    One per route: it learns the route's parameters on its first request."""
    params: list[Any] = []
    allowed: set[str] = set()

    async def check(request: Request) -> None:
        if not allowed:
            route: APIRoute = request.scope["route"]
            params.extend(_query_params(route.dependant))
            allowed.update(p.alias for p in params)
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            raise UnknownParameterError(
                f"unknown query parameter(s) {', '.join(unknown)}; this endpoint takes {', '.join(sorted(allowed))}"
            )
        _, errors = request_params_to_args(params, request.query_params)
        if errors:
            raise RequestValidationError(errors)

    return [Depends(check)]
