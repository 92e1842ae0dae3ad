"""Python client for the service: `IWAEClient` (sync) and `AsyncIWAEClient`, on httpx.

    from service.client import IWAEClient
    with IWAEClient("http://127.0.0.1:8000") as c:
        r = c.loglik(images, k=5000, seed=0)   # images: [N, 28, 28] or [N, 784] array of 0/1
        r.loglik, r.stderr                     # NumPy arrays, one entry per image

Images go as an .npy body (exact and compact); file paths or bytes go as a multipart PNG/JPEG upload.
Servers with API keys need ``api_key="..."`` (sent as `Authorization: Bearer`). Errors come back as
`IWAEError` subclasses carrying the server's message. A 503 (queue full, draining) is retried
after the server's Retry-After, up to ``max_retries`` times.
"""

from service.client.aio import AsyncIWAEClient
from service.client.calls import DEFAULT_URL, ImagesLike
from service.client.errors import (
    BadRequestError,
    GatewayTimeoutError,
    InvalidInputError,
    IWAEError,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    error_from_response,
)
from service.client.results import (
    ActiveUnitsResult,
    EncodeResult,
    LayerEncoding,
    LoglikResult,
    SampleResult,
)
from service.client.sync import IWAEClient

__all__ = [
    "DEFAULT_URL",
    "ActiveUnitsResult",
    "AsyncIWAEClient",
    "BadRequestError",
    "EncodeResult",
    "GatewayTimeoutError",
    "IWAEClient",
    "IWAEError",
    "ImagesLike",
    "InvalidInputError",
    "LayerEncoding",
    "LoglikResult",
    "NotFoundError",
    "PayloadTooLargeError",
    "SampleResult",
    "ServerError",
    "ServiceUnavailableError",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "error_from_response",
]
