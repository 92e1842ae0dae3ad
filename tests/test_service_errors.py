"""Every bad input gets a 4xx JSON error naming the problem, never a 500, and the server keeps serving."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.errors import (
    BodyTooLargeError,
    ErrorCode,
    InvalidInputError,
    JobTimeoutError,
    QueueFullError,
    ServiceError,
    UnknownModelError,
)
from service.settings import Settings
from service.testing import InProcessService, serve_in_process, tiny_model, write_checkpoint

MAX_BODY = 64 * 1024


def ones(n: int = 1, x_dim: int = 784) -> list[list[float]]:
    return np.ones((n, x_dim)).tolist()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[InProcessService]:
    write_checkpoint(tmp_path / "tiny.safetensors", tiny_model())
    settings = Settings(
        models=[tmp_path], default_model="tiny", device="cpu", max_k=100, max_n=50, max_images=5,
        max_body_bytes=MAX_BODY, max_request_cost=300,
    )  # fmt: skip
    async with serve_in_process(settings) as s:
        yield s


NPY = {"content-type": "application/x-npy"}

# (description, request kwargs, status, error code, words the message must contain)
CASES: list[tuple[str, dict[str, Any], int, str, list[str]]] = [
    (
        "flat image of wrong length",
        {"json": {"images": [[0.0] * 783]}},
        422,
        "invalid_shape",
        ["image 0", "[783]", "784"],
    ),
    (
        "nested image of wrong shape",
        {"json": {"images": np.zeros((1, 27, 28)).tolist()}},
        422,
        "invalid_shape",
        ["[27, 28]", "28 × 28"],
    ),
    ("ragged rows", {"json": {"images": [[[0.0] * 28] * 27 + [[0.0] * 27]]}}, 422, "invalid_shape", ["image 0"]),
    ("second image ragged", {"json": {"images": [[0.0] * 784, [0.0] * 10]}}, 422, "invalid_shape", ["image 1", "[10]"]),
    ("single image not wrapped", {"json": {"images": [0.0] * 784}}, 422, "invalid_shape", ["wrap a single image"]),
    (
        "npy of wrong shape",
        {"content": npy(np.zeros((2, 27, 28))), "headers": NPY},
        422,
        "invalid_shape",
        ["[2, 27, 28]", "[N, 28, 28] or [N, 784]"],
    ),
    ("npy of strings", {"content": npy(np.array([["a"] * 784])), "headers": NPY}, 422, "invalid_dtype", ["dtype"]),
    ("value above 1", {"json": {"images": [[0.0] * 783 + [2.0]]}}, 422, "out_of_range", ["outside [0, 1]", "max 2"]),
    ("negative value", {"json": {"images": [[-0.5] + [0.0] * 783]}}, 422, "out_of_range", ["outside [0, 1]"]),
    (
        "NaN in JSON",
        {"content": b'{"images": [[NaN' + b", 0" * 783 + b"]]}", "headers": {"content-type": "application/json"}},
        422,
        "not_finite",
        ["NaN or infinite"],
    ),
    ("inf in npy", {"content": npy(np.full((1, 784), np.inf)), "headers": NPY}, 422, "not_finite", ["NaN or infinite"]),
    ("non-numeric JSON value", {"json": {"images": [["x"] * 784]}}, 422, "invalid_shape", ["non-numeric"]),
    (
        "grayscale with binarize=none",
        {"json": {"images": [[0.5] * 784]}},
        422,
        "not_binary",
        ["non-binary", "binarize=threshold", "binarize=stochastic"],
    ),
    (
        "invalid JSON",
        {"content": b"{images: oops", "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        ["not valid JSON"],
    ),
    ("JSON without images", {"json": {"pictures": []}}, 422, "invalid_json", ['{"images"']),
    ("JSON with an extra field", {"json": {"images": ones(), "k": 5}}, 422, "invalid_json", ["'k'"]),
    ("empty image list", {"json": {"images": []}}, 422, "no_images", ["empty"]),
    (
        "undecodable PNG",
        {"files": [("files", ("bad.png", b"\x89PNG not really", "image/png"))]},
        400,
        "undecodable_image",
        ["'bad.png'", "not a decodable PNG/JPEG"],
    ),
    (
        "GIF upload",
        {"files": [("files", ("a.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif"))]},
        400,
        "undecodable_image",
        ["'a.gif'"],
    ),
    (
        "PNG of wrong size",
        {"files": [("files", ("s.png", png(np.zeros((20, 20))), "image/png"))]},
        422,
        "invalid_shape",
        ["20 × 20", "resize=true"],
    ),
    (
        "grayscale PNG with binarize=none",
        {"files": [("files", ("g.png", png(np.full((28, 28), 128)), "image/png"))]},
        422,
        "not_binary",
        ["binarize"],
    ),
    (
        "multipart without files",
        {"data": {"note": "hi"}, "files": [("other", ("", b"", ""))]},
        422,
        "no_images",
        ["no file parts"],
    ),
    (
        "empty file upload",
        {"files": [("files", ("e.png", b"", "image/png"))]},
        400,
        "undecodable_image",
        ["'e.png'", "is empty"],
    ),
    ("undecodable npy", {"content": b"\x93NUMPY garbage", "headers": NPY}, 400, "invalid_npy", [".npy"]),
    ("npy without magic", {"content": b"plain bytes", "headers": NPY}, 400, "invalid_npy", ["\\x93NUMPY"]),
    (
        "too many images (JSON)",
        {"json": {"images": ones(6)}},
        413,
        "too_many_images",
        ["6", "limit is 5", "IWAE_MAX_IMAGES"],
    ),
    (
        "too many images (npy)",
        {"content": npy(np.ones((6, 784))), "headers": NPY},
        413,
        "too_many_images",
        ["IWAE_MAX_IMAGES"],
    ),
    (
        "too many files",
        {"files": [("files", (f"{i}.png", png(np.zeros((28, 28))), "image/png")) for i in range(6)]},
        413,
        "too_many_images",
        ["IWAE_MAX_IMAGES"],
    ),
    (
        "far too many files",
        {"files": [("files", (f"{i}.png", png(np.zeros((28, 28))), "image/png")) for i in range(40)]},
        413,
        "too_many_images",
        ["more than 5 files", "IWAE_MAX_IMAGES"],
    ),
    (
        "truncated multipart",
        {
            "content": b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nabc',
            "headers": {"content-type": "multipart/form-data; boundary=xyz"},
        },
        400,
        "invalid_multipart",
        ["no complete parts", "truncated"],
    ),
    (
        "empty body",
        {"content": b"", "headers": {"content-type": "application/json"}},
        400,
        "empty_body",
        ["empty body"],
    ),
    ("empty body without content type", {}, 400, "empty_body", ["empty body"]),
    (
        "unsupported content type",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        ["'text/plain'", "application/json"],
    ),
]

PARAM_CASES: list[tuple[str, str, int, str, list[str]]] = [
    ("k below 1", "/loglik?k=0", 422, "invalid_parameter", ["k", "greater than or equal to 1", "'0'"]),
    ("k above max k", "/loglik?k=101", 422, "invalid_parameter", ["k", "100", "IWAE_MAX_K"]),
    ("k not a number", "/loglik?k=lots", 422, "invalid_parameter", ["k", "integer"]),
    ("negative seed", "/loglik?seed=-1", 422, "invalid_parameter", ["seed"]),
    (
        "unknown binarize value",
        "/loglik?binarize=otsu",
        422,
        "invalid_parameter",
        ["binarize", "'threshold'", "'otsu'"],
    ),
    ("unknown resize value", "/loglik?resize=maybe", 422, "invalid_parameter", ["resize"]),
    (
        "unknown parameter name",
        "/loglik?K=10",
        422,
        "unknown_parameter",
        ["K", "binarize, k, model, resize, seed, target_stderr"],
    ),
    ("unknown model", "/loglik?model=nope", 404, "unknown_model", ["'nope'", "tiny"]),
    (
        "images × k over the request limit",
        "/loglik?k=100&binarize=threshold",
        413,
        "request_too_large",
        ["400", "300", "IWAE_MAX_REQUEST_COST"],
    ),
    ("encode samples above max", "/encode?samples=101", 422, "invalid_parameter", ["samples", "IWAE_MAX_K"]),
    ("active units of one image", "/active-units", 422, "too_few_images", ["at least 2"]),
]

GET_CASES: list[tuple[str, str, int, str, list[str]]] = [
    ("n below 1", "/sample?n=0", 422, "invalid_parameter", ["n", "greater than or equal to 1"]),
    ("n above max n", "/sample?n=51", 422, "invalid_parameter", ["n", "50", "IWAE_MAX_N"]),
    ("unknown format", "/sample?format=gif", 422, "invalid_parameter", ["format", "'json'", "'png'"]),
    ("unknown pixels", "/sample?format=png&pixels=rgb", 422, "invalid_parameter", ["pixels"]),
    ("unknown model for sample", "/sample?model=zz", 404, "unknown_model", ["'zz'"]),
    ("unknown model card", "/models/zz", 404, "unknown_model", ["'zz'", "tiny"]),
    ("unknown endpoint", "/nope", 404, "not_found", ["/docs"]),
]


def _ids(cases: list[tuple[Any, ...]]) -> Iterator[str]:
    return (c[0] for c in cases)


def check(r: Any, status: int, code: str, words: list[str]) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    for w in words:
        assert w in body["detail"], (w, body["detail"])


@pytest.mark.parametrize(("name", "kwargs", "status", "code", "words"), CASES, ids=list(_ids(CASES)))
async def test_bad_body(
    svc: InProcessService, name: str, kwargs: dict[str, Any], status: int, code: str, words: list[str]
) -> None:
    r = await svc.client.post("/loglik?k=5", **kwargs)
    check(r, status, code, words)


@pytest.mark.parametrize(("name", "url", "status", "code", "words"), PARAM_CASES, ids=list(_ids(PARAM_CASES)))
async def test_bad_parameter(
    svc: InProcessService, name: str, url: str, status: int, code: str, words: list[str]
) -> None:
    images = np.full((4, 784), 0.7).tolist() if "request limit" in name else ones()
    r = await svc.client.post(url, json={"images": images})
    check(r, status, code, words)


@pytest.mark.parametrize(("name", "url", "status", "code", "words"), GET_CASES, ids=list(_ids(GET_CASES)))
async def test_bad_get(svc: InProcessService, name: str, url: str, status: int, code: str, words: list[str]) -> None:
    check(await svc.client.get(url), status, code, words)


async def test_body_over_limit_is_refused_before_reading(svc: InProcessService) -> None:
    # Declared by Content-Length: refused at the first read.
    big = b'{"images": [' + b"0," * MAX_BODY + b"0]}"
    r = await svc.client.post("/loglik", content=big, headers={"content-type": "application/json"})
    check(r, 413, "body_too_large", [f"{len(big)} bytes", str(MAX_BODY), "IWAE_MAX_BODY_BYTES"])

    # Chunked (no Content-Length): refused as soon as the limit is passed, not after the whole stream.
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(200):
            sent += 1
            yield b"0" * 4096

    r = await svc.client.post("/loglik", content=chunks(), headers={"content-type": "application/x-npy"})
    check(r, 413, "body_too_large", ["IWAE_MAX_BODY_BYTES"])
    assert sent <= MAX_BODY // 4096 + 2  # 200 chunks were on offer


async def test_server_keeps_serving_during_bad_requests(svc: InProcessService) -> None:
    good = {"images": np.zeros((1, 784)).tolist()}
    bad = [
        svc.client.post("/loglik?k=5", json={"images": [[0.5] * 784]}),
        svc.client.post("/loglik?k=5", content=b"\x93NUMPY!", headers=NPY),
        svc.client.post("/loglik?k=5", files=[("files", ("x.png", b"nope", "image/png"))]),
    ]
    results = await asyncio.gather(*bad, *(svc.client.post(f"/loglik?k=5&seed={i}", json=good) for i in range(4)))
    assert [r.status_code for r in results[:3]] == [422, 400, 400]
    assert [r.status_code for r in results[3:]] == [200] * 4
    assert svc.metric("iwae_requests_total", {"route": "/loglik", "method": "POST", "status": "500"}) == 0


def test_error_codes_are_the_documented_ones() -> None:
    """ErrorCode holds every code the server emits; docs/service.md's error table lists exactly those."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    section = doc.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    documented: set[str] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0][:1].isdigit():
            documented.update(re.findall(r"`([a-z_]+)`", cells[1]))
    assert documented == {c.value for c in ErrorCode}


def test_error_classes_carry_their_status_and_code() -> None:
    assert (UnknownModelError("x", ["a", "b"]).status, UnknownModelError("x", ["a"]).code) == (404, "unknown_model")
    full = QueueFullError("full", retry_after_s=3)
    assert (full.status, full.code, full.headers) == (503, "queue_full", {"Retry-After": "3"})
    assert InvalidInputError("bad").code == ErrorCode.invalid_parameter
    assert InvalidInputError("bad", ErrorCode.not_binary).code == "not_binary"
    assert JobTimeoutError(2.5).status == 504 and "IWAE_TIMEOUT_S = 2.5" in JobTimeoutError(2.5).message
    assert BodyTooLargeError("big").headers == {"Connection": "close"}
    for cls in (UnknownModelError, QueueFullError, InvalidInputError, JobTimeoutError, BodyTooLargeError):
        assert issubclass(cls, ServiceError) and cls.default_code in set(ErrorCode)


async def test_parameters_are_checked_before_the_model_and_the_body(svc: InProcessService) -> None:
    # An invalid parameter wins over an unknown model and over a bad body: nothing is looked up or read first.
    r = await svc.client.post("/loglik?k=0&model=nope", json={"images": ones()})
    check(r, 422, "invalid_parameter", ["k"])
    r = await svc.client.post("/loglik?k=0", content=b"not json", headers={"content-type": "application/json"})
    check(r, 422, "invalid_parameter", ["k"])
    r = await svc.client.get("/sample?n=0&model=nope")
    check(r, 422, "invalid_parameter", ["n"])
    # Every invalid parameter is named, in the order the endpoint lists them.
    r = await svc.client.post("/loglik?binarize=otsu&k=0&seed=-1", json={"images": ones()})
    check(r, 422, "invalid_parameter", ["k", "seed", "binarize"])
    detail = r.json()["detail"]
    assert detail.index("parameter k") < detail.index("parameter seed") < detail.index("parameter binarize")
    # Unknown names are reported before invalid values.
    check(await svc.client.post("/loglik?k=0&K=3", json={"images": ones()}), 422, "unknown_parameter", ["K"])
