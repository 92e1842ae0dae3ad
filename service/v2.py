"""The Open Inference Protocol routes (KServe / Triton "v2" REST), next to the native ones: server and model
metadata, health, and inference through the same scheduler as /loglik. Errors are ``{"error": message}``.

The protocol itself (decoding requests, the binary tensor extension, encoding responses) is service/oip.py.
"""

# No `from __future__ import annotations`: FastAPI evaluates the route signatures.
import secrets
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response

from service import oip
from service.inputs import bits_per_dim, validate_and_binarize
from service.registry import LoadedModel
from service.settings import Settings

HEADER_LENGTH = "Inference-Header-Content-Length"
ModelName = Annotated[str, Path(description="Model name, as listed by GET /models.")]
# Statuses of the native errors that become 400 here: the protocol answers bad requests with 400.
_AS_BAD_REQUEST = {415, 422}
CLIENT_CLOSED_REQUEST = 499


def _package_version() -> str:
    try:
        return version("iwae-serve")
    except PackageNotFoundError:
        return "0"


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _as_response(exc: Exception) -> Response:
    """Any error of a v2 request as the protocol's ``{"error": message}``: never a 500 for a bad request."""
    status = getattr(exc, "status", None)
    if status == CLIENT_CLOSED_REQUEST or type(exc).__name__ == "ClientGoneError":
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, LookupError) and status is None:  # an unknown model
        status = 404
    if status is None:
        status = {
            "BodyTooLargeError": 413,
            "QueueFullError": 503,
            "EngineStoppedError": 503,
            "JobTimeoutError": 504,
        }.get(type(exc).__name__)
    if status is None:
        raise exc
    headers = getattr(exc, "headers", None)
    return JSONResponse({"error": message}, status_code=400 if status in _AS_BAD_REQUEST else status, headers=headers)


def _state(request: Request) -> Any:
    return request.app.state.service


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


async def _run_loglik(request: Request, lm: LoadedModel, x: Any, k: int, seed: int) -> Any:
    """The same scheduler, batching and noise as POST /loglik."""
    state = _state(request)
    engine = state.engine(lm)
    return await engine.wait(engine.submit_loglik(x, k, seed), state.settings.timeout_s, request.receive)


def router(settings: Settings) -> APIRouter:
    r = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])

    @r.get("", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return oip.server_metadata(_package_version())

    @r.get("/health/live", summary="Server liveness")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @r.get("/health/ready", summary="Server readiness: every model loaded and warmed up (400 before)")
    async def ready(request: Request) -> Response:
        if _state(request).ready:
            return JSONResponse({"ready": True})
        return _error("not ready: models are loading or warming up")

    @r.get("/models/{name}", summary="Model metadata: its input and outputs")
    async def model_metadata(request: Request, name: ModelName) -> Response:
        try:
            lm = _state(request).loaded(name)
        except Exception as e:
            return _as_response(e)
        return JSONResponse(oip.model_metadata(lm.name, _model_spec(lm, settings)))

    @r.get("/models/{name}/config", summary="Triton's model configuration (for perf_analyzer)")
    async def model_config(request: Request, name: ModelName) -> Response:
        try:
            lm = _state(request).loaded(name)
        except Exception as e:
            return _as_response(e)
        return JSONResponse(oip.model_config(lm.name, _model_spec(lm, settings)))

    @r.get("/models/{name}/ready", summary="Model readiness")
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
        "/models/{name}/infer",
        summary="Inference: L_k per image",
        description="The images as one tensor `images` (FP32, FP64, UINT8 0-255 or BOOL; [N, x_dim] or "
        "[N, H, W]), parameters k, seed, binarize; outputs loglik, stderr, ess, elbo, bits_per_dim (and "
        "percentile) as FP64 [N]. Supports the binary tensor data extension. See docs/service.md.",
    )
    async def infer(request: Request, name: ModelName) -> Response:
        try:
            return await _infer(request, name, settings)
        except Exception as e:
            return _as_response(e)

    @r.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
    async def not_found(path: str) -> Response:
        return _error(f"no such endpoint /v2/{path}; see docs/service.md for the v2 routes", 404)

    return r


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
