"""The FastAPI application: routes, error handling, startup (load, warm up) and shutdown.

`create_app(settings)` builds a self-contained app (its own registry, engines and metrics registry), so tests
can build several in one process. The engines live in `service.batching`; request decoding in
`service.inputs`.
"""

# No `from __future__ import annotations`: FastAPI must evaluate the route signatures, whose bounds
# (e.g. le=settings.max_k) are closure variables of create_app.
import asyncio
import io
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import schemas
from service.batching import (
    BatchingEngine,
    ClientGoneError,
    EngineStoppedError,
    Job,
    JobTimeoutError,
    QueueFullError,
    draw_request_noise,
)
from service.inputs import Binarize, InputError, InputSpec, read_images
from service.loglik import LoglikStats, json_rows, loglik_to_target
from service.metrics import Metrics, MetricsMiddleware
from service.registry import LoadedModel, ModelRegistry, UnknownModelError
from service.settings import Settings

log = logging.getLogger("iwae.service")

MAX_SEED = 2**63 - 1
ACTIVE_UNIT_THRESHOLD = 1e-2
# Monte Carlo draws for upper-layer posterior moments (the paper's estimator; `iwae eval` uses 100 too).
UPPER_LAYER_SAMPLES = 100
# nginx's convention for "client closed request": only ever seen in logs and metrics.
CLIENT_CLOSED_REQUEST = 499


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class BodyTooLargeError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BodyLimitMiddleware:
    """Refuses bodies over the limit without reading them: at the first read when Content-Length says so,
    else as soon as the bytes received pass the limit (chunked uploads)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        limit = self.limit
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise BodyTooLargeError(
                    f"request body is {declared} bytes, over the limit of {limit} bytes (IWAE_MAX_BODY_BYTES)"
                )
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(f"request body is over the limit of {limit} bytes (IWAE_MAX_BODY_BYTES)")
            return message

        await self.app(scope, limited_receive, send)


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry | None = None
    engines: dict[str, BatchingEngine] = field(default_factory=dict)
    ready: bool = False
    warm_error: str | None = None
    _warm_task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        if self.registry is None:
            # NoModelsError propagates: the server must not start with nothing to serve.
            self.registry = await asyncio.to_thread(ModelRegistry.load, self.settings)
        self.metrics.models_loaded.set(len(self.registry.models))
        for name, loaded in self.registry.models.items():
            engine = BatchingEngine(loaded, self.settings, self.metrics)
            engine.start()
            self.engines[name] = engine
        self._warm_task = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        # One small evaluation per model: first-call costs (allocator, kernels) are paid before /readyz says yes.
        try:
            for engine in self.engines.values():
                x = torch.zeros(1, engine.loaded.x_dim)
                await engine.wait(engine.submit_loglik(x, 2, 0), timeout=max(self.settings.timeout_s, 120.0))
            self.ready = True
            self.metrics.ready.set(1)
            log.info("ready: %s", ", ".join(self.engines))
        except Exception as e:
            self.warm_error = f"{type(e).__name__}: {e}"
            log.exception("warm-up failed")

    async def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._warm_task is not None:
            self._warm_task.cancel()
        await asyncio.gather(*(asyncio.to_thread(e.stop) for e in self.engines.values()))

    def loaded(self, name: str | None) -> LoadedModel:
        if self.registry is None:
            raise ServiceError(503, "not_ready", "models are still loading", {"Retry-After": "1"})
        return self.registry.get(name)

    def engine(self, loaded: LoadedModel) -> BatchingEngine:
        return self.engines[loaded.name]


# --- error responses --------------------------------------------------------------------------------------
def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


_LIMIT_HINTS = {"k": "IWAE_MAX_K", "n": "IWAE_MAX_N", "samples": "IWAE_MAX_K"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body", "header")]
        name = ".".join(loc) or "request"
        text = f"query parameter {name}: {err.get('msg', 'invalid')}"
        if err.get("type") == "less_than_equal" and name in _LIMIT_HINTS:
            text += f" (the limit is set by {_LIMIT_HINTS[name]})"
        if "input" in err and not isinstance(err["input"], dict | list):
            text += f"; got {err['input']!r}"
        parts.append(text)
    return "; ".join(parts) or "invalid request"


_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    retry = {"Retry-After": str(settings.retry_after_s)}

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(BodyTooLargeError)
    async def _too_large(_: Request, exc: BodyTooLargeError) -> JSONResponse:
        # The rest of the body is never read: close the connection rather than drain it.
        return _error(413, "body_too_large", exc.message, {"Connection": "close"})

    @app.exception_handler(UnknownModelError)
    async def _unknown_model(_: Request, exc: UnknownModelError) -> JSONResponse:
        return _error(404, "unknown_model", str(exc))

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return _error(503, "queue_full", f"{exc}; retry after {settings.retry_after_s} s", retry)

    @app.exception_handler(EngineStoppedError)
    async def _stopping(_: Request, exc: EngineStoppedError) -> JSONResponse:
        return _error(503, "shutting_down", str(exc), retry)

    @app.exception_handler(JobTimeoutError)
    async def _timeout(_: Request, exc: JobTimeoutError) -> JSONResponse:
        return _error(
            504,
            "timeout",
            f"request timed out: {exc} in queue and compute (IWAE_TIMEOUT_S = {settings.timeout_s:g}); "
            "send fewer images or a smaller k, or retry later",
        )

    @app.exception_handler(ClientGoneError)
    async def _gone(_: Request, exc: ClientGoneError) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_parameter", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint; see /docs for the API"
        return _error(exc.status_code, code, detail, getattr(exc, "headers", None))


# --- OpenAPI descriptions ---------------------------------------------------------------------------------
_ERROR_TEXT = {
    400: "Malformed body: invalid JSON, undecodable PNG/JPEG or .npy, empty body.",
    404: "Unknown model (the message lists the available ones).",
    413: "Body over IWAE_MAX_BODY_BYTES (refused unread), too many images, or images × k over IWAE_MAX_REQUEST_COST.",
    415: "Unsupported Content-Type.",
    422: "Invalid parameter (k, n, seed, binarize, ...; unknown parameter names too) or invalid images: wrong "
    "shape, NaN/inf, values outside [0, 1], non-binary pixels with binarize=none.",
    503: "The model's queue is full (retry after the Retry-After header's seconds) or the service is stopping.",
    504: "The request was not done within IWAE_TIMEOUT_S.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": schemas.ErrorResponse, "description": _ERROR_TEXT[c]} for c in codes}


def _image_body(x_hint: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": 'Images, one of three ways. JSON: `{"images": [...]}`, each image '
            + x_hint
            + ", values in [0, 1]. Multipart: one or more PNG/JPEG files (grayscale, the model's image size; "
            "other sizes with resize=true). .npy: a float/int/bool array [N, H, W] or [N, x_dim] "
            "(Content-Type application/x-npy). Pixels must be 0 or 1 unless binarize is set.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "properties": {"images": {"type": "array", "items": {"type": "array", "items": {}}}},
                    }
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    }
                },
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


def _only_params(*allowed: str) -> Callable[[Request], Awaitable[None]]:
    allowed_set = set(allowed)

    # async: FastAPI would run a plain function in a worker thread, a costly hop for a set difference.
    async def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - allowed_set)
        if unknown:
            raise ServiceError(
                422,
                "unknown_parameter",
                f"unknown query parameter(s) {', '.join(unknown)}; this endpoint takes {', '.join(sorted(allowed_set))}",
            )

    return check


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, allow_nan=False).encode(), status_code=status, media_type="application/json")


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _grid_png(images: np.ndarray, pad: int = 2) -> bytes:
    """[n, h, w] intensities in [0, 1] -> one PNG with the images on a near-square grid."""
    n, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 0.5, dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = images[i]
    buf = io.BytesIO()
    Image.fromarray(np.round(canvas * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


# --- jobs run on the engine's thread --------------------------------------------------------------------
def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _encode_job(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], list[dict[str, Any]]]:
    def run(lm: LoadedModel) -> list[dict[str, Any]]:
        model, dev = lm.model, lm.device
        xd = x.to(dev)
        mean, log_std = model.q[0](xd)
        moments = [(mean, torch.exp(log_std), True)]
        if model.config.n_layers > 1:
            gen = _device_generator(dev, seed)
            eps = torch.randn((UPPER_LAYER_SAMPLES, *mean.shape), generator=gen, device=dev, dtype=mean.dtype)
            h = mean + torch.exp(log_std) * eps
            for layer in model.q[1:]:
                m, s = layer(h)
                sd = torch.exp(s)
                # Law of total variance over the draws of the layer below.
                var = (sd * sd).mean(0) + m.var(0, unbiased=False)
                moments.append((m.mean(0), var.sqrt(), False))
                h = m + sd * torch.randn(m.shape, generator=gen, device=dev, dtype=m.dtype)
        draws: list[torch.Tensor] | None = None
        if samples:
            # Same noise as /loglik with k=samples and this seed: the draws are the samples it weighs.
            noise = [e.to(dev) for e in draw_request_noise(model, samples, int(x.shape[0]), seed)]
            lat = model.sample_latents(xd, samples, noise=noise)
            draws = [hl.transpose(0, 1) for hl in lat.h]
        layers = []
        for i, (mu, sd, exact) in enumerate(moments):
            layers.append(
                {
                    "layer": i + 1,
                    "dim": int(mu.shape[-1]),
                    "exact": exact,
                    "mean": mu.double().cpu().tolist(),
                    "std": sd.double().cpu().tolist(),
                    "samples": draws[i].double().cpu().tolist() if draws is not None else None,
                }
            )
        return layers

    return run


def _sample_job(n: int, seed: int) -> Callable[[LoadedModel], tuple[np.ndarray, np.ndarray]]:
    def run(lm: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        gen = _device_generator(lm.device, seed)
        probs = lm.model.sample(n, generator=gen)
        binary = torch.bernoulli(probs, generator=gen)
        return probs.double().cpu().numpy(), binary.to(torch.uint8).cpu().numpy()

    return run


def _active_units_job(x: torch.Tensor, samples: int, seed: int) -> Callable[[LoadedModel], list[np.ndarray]]:
    def run(lm: LoadedModel) -> list[np.ndarray]:
        # Same estimator as `iwae eval` (training.evaluate.active_unit_stats): unbiased variance in float64.
        means = lm.model.posterior_means(x.to(lm.device), samples=samples, generator=_device_generator(lm.device, seed))
        return [m.double().var(dim=0, unbiased=True).cpu().numpy() for m in means]

    return run


# --- the app -------------------------------------------------------------------------------------------------
DESCRIPTION = """Density estimation with importance weighted autoencoders (Burda et al., 2016).

`POST /loglik` returns the k-sample bound L_k on log p(x) per image, with its Monte Carlo standard error, the
effective sample size and the ELBO from the same samples. Concurrent requests are batched per model.
Errors are JSON `{"error": code, "detail": message}`. See docs/service.md.
"""


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """A fresh app. ``registry`` may be pre-loaded (the CLI does, to fail fast); otherwise models load at startup."""
    settings = settings or Settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics, registry)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(title="iwae-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.service = state
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app, settings)

    queue_hint = f"{settings.retry_after_s}"
    default_k = min(5000, settings.max_k)

    ModelQ = Annotated[str | None, Query(description="Model name (see GET /models); the default model when omitted.")]
    SeedQ = Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_SEED,
            description="Random seed: the same seed (and inputs) gives the same answer. A random one is chosen "
            "and returned when omitted.",
        ),
    ]
    BinarizeQ = Annotated[
        Binarize,
        Query(
            description="none: pixels must be 0 or 1 (grayscale is refused); threshold: pixel > 0.5; "
            "stochastic: Bernoulli(pixel) drawn with the seed."
        ),
    ]
    ResizeQ = Annotated[
        bool, Query(description="Resize uploaded PNG/JPEG images of other sizes to the model's image size.")
    ]

    TargetQ = Annotated[
        float | None,
        Query(
            gt=0,
            allow_inf_nan=False,
            description="Nats: sample each image in chunks (100, then doubling) until its standard error is at "
            "most this, or k (the cap) is reached; `k_used` in each result says where it stopped.",
        ),
    ]

    def spec(lm: LoadedModel) -> InputSpec:
        return InputSpec(lm.x_dim, lm.image_shape, settings.max_images)

    def pick_seed(seed: int | None) -> int:
        # 53 bits: exact in every JSON client, including JavaScript's doubles.
        return seed if seed is not None else secrets.randbits(53)

    def check_cost(n: int, per_image: int, what: str) -> None:
        if n * per_image > settings.max_request_cost:
            raise ServiceError(
                413,
                "request_too_large",
                f"request too large: {n} images × {what} {per_image} = {n * per_image}, over the per-request limit "
                f"of {settings.max_request_cost} (IWAE_MAX_REQUEST_COST); send fewer images or a smaller {what}",
            )

    async def run(engine: BatchingEngine, job: Job, request: Request) -> Any:
        return await engine.wait(job, settings.timeout_s, request.receive)

    x_hint = "a flat list of x_dim values or an H × W nested list (28 × 28 for MNIST models)"

    @app.post(
        "/loglik",
        response_model=schemas.LoglikResponse,
        responses=_errors(400, 404, 413, 415, 422, 503, 504),
        openapi_extra=_image_body(x_hint),
        dependencies=[Depends(_only_params("k", "model", "seed", "binarize", "resize", "target_stderr"))],
        summary="L_k log-likelihood estimate per image",
        description="The k-sample importance weighted bound L_k on log p(x) (nats) per image, its Monte Carlo "
        "standard error, the ESS of the normalised weights, the ELBO and bits/dim, from k samples of q(h|x) "
        "drawn with the seed, and the PSIS reliability diagnostic (pareto_k, reliable). With target_stderr, "
        "samples are drawn in chunks until each image's standard error is at most that, with k as the cap. "
        "Concurrent requests are batched; each gets exactly the answer it would get alone. "
        f"503 responses carry Retry-After ({queue_hint} s).",
    )
    async def loglik(
        request: Request,
        k: Annotated[
            int, Query(ge=1, le=settings.max_k, description=f"Importance samples per image, 1..{settings.max_k}.")
        ] = default_k,
        model: ModelQ = None,
        seed: SeedQ = None,
        binarize: BinarizeQ = Binarize.none,
        resize: ResizeQ = False,
        target_stderr: TargetQ = None,
    ) -> Response:
        lm = state.loaded(model)
        seed = pick_seed(seed)
        x = await read_images(request, spec(lm), binarize, seed, resize, settings.max_body_bytes)
        check_cost(int(x.shape[0]), k, "k")
        engine = state.engine(lm)
        if target_stderr is None:
            job = engine.submit_loglik(x, k, seed)
        else:  # runs alone on the engine's thread: the chunks depend on the results so far
            target, rows = target_stderr, engine.chunk_rows
            job = engine.submit_call(
                lambda m: loglik_to_target(m.model, m.device, x, k, seed, target, rows), cost=int(x.shape[0]) * k
            )
        stats: LoglikStats = await run(engine, job, request)
        results = json_rows(stats, lm.x_dim)
        return _json(
            {
                "model": lm.name,
                "k": k,
                "seed": seed,
                "binarize": binarize.value,
                "n_images": len(results),
                "target_stderr": target_stderr,
                "results": results,
            }
        )

    @app.post(
        "/encode",
        response_model=schemas.EncodeResponse,
        responses=_errors(400, 404, 413, 415, 422, 503, 504),
        openapi_extra=_image_body(x_hint),
        dependencies=[Depends(_only_params("samples", "model", "seed", "binarize", "resize"))],
        summary="Posterior q(h|x) per stochastic layer",
        description="Per stochastic layer: the posterior mean and standard deviation of each image's latent "
        "code (exact for layer 1; Monte Carlo moments over 100 draws for upper layers), and `samples` draws "
        "from q(h|x) on request (the same draws /loglik weighs with k=samples and the same seed).",
    )
    async def encode(
        request: Request,
        samples: Annotated[
            int, Query(ge=0, le=settings.max_k, description="Draws per image from q(h|x) to return (0: none).")
        ] = 0,
        model: ModelQ = None,
        seed: SeedQ = None,
        binarize: BinarizeQ = Binarize.none,
        resize: ResizeQ = False,
    ) -> Response:
        lm = state.loaded(model)
        seed = pick_seed(seed)
        x = await read_images(request, spec(lm), binarize, seed, resize, settings.max_body_bytes)
        n = int(x.shape[0])
        check_cost(n, max(samples, 1), "samples")
        engine = state.engine(lm)
        layers = await run(engine, engine.submit_call(_encode_job(x, samples, seed), cost=n * max(samples, 1)), request)
        return _json(
            {
                "model": lm.name,
                "seed": seed,
                "binarize": binarize.value,
                "n_images": n,
                "samples": samples,
                "layers": layers,
            }
        )

    @app.get(
        "/sample",
        response_model=schemas.SampleResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON samples, or a PNG grid with format=png."},
            **_errors(404, 422, 503, 504),
        },
        dependencies=[Depends(_only_params("n", "format", "pixels", "seed", "model"))],
        summary="Draw samples from the generative model",
        description="n ancestral samples x ~ p(x, h). format=json returns each sample's pixel probabilities and "
        "one binary draw; format=png returns the probabilities (or, with pixels=binary, the draws) as a grid.",
    )
    async def sample(
        request: Request,
        n: Annotated[int, Query(ge=1, le=settings.max_n, description=f"Number of samples, 1..{settings.max_n}.")] = 16,
        format: Annotated[Literal["json", "png"], Query(description="json or png (a grid image).")] = "json",
        pixels: Annotated[
            Literal["probs", "binary"], Query(description="What the PNG shows: pixel probabilities or binary draws.")
        ] = "probs",
        seed: SeedQ = None,
        model: ModelQ = None,
    ) -> Response:
        lm = state.loaded(model)
        if format == "png" and lm.image_shape is None:
            raise ServiceError(
                422, "not_an_image_model", f"model {lm.name!r} has no image shape (x_dim {lm.x_dim}); use format=json"
            )
        seed = pick_seed(seed)
        engine = state.engine(lm)
        probs, binary = await run(engine, engine.submit_call(_sample_job(n, seed), cost=n), request)
        if format == "png":
            assert lm.image_shape is not None
            shown = probs if pixels == "probs" else binary.astype(np.float64)
            png = await asyncio.to_thread(_grid_png, shown.reshape(n, *lm.image_shape))
            return Response(png, media_type="image/png", headers={"X-IWAE-Seed": str(seed), "X-IWAE-Model": lm.name})
        return _json(
            {
                "model": lm.name,
                "seed": seed,
                "n": n,
                "x_dim": lm.x_dim,
                "image_shape": list(lm.image_shape) if lm.image_shape else None,
                "probs": probs.tolist(),
                "binary": binary.tolist(),
            }
        )

    @app.post(
        "/active-units",
        response_model=schemas.ActiveUnitsResponse,
        responses=_errors(400, 404, 413, 415, 422, 503, 504),
        openapi_extra=_image_body(x_hint),
        dependencies=[Depends(_only_params("samples", "model", "seed", "binarize", "resize"))],
        summary="Active units over the posted images",
        description="A_u = variance across the posted images (at least 2) of the posterior mean E_q[u|x], per "
        f"unit of each stochastic layer, and the count above {ACTIVE_UNIT_THRESHOLD:g} (Burda et al., section 5.2). "
        "Upper-layer means are averaged over `samples` draws of the layer below.",
    )
    async def active_units(
        request: Request,
        samples: Annotated[
            int,
            Query(ge=1, le=settings.max_k, description="Draws for upper-layer posterior means (2-layer models)."),
        ] = UPPER_LAYER_SAMPLES,
        model: ModelQ = None,
        seed: SeedQ = None,
        binarize: BinarizeQ = Binarize.none,
        resize: ResizeQ = False,
    ) -> Response:
        lm = state.loaded(model)
        seed = pick_seed(seed)
        x = await read_images(request, spec(lm), binarize, seed, resize, settings.max_body_bytes)
        n = int(x.shape[0])
        if n < 2:
            raise ServiceError(
                422, "too_few_images", f"active units need at least 2 images (a variance across images); got {n}"
            )
        per_image = samples if lm.model.config.n_layers > 1 else 1
        check_cost(n, per_image, "samples")
        engine = state.engine(lm)
        variances = await run(
            engine, engine.submit_call(_active_units_job(x, samples, seed), cost=n * per_image), request
        )
        layers = []
        for i, a in enumerate(variances):
            active = np.flatnonzero(a > ACTIVE_UNIT_THRESHOLD)
            layers.append(
                {
                    "layer": i + 1,
                    "dim": int(a.shape[0]),
                    "active": int(active.size),
                    "variances": a.tolist(),
                    "active_units": active.tolist(),
                }
            )
        return _json(
            {
                "model": lm.name,
                "seed": seed,
                "binarize": binarize.value,
                "n_images": n,
                "threshold": ACTIVE_UNIT_THRESHOLD,
                "active_total": sum(layer["active"] for layer in layers),
                "layers": layers,
            }
        )

    @app.get(
        "/models",
        response_model=schemas.ModelsResponse,
        responses=_errors(503),
        summary="All loaded models and their cards",
    )
    async def list_models() -> Response:
        reg = state.registry
        if reg is None:
            raise ServiceError(503, "not_ready", "models are still loading", {"Retry-After": "1"})
        return _json(
            {"default": reg.default, "models": [reg.models[n].describe(n == reg.default) for n in reg.names()]}
        )

    @app.get(
        "/models/{name}",
        response_model=schemas.ModelInfo,
        responses=_errors(404, 503),
        summary="One model's card",
        description="The model card stored in the checkpoint (training settings, and test L_5000 and active units "
        "under `eval` once evaluated), plus what the service derives: parameters, device, config.",
    )
    async def get_model(name: Annotated[str, Path(description="Model name, as listed by GET /models.")]) -> Response:
        lm = state.loaded(name)
        assert state.registry is not None
        return _json(lm.describe(lm.name == state.registry.default))

    @app.get("/healthz", response_model=schemas.HealthResponse, summary="Liveness: the process answers")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get(
        "/readyz",
        response_model=schemas.ReadyResponse,
        responses=_errors(503) | {503: {"model": schemas.ErrorResponse, "description": "Not loaded or warmed yet."}},
        summary="Readiness: every model loaded and warmed up",
    )
    async def readyz() -> Response:
        if state.ready and state.registry is not None:
            return _json({"status": "ready", "models": state.registry.names()})
        why = f"warm-up failed: {state.warm_error}" if state.warm_error else "models are loading or warming up"
        return JSONResponse(
            {"error": "not_ready", "detail": why}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)}
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker runs: settings come from the IWAE_* environment."""
    return create_app(Settings())
