"""OMNIGLOT: the paper's chardata.mat, or an approximation from the original 105 x 105 images (docs/data.md)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import zlib
from pathlib import Path

import numpy as np

from training.data_io import (
    PIXELS,
    SIDE,
    Dataset,
    DatasetError,
    cache_dir,
    fix_hint,
    make_dataset,
    memoized,
)
from training.files import atomic_write_bytes

CHARDATA = "chardata.mat"
CHARDATA_SIZES = {"data": 24_345, "testdata": 8_070}
OMNIGLOT_SETS = ("images_background", "images_evaluation")  # -> train (+ valid), test
OMNIGLOT_VALID = 345  # held out of the training set, evenly spaced so every alphabet is represented
_DERIVED_VERSION = "omniglot28-area-v1"  # bump when the downsampling changes, to invalidate caches


def read_chardata(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The paper's chardata.mat: ``data``/``testdata`` 784 x N, each column a column-major 28 x 28 image."""
    import scipy.io  # deferred: only OMNIGLOT needs it

    try:
        mat = scipy.io.loadmat(path, variable_names=["data", "testdata"])
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DatasetError(f"{path}: not a readable MATLAB file ({e}): {fix_hint('omniglot')}") from e
    out = []
    for key in ("data", "testdata"):
        cols = mat.get(key)
        if cols is None or cols.ndim != 2 or cols.shape[0] != PIXELS:
            shape = None if cols is None else cols.shape
            raise DatasetError(f"{path}: expected key {key!r} of shape 784 x N, got {shape}")
        # Column c holds the image in Fortran order: reshape it back to 28 x 28, then store row-major.
        images = np.asarray(cols, np.float32).T.reshape(-1, SIDE, SIDE).transpose(0, 2, 1)
        if not np.all(np.isfinite(images)) or images.min(initial=0) < 0 or images.max(initial=0) > 1:
            raise DatasetError(f"{path}: {key!r} has values outside [0, 1]")
        out.append(np.ascontiguousarray(images).reshape(-1, PIXELS))
    return out[0], out[1]


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of exact area averaging: output pixel i covers input [i s, (i+1) s), s = n_in/n_out."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return overlap / (n_in / n_out)


def area_downsample(images: np.ndarray, size: int = SIDE, chunk: int = 2048) -> np.ndarray:
    """[N, n, n] -> [N, size, size] float32 by area averaging (a box filter with fractional pixel overlap)."""
    a = area_matrix(images.shape[-1], size).astype(np.float32)
    b = area_matrix(images.shape[-2], size).astype(np.float32)
    out = np.empty((len(images), size, size), np.float32)
    for s in range(0, len(images), chunk):
        out[s : s + chunk] = b @ images[s : s + chunk].astype(np.float32) @ a.T
    return np.clip(out, 0, 1, out=out)  # rounding can leave 1 + 1e-7


def npz_pen(path: Path) -> np.ndarray:
    """images_*.npz: bool [..., 105, 105], True = background paper, so pen strokes are ~images."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
    except (OSError, ValueError, KeyError, zlib.error) as e:
        raise DatasetError(f"{path}: not a readable .npz with an 'images' array ({e}): {fix_hint('omniglot')}") from e
    if images.dtype != bool or images.ndim < 3 or images.shape[-1] != images.shape[-2]:
        raise DatasetError(f"{path}: expected bool images [..., H, H], got {images.dtype} {images.shape}")
    return ~images.reshape(-1, *images.shape[-2:])


def png_files(folder: Path) -> list[Path]:
    """The original layout, ALPHABET/CHARACTER/*.png, in sorted order."""
    return sorted(folder.glob("*/*/*.png"))


def _png_pen(folder: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = png_files(folder)
    if not files:
        raise DatasetError(f"{folder}: no ALPHABET/CHARACTER/*.png files: {fix_hint('omniglot')}")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("L"), np.float32))
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"{f}: not a readable image ({e})") from e
        if images[-1].shape != images[0].shape:
            raise DatasetError(f"{f}: size {images[-1].shape} differs from {files[0]}'s {images[0].shape}")
    return 1 - np.stack(images) / 255  # white paper, black ink -> pen = 1


def _source_key(path: Path) -> str:
    files = [path] if path.is_file() else png_files(path)
    parts = [_DERIVED_VERSION, str(path.resolve())]
    parts += [f"{f.relative_to(path) if f != path else ''}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _downsampled(path: Path) -> np.ndarray:
    """28 x 28 grey-level OMNIGLOT from an .npz or PNG folder, cached on disk by source path, size and mtime."""
    cached = cache_dir() / f"omniglot-{path.name.removesuffix('.npz')}-{_source_key(path)}.npy"
    if cached.is_file():
        try:
            return np.load(cached, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a half-written or damaged cache entry: recompute it
    pen = npz_pen(path) if path.suffix == ".npz" else _png_pen(path)
    small = area_downsample(pen).reshape(-1, PIXELS)
    buf = io.BytesIO()
    np.save(buf, small)
    with contextlib.suppress(OSError):  # caching is an optimisation; a read-only cache dir only costs time
        atomic_write_bytes(cached, buf.getvalue())
    return small


def _omniglot_originals(folder: Path) -> tuple[list[Path], str]:
    npz = [folder / f"{s}.npz" for s in OMNIGLOT_SETS]
    dirs = [folder / s for s in OMNIGLOT_SETS]
    if all(p.is_file() for p in npz):
        return npz, "npz"
    if all(d.is_dir() for d in dirs):
        return dirs, "png"
    if any(p.is_file() for p in npz):
        missing = next(p for p in npz if not p.is_file())
        raise DatasetError(f"{missing} not found (its pair is present): {fix_hint('omniglot')}")
    raise DatasetError(
        f"{folder / CHARDATA} not found (nor the approximation's images_background.npz + images_evaluation.npz "
        f"or PNG folders images_background/ + images_evaluation/): {fix_hint('omniglot')}"
    )


def holdout_indices(n: int, n_valid: int) -> np.ndarray:
    """Evenly spaced indices: the files are ordered by alphabet, so a tail would be one or two alphabets."""
    if n <= n_valid:
        raise DatasetError(f"{n} training images, need more than the {n_valid} held out for validation")
    return np.unique(np.round(np.linspace(0, n - 1, n_valid)).astype(np.int64))


def _split_valid(train_all: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    held = np.zeros(len(train_all), bool)
    held[holdout_indices(len(train_all), OMNIGLOT_VALID)] = True
    return train_all[~held], train_all[held]


def load_omniglot(folder: Path) -> Dataset:
    mat = folder / CHARDATA
    if mat.is_file():
        train_all, test = memoized(mat, "chardata", lambda: read_chardata(mat))
        what = "the paper's chardata.mat"
        source = str(mat)
    else:
        paths, kind = _omniglot_originals(folder)
        train_all, test = (_downsampled(p) for p in paths)
        what = (
            f"APPROXIMATION from the original 105x105 images ({kind}), inverted and area-downsampled to 28x28; "
            "background -> train/valid, evaluation -> test; not comparable with the paper's numbers"
        )
        source = ", ".join(str(p) for p in paths)
    train, valid = _split_valid(train_all)
    return make_dataset(
        "omniglot", train, valid, test, binarization="dynamic", source=source,
        description=f"OMNIGLOT, {what}; dynamic binarization: {len(train)}/{len(valid)}/{len(test)} train/valid/test",
    )  # fmt: skip
