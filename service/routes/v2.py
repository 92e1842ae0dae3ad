"""The Open Inference Protocol routes (KServe / Triton "v2" REST), next to the native ones: server and model
metadata, health, and inference through the same scheduler as /loglik. Errors are ``{"error": message}``.

The protocol itself (decoding requests, the binary tensor extension, encoding responses) is service/oip.py.
"""

# No `from __future__ import annotations`: FastAPI evaluates the route signatures.
import secrets
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from service import oip, schemas
from service.deps import ModelRequest, service_state
from service.errors import ServiceError
from service.fair_jobs import LoglikResult
from service.inputs import bits_per_dim, validate_and_binarize
from service.registry import LoadedModel
from service.settings import Settings
from service.state import ServiceState

HEADER_LENGTH = "Inference-Header-Content-Length"
ModelName = Annotated[str, Path(description="Model name, as listed by GET /models.")]
# Statuses of the native errors that become 400 here: the protocol answers bad requests with 400.
_AS_BAD_REQUEST = {415, 422}
CLIENT_CLOSED_REQUEST = 499
# What each error status of the /v2 routes means; the body is always schemas.V2Error.
V2_ERROR_TEXT = {
    400: "Bad request: invalid JSON, an unknown field or parameter, a wrong datatype or shape, data that does not "
    "match its shape, inconsistent binary sizes, invalid pixels (the native routes' 415 and 422 are 400 here); "
    "for the readiness routes: not ready yet.",
    404: "Unknown model (the message lists the loaded ones).",
    413: "Body over IWAE_MAX_BODY_BYTES (refused unread), more than IWAE_MAX_IMAGES images, or images × k over "
    "IWAE_MAX_REQUEST_COST.",
    503: "Models still loading, the model's queue is full, or the service is draining; Retry-After says when to "
    "come back.",
    504: "The request was not done within IWAE_TIMEOUT_S.",
}


def _package_version() -> str:
    try:
        return version("iwae-serve")
    except PackageNotFoundError:
        return "0"


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _as_response(exc: Exception) -> Response:
    """A service error (service/errors.py) or a protocol error as the protocol's ``{"error": message}``."""
    if not isinstance(exc, ServiceError | oip.ProtocolError):
        raise exc
    if exc.status == CLIENT_CLOSED_REQUEST:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    status = 400 if exc.status in _AS_BAD_REQUEST else exc.status
    return JSONResponse({"error": exc.message}, status_code=status, headers=getattr(exc, "headers", None))


def _responses(ok: type[schemas.BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {200: {"model": ok}}
    out.update({c: {"model": schemas.V2Error, "description": V2_ERROR_TEXT[c]} for c in errors})
    return out


def _state(request: Request) -> ServiceState:
    return service_state(request)


def _model_spec(lm: LoadedModel, settings: Settings) -> oip.ModelSpec:
    outputs = oip.OUTPUT_NAMES + ((oip.PERCENTILE,) if lm.quantiles is not None else ())
    return oip.ModelSpec(
        x_dim=lm.x_dim,
        image_shape=lm.image_shape,
        outputs=outputs,
        max_images=settings.max_images,
        max_k=settings.max_k,
        default_k=min(5000, settings.max_k),
    )


async def _run_loglik(request: Request, lm: LoadedModel, x: torch.Tensor, k: int, seed: int) -> LoglikResult:
    """The same scheduler, engine calls and noise as POST /loglik (the server's IWAE_TIMEOUT_S deadline)."""
    req = ModelRequest(lm, seed, _state(request), request, None)
    return await req.loglik(x, k)


def add_routes(r: APIRouter, settings: Settings) -> None:
    tags: list[str | Enum] = ["Open Inference Protocol (v2)"]

    @r.get("/v2", tags=tags, summary="Server metadata", response_model=schemas.V2ServerMetadata)
    async def server_metadata() -> dict[str, Any]:
        return oip.server_metadata(_package_version())

    @r.get("/v2/health/live", tags=tags, summary="Server liveness", response_model=schemas.V2Live)
    async def live() -> dict[str, Any]:
        return {"live": True}

    @r.get(
        "/v2/health/ready",
        tags=tags,
        summary="Server readiness: every model loaded and warmed up (400 before)",
        responses=_responses(schemas.V2Ready, 400),
    )
    async def ready(request: Request) -> Response:
        if _state(request).ready:
            return JSONResponse({"ready": True})
        return _error("not ready: models are loading or warming up")

    @r.get(
        "/v2/models/{name}",
        tags=tags,
        summary="Model metadata: its input and outputs",
        responses=_responses(schemas.V2ModelMetadata, 404, 503),
    )
    async def model_metadata(request: Request, name: ModelName) -> Response:
        try:
            lm = _state(request).loaded(name)
        except Exception as e:
            return _as_response(e)
        return JSONResponse(oip.model_metadata(lm.name, _model_spec(lm, settings)))

    @r.get(
        "/v2/models/{name}/config",
        tags=tags,
        summary="Triton's model configuration (for perf_analyzer)",
        responses=_responses(schemas.V2ModelConfig, 404, 503),
    )
    async def model_config(request: Request, name: ModelName) -> Response:
        try:
            lm = _state(request).loaded(name)
        except Exception as e:
            return _as_response(e)
        return JSONResponse(oip.model_config(lm.name, _model_spec(lm, settings)))

    @r.get(
        "/v2/models/{name}/ready",
        tags=tags,
        summary="Model readiness (400 while the service warms up)",
        responses=_responses(schemas.V2ModelReady, 400, 404, 503),
    )
    async def model_ready(request: Request, name: ModelName) -> Response:
        state = _state(request)
        try:
            lm = state.loaded(name)
        except Exception as e:
            return _as_response(e)
        if not state.ready:
            return _error(f"model {lm.name!r} is loaded but the service is still warming up")
        return JSONResponse({"name": lm.name, "ready": True})

    @r.post(
        "/v2/models/{name}/infer",
        tags=tags,
        summary="Inference: L_k per image",
        description="The images as one tensor `images` (FP32, FP64, UINT8 0-255 or BOOL; [N, x_dim] or "
        "[N, H, W]), parameters k, seed, binarize; outputs loglik, stderr, ess, elbo, bits_per_dim (and "
        "percentile) as FP64 [N]. Supports the binary tensor data extension. See docs/service.md.",
        responses=_infer_responses(),
        openapi_extra=_INFER_BODY,
    )
    async def infer(request: Request, name: ModelName) -> Response:
        try:
            return await _infer(request, name, settings)
        except Exception as e:
            return _as_response(e)

    # Last: any other /v2 path gets the protocol's error body.
    @r.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
    async def not_found(request: Request, path: str) -> Response:
        allowed = _allowed_methods(request)
        if allowed:  # a v2 route, asked with another method
            return JSONResponse(
                {"error": f"method {request.method} not allowed on /v2/{path}; allowed: {', '.join(allowed)}"},
                status_code=405,
                headers={"Allow": ", ".join(allowed)},
            )
        return _error(f"no such endpoint /v2/{path}; see docs/service.md for the v2 routes", 404)


# The request body as FastAPI cannot know it (the route reads the body itself): the JSON schema here is generic,
# service/openapi_truth.py makes it exact from the loaded models. Binary requests (the extension) are a JSON
# header followed by the tensor bytes, with the header's length in Inference-Header-Content-Length.
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON, or (binary tensor data extension) a JSON header followed "
        "by the tensor's bytes, the header's length given by the Inference-Header-Content-Length header.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _infer_responses() -> dict[int | str, dict[str, Any]]:
    out = _responses(schemas.V2InferResponse, 400, 404, 413, 503, 504)
    # Binary outputs: the JSON header, then the outputs' bytes (Inference-Header-Content-Length).
    out[200]["content"] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return out


def _allowed_methods(request: Request) -> list[str]:
    """The methods of the documented routes whose path matches the request's (none: no such endpoint)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, APIRoute) and route.include_in_schema and route.path_regex.match(request.url.path):
            methods |= route.methods
    return sorted(methods)


async def _infer(request: Request, name: str, settings: Settings) -> Response:
    lm = _state(request).loaded(name)
    spec = _model_spec(lm, settings)
    body = await request.body()
    req = oip.parse_infer_request(body, request.headers.get(HEADER_LENGTH), spec)
    n = int(req.x.shape[0])
    if n * req.k > settings.max_request_cost:
        raise oip.ProtocolError(
            f"request too large: {n} images × k {req.k} = {n * req.k}, over the per-request limit of "
            f"{settings.max_request_cost} (IWAE_MAX_REQUEST_COST)",
            413,
        )
    # 53 bits when chosen here: exact in every JSON client.
    seed = req.seed if req.seed is not None else secrets.randbits(53)
    x = torch.from_numpy(validate_and_binarize(req.x, req.binarize, seed))
    stats = await _run_loglik(request, lm, x, req.k, seed)
    tensors = {
        "loglik": stats.loglik,
        "stderr": stats.stderr,
        "ess": stats.ess,
        "elbo": stats.elbo,
        "bits_per_dim": np.array([bits_per_dim(float(v), lm.x_dim) for v in stats.loglik]),
    }
    parameters: dict[str, Any] = {"k": req.k, "seed": seed, "binarize": req.binarize.value}
    if lm.quantiles is not None:
        tensors[oip.PERCENTILE], parameters["percentile_k"] = lm.quantiles.percentile(stats.loglik, req.k)
    payload, header_length = oip.encode_infer_response(lm.name, req.id, tensors, req.outputs, parameters)
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
