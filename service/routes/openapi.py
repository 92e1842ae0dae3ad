"""OpenAPI text the routes share: what each error status means, and the three ways images can be posted."""

from __future__ import annotations

from typing import Any

from service import schemas

ERROR_TEXT = {
    400: "Malformed body: invalid JSON, undecodable PNG/JPEG or .npy, empty body.",
    404: "Unknown model (the message lists the available ones).",
    413: "Body over IWAE_MAX_BODY_BYTES (refused unread), too many images, or images × k over IWAE_MAX_REQUEST_COST.",
    415: "Unsupported Content-Type.",
    422: "Invalid parameter (k, n, seed, binarize, ...; unknown parameter names too) or invalid images: wrong "
    "shape, NaN/inf, values outside [0, 1], non-binary pixels with binarize=none.",
    401: "Missing or invalid API key (only when IWAE_API_KEYS is set); the body is not read.",
    503: "The model's queue is full or the service is draining; Retry-After says when to come back (1-60 s, "
    "from the queued work and the measured throughput).",
    504: "The request was not done within IWAE_TIMEOUT_S (or its timeout_ms).",
}
# The error statuses of a route that reads images and computes.
IMAGE_ROUTE_ERRORS = (400, 404, 413, 415, 422, 503, 504)
X_HINT = "a flat list of x_dim values or an H × W nested list (28 × 28 for MNIST models)"


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": schemas.ErrorResponse, "description": ERROR_TEXT[c]} for c in codes}


def image_body() -> dict[str, Any]:
    """The request body of the routes that read images (they read it themselves, in three formats)."""
    return {
        "requestBody": {
            "required": True,
            "description": 'Images, one of three ways. JSON: `{"images": [...]}`, each image '
            + X_HINT
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
