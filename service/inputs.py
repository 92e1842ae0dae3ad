"""Request bodies to image tensors: JSON, multipart PNG/JPEG uploads and .npy, with validation and binarization.

Every problem raises a `service.errors.ServiceError` (400, 413, 415 or 422) with a message that names it;
nothing here lets a malformed input through to the model.
"""

from __future__ import annotations

import enum
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException

from service.errors import (
    BadRequestError,
    ErrorCode,
    InvalidInputError,
    PayloadTooLargeError,
    ServiceError,
    UnsupportedMediaTypeError,
)

NPY_MAGIC = b"\x93NUMPY"
JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/npy", "application/octet-stream")
MULTIPART_TYPES = ("multipart/form-data",)
# Decoding a huge image costs memory before its size can be refused; PIL reads the size from the header.
MAX_DECODED_PIXELS = 4096 * 4096


class Binarize(enum.StrEnum):
    """How grayscale inputs become the binary pixels the Bernoulli model is defined on."""

    none = "none"
    threshold = "threshold"
    stochastic = "stochastic"


@dataclass(frozen=True)
class InputSpec:
    """What the target model accepts."""

    x_dim: int
    image_shape: tuple[int, int] | None
    max_images: int

    def shapes_text(self) -> str:
        if self.image_shape:
            h, w = self.image_shape
            return f"{self.x_dim} values as a flat list or a {h} × {w} nested list"
        return f"a flat list of {self.x_dim} values"

    def array_shapes_text(self) -> str:
        if self.image_shape:
            h, w = self.image_shape
            return f"[N, {h}, {w}] or [N, {self.x_dim}]"
        return f"[N, {self.x_dim}]"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


# --- decoders ---------------------------------------------------------------------------------------
def decode_json(body: bytes, spec: InputSpec) -> np.ndarray:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequestError(f"body is not valid JSON: {e}", ErrorCode.invalid_json) from None
    if not isinstance(payload, dict) or "images" not in payload:
        raise InvalidInputError('JSON body must be an object {"images": [...]}', ErrorCode.invalid_json)
    extra = sorted(set(payload) - {"images"})
    if extra:
        raise InvalidInputError(f"unknown JSON field(s) {extra}: the body holds only 'images'", ErrorCode.invalid_json)
    images = payload["images"]
    if not isinstance(images, list):
        raise InvalidInputError("'images' must be a list of images", ErrorCode.invalid_shape)
    if not images:
        raise InvalidInputError("no images: 'images' is an empty list", ErrorCode.no_images)
    if not isinstance(images[0], list):
        raise InvalidInputError(
            f"'images' must be a list of images, each {spec.shapes_text()} (got a list of numbers: "
            "wrap a single image in a list)",
            ErrorCode.invalid_shape,
        )
    check_count(len(images), spec)
    try:
        arr = np.asarray(images, dtype=np.float64)
    except (ValueError, TypeError):
        # Find the first offending image to name it.
        for i, img in enumerate(images):
            try:
                a = np.asarray(img, dtype=np.float64)
            except (ValueError, TypeError):
                raise InvalidInputError(
                    f"image {i} is not a list of numbers (ragged rows or a non-numeric value); "
                    f"expected {spec.shapes_text()}",
                    ErrorCode.invalid_shape,
                ) from None
            _check_image_shape(a.shape, i, spec)
        raise InvalidInputError(
            f"images have different shapes; each must be {spec.shapes_text()}", ErrorCode.invalid_shape
        ) from None
    _check_image_shape(arr.shape[1:], 0, spec)
    return arr.reshape(arr.shape[0], spec.x_dim)


def _check_image_shape(shape: tuple[int, ...], index: int, spec: InputSpec) -> None:
    if tuple(shape) == (spec.x_dim,) or (spec.image_shape and tuple(shape) == spec.image_shape):
        return
    raise InvalidInputError(
        f"image {index} has shape {list(shape)}; expected {spec.shapes_text()}", ErrorCode.invalid_shape
    )


# The header np.save writes: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 784), }
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")


def _fast_npy(body: bytes) -> np.ndarray | None:
    """The common case of a plain numeric C-order array without np.load's overhead (it evaluates the
    header as a Python literal, a large share of a small request's time). None: leave it to np.load."""
    version = body[6] if len(body) > 10 else 0
    if version == 1:
        start, length = 10, int.from_bytes(body[8:10], "little")
    elif version in (2, 3):
        start, length = 12, int.from_bytes(body[8:12], "little")
    else:
        return None
    try:
        header = body[start : start + length].decode("latin-1").strip()
    except UnicodeDecodeError:
        return None
    m = _NPY_HEADER.fullmatch(header)
    if m is None:
        return None
    try:
        dtype = np.dtype(m.group(1))
    except TypeError:
        return None
    shape = tuple(int(s) for s in m.group(2).split(",") if s.strip())
    count = math.prod(shape)
    data = memoryview(body)[start + length :]
    if dtype.kind not in "biuf" or len(data) != count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def decode_npy(body: bytes, spec: InputSpec) -> np.ndarray:
    if not body.startswith(NPY_MAGIC):
        raise BadRequestError("body is not a .npy file (missing the \\x93NUMPY header)", ErrorCode.invalid_npy)
    try:
        fast = _fast_npy(body)
        arr = fast if fast is not None else np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as e:
        raise BadRequestError(f"body is not a readable .npy array: {e}", ErrorCode.invalid_npy) from None
    except Exception as e:  # numpy raises several types for truncated or corrupt files
        raise BadRequestError(
            f"body is not a readable .npy array: {type(e).__name__}: {e}", ErrorCode.invalid_npy
        ) from None
    if arr.dtype.kind not in "biuf":
        raise InvalidInputError(
            f".npy array has dtype {arr.dtype}; expected a numeric (float, int or bool) array", ErrorCode.invalid_dtype
        )
    ok = (arr.ndim == 2 and arr.shape[1] == spec.x_dim) or (
        spec.image_shape is not None and arr.ndim == 3 and tuple(arr.shape[1:]) == spec.image_shape
    )
    if not ok:
        raise InvalidInputError(
            f".npy array has shape {list(arr.shape)}; expected {spec.array_shapes_text()}", ErrorCode.invalid_shape
        )
    if arr.shape[0] == 0:
        raise InvalidInputError("no images: the .npy array has 0 rows", ErrorCode.no_images)
    check_count(arr.shape[0], spec)
    return arr.reshape(arr.shape[0], spec.x_dim).astype(np.float64)


def decode_image_file(data: bytes, label: str, spec: InputSpec, resize: bool) -> np.ndarray:
    """One PNG/JPEG upload to [x_dim] values in [0, 1]."""
    if spec.image_shape is None:
        raise InvalidInputError(
            f"model inputs have {spec.x_dim} values, which is not an image shape; send JSON or .npy instead",
            ErrorCode.not_an_image_model,
        )
    if not data:
        raise BadRequestError(f"{label} is empty", ErrorCode.undecodable_image)
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in ("PNG", "JPEG"):
            raise BadRequestError(
                f"{label} is a {img.format} image; only PNG and JPEG are accepted", ErrorCode.undecodable_image
            )
        w, h = img.size
        if w * h > MAX_DECODED_PIXELS:
            raise PayloadTooLargeError(
                f"{label} is {w} × {h} pixels, more than the {MAX_DECODED_PIXELS} allowed", ErrorCode.image_too_large
            )
        img.load()
    except ServiceError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequestError(f"{label} is not a decodable PNG/JPEG image: {e}", ErrorCode.undecodable_image) from None
    arr = _grayscale(img, label)
    eh, ew = spec.image_shape
    if arr.shape != (eh, ew):
        if not resize:
            raise InvalidInputError(
                f"{label} is {arr.shape[1]} × {arr.shape[0]} (width × height); the model expects {ew} × {eh}: "
                "send images of that size or pass resize=true",
                ErrorCode.invalid_shape,
            )
        resized = Image.fromarray(arr.astype(np.float32), mode="F").resize((ew, eh), Image.Resampling.BILINEAR)
        arr = np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)
    return arr.reshape(spec.x_dim)


def _grayscale(img: Image.Image, label: str) -> np.ndarray:
    """Pixel intensities in [0, 1] as [H, W] float64."""
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.float64) / 65535.0
    if img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        return a / (65535.0 if a.max(initial=0) > 255 else 255.0)
    if img.mode == "F":
        raise InvalidInputError(
            f"{label} has floating-point pixels; send 8- or 16-bit grayscale", ErrorCode.invalid_image_mode
        )
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels take the background (black) so that alpha does not leak into intensity.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def decode_files(files: list[tuple[str, bytes]], spec: InputSpec, resize: bool) -> np.ndarray:
    if not files:
        raise InvalidInputError(
            "the multipart body has no file parts: upload one or more PNG/JPEG files", ErrorCode.no_images
        )
    check_count(len(files), spec)
    rows = [decode_image_file(data, f"file {i} ({name!r})", spec, resize) for i, (name, data) in enumerate(files)]
    return np.stack(rows)


def check_count(n: int, spec: InputSpec) -> None:
    if n > spec.max_images:
        raise PayloadTooLargeError(
            f"too many images: {n} in one request, the limit is {spec.max_images} (IWAE_MAX_IMAGES)",
            ErrorCode.too_many_images,
        )


# --- validation and binarization ------------------------------------------------------------------------
def validate_and_binarize(x: np.ndarray, binarize: Binarize, seed: int) -> np.ndarray:
    """Check finiteness and range, then binarize: returns float32 [N, D] of zeros and ones."""
    # Fast paths for valid input (the common case); the detailed checks below only run to name a problem.
    if binarize is Binarize.none and bool(((x == 0.0) | (x == 1.0)).all()):
        return np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # NaN compares false: it lands here too
        _check_finite_and_range(x)
    if binarize is Binarize.none:
        nonbinary = (x != 0.0) & (x != 1.0)
        i, j = (int(v) for v in np.argwhere(nonbinary)[0])
        raise InvalidInputError(
            f"image {i} has non-binary pixel values (e.g. {x[i, j]:g} at index {j}) but binarize=none: "
            "the model is defined on binary pixels; send 0/1 values or pass binarize=threshold or "
            "binarize=stochastic",
            ErrorCode.not_binary,
        )
    if binarize is Binarize.threshold:
        out = (x > 0.5).astype(np.float32)
    else:
        # A stream of its own, so that binarization never shifts the engine's noise for the same seed.
        rng = np.random.default_rng(seed)
        out = (rng.random(x.shape) < x).astype(np.float32)
    return np.ascontiguousarray(out)


def _check_finite_and_range(x: np.ndarray) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        i = int(np.argwhere(~finite.all(axis=1))[0, 0])
        raise InvalidInputError(f"image {i} contains NaN or infinite values", ErrorCode.not_finite)
    low, high = x < 0.0, x > 1.0
    if low.any() or high.any():
        i = int(np.argwhere((low | high).any(axis=1))[0, 0])
        raise InvalidInputError(
            f"image {i} has values outside [0, 1] (min {x[i].min():g}, max {x[i].max():g}); "
            "scale pixel intensities to [0, 1]",
            ErrorCode.out_of_range,
        )


async def read_images(
    request: Any,
    spec: InputSpec,
    binarize: Binarize,
    seed: int,
    resize: bool,
    max_body_bytes: int,
) -> torch.Tensor:
    """Decode, validate and binarize the request's images: float32 tensor [N, x_dim] on the CPU."""
    kind = media_type(request.headers.get("content-type"))
    if kind in MULTIPART_TYPES:
        x = await _read_multipart(request, spec, resize, max_body_bytes)
    else:
        x = await _read_body(request, kind, spec)
    arr = await _maybe_in_thread(x.size * 8, validate_and_binarize, x, binarize, seed)
    return torch.from_numpy(arr)


async def _read_multipart(request: Any, spec: InputSpec, resize: bool, max_body_bytes: int) -> np.ndarray:
    try:
        form = await request.form(
            max_files=spec.max_images, max_fields=spec.max_images + 16, max_part_size=max_body_bytes
        )
    except HTTPException as e:  # Starlette's multipart parser reports its limits and errors this way
        if "Too many files" in str(e.detail):
            raise PayloadTooLargeError(
                f"too many images: more than {spec.max_images} files in one request (IWAE_MAX_IMAGES)",
                ErrorCode.too_many_images,
            ) from None
        raise BadRequestError(f"invalid multipart body: {e.detail}", ErrorCode.invalid_multipart) from None
    try:
        files: list[tuple[str, bytes]] = []
        for _key, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((value.filename or "upload", await value.read()))
        if not files and not form:
            raise BadRequestError(
                "the multipart body has no complete parts (empty or truncated): upload one or more PNG/JPEG files",
                ErrorCode.invalid_multipart,
            )
        return await _maybe_in_thread(sum(len(d) for _, d in files), decode_files, files, spec, resize)
    finally:
        await form.close()


async def _read_body(request: Any, kind: str, spec: InputSpec) -> np.ndarray:
    body: bytes = await request.body()
    if not body:
        raise BadRequestError(
            'empty body: send images as JSON {"images": [...]}, a multipart upload of PNG/JPEG files, or an .npy array',
            ErrorCode.empty_body,
        )
    if kind in JSON_TYPES:
        return await _maybe_in_thread(len(body), decode_json, body, spec)
    if kind in NPY_TYPES:
        return await _maybe_in_thread(len(body), decode_npy, body, spec)
    raise UnsupportedMediaTypeError(
        f"unsupported content type {kind or 'none'!r}: send application/json, multipart/form-data "
        "(PNG/JPEG files) or application/x-npy"
    )


# Below this many bytes decoding takes well under a millisecond: not worth a thread hop.
_INLINE_BYTES = 256 * 1024


async def _maybe_in_thread(size: int, fn: Any, *args: Any) -> Any:
    if size <= _INLINE_BYTES:
        return fn(*args)
    import anyio.to_thread

    return await anyio.to_thread.run_sync(fn, *args)


def bits_per_dim(loglik: float, x_dim: int) -> float:
    return -loglik / (x_dim * math.log(2.0))
