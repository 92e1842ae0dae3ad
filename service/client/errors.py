"""The client's errors: one class per HTTP status, each carrying the server's code and message."""

from __future__ import annotations

import httpx


class IWAEError(Exception):
    """A non-2xx answer: ``status``, the server's ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BadRequestError(IWAEError):
    """400: malformed body (invalid JSON, undecodable image or .npy, empty body)."""


class UnauthorizedError(IWAEError):
    """401: the server requires an API key (``api_key=``) and none or a wrong one was sent."""


class NotFoundError(IWAEError):
    """404: unknown model or endpoint."""


class PayloadTooLargeError(IWAEError):
    """413: body, image count or images × k over the server's limits."""


class UnsupportedMediaTypeError(IWAEError):
    """415: the body's content type is not one the server reads."""


class InvalidInputError(IWAEError):
    """422: an invalid parameter or invalid images (shape, range, NaN, non-binary pixels)."""


class ServiceUnavailableError(IWAEError):
    """503: queue full, not ready or shutting down (still so after the retries)."""


class GatewayTimeoutError(IWAEError):
    """504: the request was not done within the server's timeout."""


class ServerError(IWAEError):
    """Any other error status."""


_BY_STATUS: dict[int, type[IWAEError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidInputError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: not sent by this server


def error_from_response(response: httpx.Response) -> IWAEError:
    try:
        body = response.json()
        code, message = str(body.get("error", "error")), str(body.get("detail", response.text))
    except (ValueError, AttributeError):
        code, message = "error", response.text or response.reason_phrase
    cls = _BY_STATUS.get(response.status_code, ServerError)
    return cls(response.status_code, code, message, retry_after_seconds(response))
