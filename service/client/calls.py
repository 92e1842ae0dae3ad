"""What both clients share: how a call becomes an HTTP request (images as .npy or multipart uploads, query
parameters), and when a 503 is retried."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.client.errors import error_from_response, retry_after_seconds

DEFAULT_URL = "http://127.0.0.1:8000"


ImagesLike = np.ndarray | Sequence[Any]


def is_file_list(images: Any) -> bool:
    return (
        isinstance(images, list | tuple) and len(images) > 0 and all(isinstance(i, str | Path | bytes) for i in images)
    )


def image_payload(images: ImagesLike) -> dict[str, Any]:
    """httpx keyword arguments carrying the images: .npy for arrays, multipart for files."""
    if is_file_list(images):
        files = []
        for i, item in enumerate(images):
            if isinstance(item, bytes):
                files.append(("files", (f"image{i}.png", item, "application/octet-stream")))
            else:
                p = Path(item)
                files.append(("files", (p.name, p.read_bytes(), "application/octet-stream")))
        return {"files": files}
    arr = np.asarray(images)
    if arr.dtype.kind not in "biuf":
        arr = arr.astype(np.float64)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {"content": buf.getvalue(), "headers": {"content-type": "application/x-npy"}}


def query_params(**kwargs: Any) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if v is None:
            continue
        out[k] = str(v).lower() if isinstance(v, bool) else v
    return out


@dataclass
class Call:
    method: str
    path: str
    params: dict[str, Any]
    payload: dict[str, Any]


class ClientBase:
    @staticmethod
    def auth_headers(api_key: str | None) -> dict[str, str]:
        """The Authorization header for ``api_key`` (servers with IWAE_API_KEYS set require one)."""
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def __init__(self, max_retries: int, max_retry_wait: float) -> None:
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if response.status_code != 503 or attempt >= self.max_retries:
            return None
        after = retry_after_seconds(response)
        return min(after if after is not None else 1.0, self.max_retry_wait)

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        raise error_from_response(response)

    # Request descriptions shared by both clients.
    @staticmethod
    def _loglik_call(
        images: ImagesLike,
        k: int,
        model: str | None,
        seed: int | None,
        binarize: str,
        resize: bool,
        target_stderr: float | None = None,
    ) -> Call:
        return Call(
            "POST",
            "/loglik",
            query_params(
                k=k, model=model, seed=seed, binarize=binarize, resize=resize or None, target_stderr=target_stderr
            ),
            image_payload(images),
        )

    @staticmethod
    def _encode_call(
        images: ImagesLike, samples: int, model: str | None, seed: int | None, binarize: str, resize: bool
    ) -> Call:
        return Call(
            "POST",
            "/encode",
            query_params(samples=samples, model=model, seed=seed, binarize=binarize, resize=resize or None),
            image_payload(images),
        )

    @staticmethod
    def _active_units_call(
        images: ImagesLike, samples: int | None, model: str | None, seed: int | None, binarize: str, resize: bool
    ) -> Call:
        return Call(
            "POST",
            "/active-units",
            query_params(samples=samples, model=model, seed=seed, binarize=binarize, resize=resize or None),
            image_payload(images),
        )

    @staticmethod
    def _sample_call(n: int, fmt: str, model: str | None, seed: int | None, pixels: str | None = None) -> Call:
        return Call("GET", "/sample", query_params(n=n, format=fmt, model=model, seed=seed, pixels=pixels), {})
