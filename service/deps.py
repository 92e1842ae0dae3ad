"""Request plumbing shared by the routes, as FastAPI dependencies: the refusal of unknown or invalid query
parameters (`check_query`), and the preamble of every computing route: the app's state, the model the request
names, its seed, its images, and running a job on that model's scheduler (`model_request`, `image_request`).

A route takes one of the two preamble dependencies rather than one per step: FastAPI solves a dependency's own
dependencies again wherever it is used, and that per-request cost showed on small requests. All are
``async``: FastAPI runs a plain function in a worker thread, a costly hop for such small work.

`check_query` is the first dependency of every route that computes. FastAPI calls a dependency as soon as its
own parameters are valid, even when another parameter of the route is not; checking every query parameter
first means a request with a bad parameter is refused before its model is looked up or its body is read.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import torch
from fastapi import Depends, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from service import errors, fair_jobs
from service.errors import PayloadTooLargeError, UnknownParameterError
from service.fair_jobs import LoglikResult
from service.fair_queue import INLINE_MAX_ROWS, FairJob, FairScheduler
from service.inputs import Binarize, InputSpec, read_images
from service.registry import LoadedModel
from service.state import ServiceState
from service.traffic import request_timeout

T = TypeVar("T")
MAX_SEED = 2**63 - 1

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
TimeoutQuery = Annotated[
    float | None,
    Query(
        gt=0,
        allow_inf_nan=False,
        description="Deadline for this request in milliseconds (queue wait plus compute); it can only shorten "
        "the server's limit IWAE_TIMEOUT_S. A job past it stops between chunks (504).",
    ),
]


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_state(request: Request) -> ServiceState:
    return service_state(request)


State = Annotated[ServiceState, Depends(get_state)]


def pick_seed(seed: int | None) -> int:
    # 53 bits when chosen here: exact in every JSON client, including JavaScript's doubles.
    return seed if seed is not None else secrets.randbits(53)


@dataclass(frozen=True)
class ModelRequest:
    """A request to compute with one model: the model (the default one unless named), the seed, the request's
    deadline (``timeout_ms``), and how to run jobs on the model's fair scheduler."""

    loaded: LoadedModel
    seed: int
    state: ServiceState
    request: Request
    timeout_ms: float | None

    async def loglik(self, x: torch.Tensor, k: int) -> LoglikResult:
        """L_k of images x [N, D] with k samples each (noise from the request's seed), on the scheduler."""
        rows = int(x.shape[0]) * k
        return await self._run(lambda sched, until, inline: sched.submit_loglik(x, k, self.seed, until, inline), rows)

    async def call(self, fn: Callable[[LoadedModel], T], cost: int) -> T:
        """``fn(model)`` as one indivisible job of ``cost`` rows (images × samples) on the scheduler."""
        lm = self.loaded
        return await self._run(
            lambda sched, until, inline: sched.submit_call(lambda: fn(lm), cost, until, inline), max(1, cost)
        )

    async def _run(self, submit: Callable[[FairScheduler, float, bool], FairJob], rows: int) -> Any:
        """Submit and wait: 503 when the queue is full or the service drains, 504 past the deadline
        (IWAE_TIMEOUT_S or the request's timeout_ms), dropped (499) if the client goes away."""
        settings = self.state.settings
        timeout = request_timeout(settings, self.timeout_ms)
        sched = self.state.scheduler(self.loaded)
        deadline = time.monotonic() + timeout
        if rows <= INLINE_MAX_ROWS and self.state.in_flight.inline_ok:
            # Let the requests that arrived with this one start before deciding to compute it on the event
            # loop: their bodies are already read, so without a yield they are not yet counted in flight, every
            # tiny job of a burst ran inline one after another on the event loop (one engine call each, one
            # core busy) and none was merged (k=50 c=32: 2.1-2.4 ms of CPU per request, as many as at c=1).
            await asyncio.sleep(0)
        pause = sched.inline_pace(rows) if self.state.in_flight.inline_ok else 0.0
        if pause > 0:  # a tiny job while workers compute: keep its share of the event loop small
            await asyncio.sleep(pause)
        try:
            job = submit(sched, deadline, self.state.in_flight.inline_ok)
            return await sched.wait(job, max(0.0, deadline - time.monotonic()), self.request.receive)
        except fair_jobs.SchedulerError as exc:
            raise as_service_error(exc, timeout, settings.timeout_s) from exc

    def check_cost(self, n: int, per_image: int, what: str) -> None:
        """413 request_too_large when n images × ``per_image`` samples is over IWAE_MAX_REQUEST_COST."""
        limit = self.state.settings.max_request_cost
        if n * per_image > limit:
            raise PayloadTooLargeError(
                f"request too large: {n} images × {what} {per_image} = {n * per_image}, over the per-request limit "
                f"of {limit} (IWAE_MAX_REQUEST_COST); send fewer images or a smaller {what}"
            )


def as_service_error(exc: fair_jobs.SchedulerError, timeout_s: float, limit_s: float) -> errors.ServiceError:
    """The scheduler's refusal or job failure as the service's error (service/errors.py)."""
    if isinstance(exc, fair_jobs.QueueFullError):
        return errors.QueueFullError(f"{exc}; retry after {exc.retry_after_s} s", exc.retry_after_s)
    if isinstance(exc, fair_jobs.DrainingError):
        return errors.ShuttingDownError(exc.retry_after_s, str(exc))
    if isinstance(exc, fair_jobs.DeadlineError):
        return errors.JobTimeoutError(timeout_s, limit_s)
    if isinstance(exc, fair_jobs.CancelledJobError):
        return errors.ClientGoneError()
    raise exc


@dataclass(frozen=True)
class ImageRequest(ModelRequest):
    """A model request with images: x [N, x_dim], decoded, validated and binarized (float32 0/1, CPU)."""

    x: torch.Tensor
    binarize: Binarize

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


async def model_request(
    request: Request, seed: SeedQuery = None, model: ModelQuery = None, timeout_ms: TimeoutQuery = None
) -> ModelRequest:
    state = service_state(request)
    return ModelRequest(state.loaded(model), pick_seed(seed), state, request, timeout_ms)


async def image_request(
    request: Request,
    model: ModelQuery = None,
    seed: SeedQuery = None,
    binarize: BinarizeQuery = Binarize.none,
    resize: ResizeQuery = False,
    timeout_ms: TimeoutQuery = None,
) -> ImageRequest:
    state = service_state(request)
    loaded, seed = state.loaded(model), pick_seed(seed)
    settings = state.settings
    spec = InputSpec(loaded.x_dim, loaded.image_shape, settings.max_images)
    x = await read_images(request, spec, binarize, seed, resize, settings.max_body_bytes)
    return ImageRequest(loaded, seed, state, request, timeout_ms, x, binarize)


Computation = Annotated[ModelRequest, Depends(model_request)]
ImageComputation = Annotated[ImageRequest, Depends(image_request)]


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
    not silently ignored), then 422 invalid_parameter if one of the route's own parameters is invalid (naming
    every invalid parameter of the route). The parameters of its other dependencies are validated by FastAPI
    before that dependency runs. One per route: it learns the route's parameters on its first request."""
    own: list[Any] = []
    every: list[Any] = []
    allowed: set[str] = set()

    async def check(request: Request) -> None:
        if not allowed:
            route: APIRoute = request.scope["route"]
            own.extend(route.dependant.query_params)
            every.extend(_query_params(route.dependant))
            allowed.update(p.alias for p in every)
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            raise UnknownParameterError(
                f"unknown query parameter(s) {', '.join(unknown)}; this endpoint takes {', '.join(sorted(allowed))}"
            )
        _, errors = request_params_to_args(own, request.query_params)
        if errors:
            _, errors = request_params_to_args(every, request.query_params)
            raise RequestValidationError(errors)

    return [Depends(check)]
