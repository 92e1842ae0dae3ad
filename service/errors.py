"""Every error the service answers with, and how it becomes an HTTP response.

Each error is JSON ``{"error": code, "detail": message}`` with the status of its class. The tree:

    ServiceError                      status, code, message (+ optional response headers)
    ├── BadRequestError               400  malformed body: invalid JSON or .npy, undecodable image, empty body
    ├── UnauthorizedError             401  unauthorized (missing or wrong API key; service/auth.py answers it)
    ├── NotFoundError                 404
    │   └── UnknownModelError         404  unknown_model
    ├── PayloadTooLargeError          413  too many images, images × k over the limit, an oversized image
    │   └── BodyTooLargeError         413  body_too_large (the body is refused unread)
    ├── UnsupportedMediaTypeError     415  unsupported_media_type
    ├── InvalidInputError             422  invalid images or parameters (the code says which problem)
    │   └── UnknownParameterError     422  unknown_parameter
    ├── ServiceUnavailableError       503
    │   ├── NotReadyError             503  not_ready
    │   ├── QueueFullError            503  queue_full
    │   ├── ShuttingDownError         503  shutting_down (a request sent while the service drains)
    │   └── DrainingError             503  draining (/readyz while the service drains)
    ├── JobTimeoutError               504  timeout
    └── ClientGoneError               499  (no body: the client is not there to read it)

A class fixes the status and a default code; where one status covers several problems (400, 413, 422) the
raiser names the specific ``ErrorCode``. `ErrorCode` lists every code the server emits, including the ones
for errors raised by the web framework itself (`install_error_handlers` maps those); docs/service.md's
error table lists the same set (a test checks it).
"""

from __future__ import annotations

import enum
import json
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

# nginx's convention for "client closed request": only ever seen in logs and metrics.
CLIENT_CLOSED_REQUEST = 499


class ErrorCode(enum.StrEnum):
    """The machine-readable `error` field of every error response."""

    # 400
    empty_body = "empty_body"
    invalid_json = "invalid_json"  # 400 for unparsable JSON, 422 for JSON that is not {"images": [...]}
    invalid_npy = "invalid_npy"
    undecodable_image = "undecodable_image"
    invalid_multipart = "invalid_multipart"
    bad_request = "bad_request"  # raised by the web framework
    # 401
    unauthorized = "unauthorized"
    # 404, 405
    unknown_model = "unknown_model"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    # 413
    body_too_large = "body_too_large"
    too_many_images = "too_many_images"
    request_too_large = "request_too_large"
    image_too_large = "image_too_large"
    too_large = "too_large"  # raised by the web framework
    # 415
    unsupported_media_type = "unsupported_media_type"
    # 422
    invalid_parameter = "invalid_parameter"
    unknown_parameter = "unknown_parameter"
    invalid_shape = "invalid_shape"
    invalid_dtype = "invalid_dtype"
    no_images = "no_images"
    not_finite = "not_finite"
    out_of_range = "out_of_range"
    not_binary = "not_binary"
    too_few_images = "too_few_images"
    not_an_image_model = "not_an_image_model"
    invalid_image_mode = "invalid_image_mode"
    # 503, 504
    queue_full = "queue_full"
    not_ready = "not_ready"
    shutting_down = "shutting_down"
    draining = "draining"
    timeout = "timeout"
    # any other status the web framework raises
    http_error = "http_error"


class ServiceError(Exception):
    """Base of the tree: an HTTP ``status``, a ``code`` and a ``message`` naming the problem."""

    status: ClassVar[int] = 500
    default_code: ClassVar[ErrorCode]

    def __init__(self, message: str, code: ErrorCode | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.headers = headers


class BadRequestError(ServiceError):
    status = 400
    default_code = ErrorCode.bad_request


class UnauthorizedError(ServiceError):
    """Raised nowhere: `ApiKeyMiddleware` refuses before the app runs, with this status and code."""

    status = 401
    default_code = ErrorCode.unauthorized


class NotFoundError(ServiceError):
    status = 404
    default_code = ErrorCode.not_found


class UnknownModelError(NotFoundError):
    default_code = ErrorCode.unknown_model

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; available models: {', '.join(available)}")
        self.name = name
        self.available = available


class PayloadTooLargeError(ServiceError):
    status = 413
    default_code = ErrorCode.request_too_large


class BodyTooLargeError(PayloadTooLargeError):
    default_code = ErrorCode.body_too_large

    def __init__(self, message: str) -> None:
        # The rest of the body is never read: close the connection rather than drain it.
        super().__init__(message, headers={"Connection": "close"})


class UnsupportedMediaTypeError(ServiceError):
    status = 415
    default_code = ErrorCode.unsupported_media_type


class InvalidInputError(ServiceError):
    status = 422
    default_code = ErrorCode.invalid_parameter


class UnknownParameterError(InvalidInputError):
    default_code = ErrorCode.unknown_parameter


class ServiceUnavailableError(ServiceError):
    status = 503
    default_code = ErrorCode.not_ready

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReadyError(ServiceUnavailableError):
    default_code = ErrorCode.not_ready


class QueueFullError(ServiceUnavailableError):
    default_code = ErrorCode.queue_full


class ShuttingDownError(ServiceUnavailableError):
    default_code = ErrorCode.shutting_down

    def __init__(self, retry_after_s: int, message: str = "the service is shutting down") -> None:
        super().__init__(message, retry_after_s)


class DrainingError(ServiceUnavailableError):
    default_code = ErrorCode.draining

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the service is draining before it stops: send work elsewhere", retry_after_s)


class JobTimeoutError(ServiceError):
    status = 504
    default_code = ErrorCode.timeout

    def __init__(self, timeout_s: float, limit_s: float | None = None) -> None:
        limit_s = timeout_s if limit_s is None else limit_s
        super().__init__(
            f"request timed out: no result within {timeout_s:g} s in queue and compute (IWAE_TIMEOUT_S = "
            f"{limit_s:g}, or the request's timeout_ms); send fewer images or a smaller k, or retry later"
        )


class ClientGoneError(ServiceError):
    """The client disconnected before its result was ready."""

    status = CLIENT_CLOSED_REQUEST
    default_code = ErrorCode.http_error

    def __init__(self) -> None:
        super().__init__("client disconnected")


# --- responses -------------------------------------------------------------------------------------------
def error_response(status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code.value, "detail": message}, status_code=status, headers=headers)


_LIMIT_HINTS = {"k": "IWAE_MAX_K", "n": "IWAE_MAX_N", "samples": "IWAE_MAX_K"}
_FRAMEWORK_CODES = {
    400: ErrorCode.bad_request,
    404: ErrorCode.not_found,
    405: ErrorCode.method_not_allowed,
    413: ErrorCode.too_large,
}


def validation_message(exc: RequestValidationError) -> str:
    """One sentence per invalid query parameter, naming it, the rule and the value sent."""
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


def install_error_handlers(app: FastAPI) -> None:
    """Our errors, invalid query parameters and the framework's own HTTP errors, all as JSON."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ClientGoneError)
    async def _client_gone(_: Request, exc: ClientGoneError) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, ErrorCode.invalid_parameter, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = _FRAMEWORK_CODES.get(exc.status_code, ErrorCode.http_error)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint; see /docs for the API"
        return error_response(exc.status_code, code, detail, getattr(exc, "headers", None))
