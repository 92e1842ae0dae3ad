"""The paper's data sets: MNIST (dynamic binarization), Larochelle's binarized MNIST, OMNIGLOT.

Files live under ``data_dir()/<name>/`` (layout, splits and the OMNIGLOT approximation: docs/data.md).
Everything read is checked (IDX magic and dims, MNIST SHA-256, .amat token shape, .mat keys and shapes);
a missing or bad file raises DatasetError naming the file and the command that fixes it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from platformdirs import user_cache_dir

from training.files import atomic_write_bytes

NAMES = ("mnist", "binarized-mnist", "omniglot")
SIDE = 28
PIXELS = SIDE * SIDE

# SHA-256 of the *uncompressed* IDX bytes: every mirror's copy shares them, whatever its gzip settings.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_TRAIN, MNIST_TEST = "train-images-idx3-ubyte", "t10k-images-idx3-ubyte"
MNIST_LABELS = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")
MNIST_VALID = 400  # the paper keeps the last 400 of the 60,000 training images for validation

AMAT_SPLITS = {"train": 50_000, "valid": 10_000, "test": 10_000}

CHARDATA = "chardata.mat"
CHARDATA_SIZES = {"data": 24_345, "testdata": 8_070}
OMNIGLOT_SETS = ("images_background", "images_evaluation")  # -> train (+ valid), test
OMNIGLOT_VALID = 345  # held out of the training set, evenly spaced so every alphabet is represented
_DERIVED_VERSION = "omniglot28-area-v1"  # bump when the downsampling changes, to invalidate caches


class DatasetError(Exception):
    """A data file that is missing, corrupt or not in the expected format."""


@dataclass
class Dataset:
    """Three splits of float32 images [N, 784] in [0, 1], row-major 28 x 28."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    binarization: str  # "dynamic": binarize() at each use; "fixed": already 0/1
    train_mean: torch.Tensor  # [784], pixel mean of the train split (initialises the output bias)
    description: str
    source: str = ""  # the files it came from


def data_dir() -> Path:
    """``$IWAE_DATA_DIR``, else the per-user cache (``user_cache_dir("iwae-serve")/data``)."""
    env = os.environ.get("IWAE_DATA_DIR")
    return Path(env) if env else Path(user_cache_dir("iwae-serve")) / "data"


def cache_dir() -> Path:
    """Where derived arrays (downsampled OMNIGLOT) are cached: ``$IWAE_CACHE_DIR`` or the user cache.

    Kept apart from the data dir, which may be a shared read-only copy.
    """
    env = os.environ.get("IWAE_CACHE_DIR")
    return Path(env) if env else Path(user_cache_dir("iwae-serve")) / "derived"


def fix_hint(name: str) -> str:
    return f"run `iwae data fetch {name}` or `iwae data import {name} DIR`"


def load_dataset(name: str, root: Path | None = None, *, checksums: Mapping[str, str] | None = None) -> Dataset:
    """Load ``name`` from ``root/<name>/`` (default root: ``data_dir()``).

    ``checksums`` replaces the MNIST SHA-256 table (tests with synthetic files); verification always runs.
    """
    root = Path(root) if root is not None else data_dir()
    if name == "mnist":
        return _load_mnist(root / "mnist", MNIST_SHA256 if checksums is None else checksums)
    if name == "binarized-mnist":
        return _load_binarized_mnist(root / "binarized-mnist")
    if name == "omniglot":
        return _load_omniglot(root / "omniglot")
    raise DatasetError(f"unknown data set {name!r}: choose one of {', '.join(NAMES)}")


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarization: each pixel ~ Bernoulli(intensity), freshly sampled at every call."""
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"binarize needs intensities in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]")
    return torch.bernoulli(x, generator=generator)


def subset(ds: Dataset, n_train: int, n_valid: int | None = None, n_test: int | None = None) -> Dataset:
    """The first rows of each split (smoke runs); ``train_mean`` is recomputed on the kept rows."""
    train = ds.train[:n_train]
    valid = ds.valid if n_valid is None else ds.valid[:n_valid]
    test = ds.test if n_test is None else ds.test[:n_test]
    return replace(ds, train=train, valid=valid, test=test, train_mean=train.mean(0))


# ---- shared helpers ----------------------------------------------------------------------------------

_MEMO: dict[tuple[object, ...], Any] = {}
T = TypeVar("T")


def _memoized(path: Path, tag: str, compute: Callable[[], T]) -> T:
    """One parse (and checksum) per file per process; a replaced file has a new size/mtime and is re-read."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, tag)
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def _tensor(a: np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """A float32 [N, 784] copy: memoised arrays must not share memory with tensors callers may edit in place."""
    return torch.from_numpy(np.array(a, np.float32).reshape(-1, PIXELS) / np.float32(scale))


def _make(name: str, train: np.ndarray, valid: np.ndarray, test: np.ndarray, **kw: str) -> Dataset:
    tensors = [_tensor(a) for a in (train, valid, test)]
    return Dataset(name, *tensors, train_mean=tensors[0].mean(0), **kw)  # type: ignore[arg-type]


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot read ({e}): the file is corrupt; delete it and re-fetch") from e


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- MNIST -------------------------------------------------------------------------------------------


def find_mnist_file(folder: Path, stem: str) -> Path | None:
    """The raw IDX file if present, else its .gz."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def parse_idx(raw: bytes, source: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, ndim big-endian uint32 dims, then data."""
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
        magic = raw[:4].hex() or "empty file"
        raise DatasetError(f"{source}: not an IDX file of unsigned bytes (magic {magic}, expected 000008xx)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{source}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(dims)):
        raise DatasetError(f"{source}: IDX dims {dims} need {header + int(np.prod(dims))} bytes, file has {len(raw)}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_mnist_idx(path: Path, expected_sha256: str) -> np.ndarray:
    """Parse an IDX file (raw or .gz) after checking the SHA-256 of its uncompressed bytes."""

    def compute() -> np.ndarray:
        raw = read_bytes(path)
        got = sha256(raw)
        if got != expected_sha256:
            raise DatasetError(
                f"{path}: SHA-256 of the uncompressed data is {got}, expected {expected_sha256}: the file is "
                f"corrupt or not the original MNIST; delete it and {fix_hint('mnist')}"
            )
        return parse_idx(raw, path)

    return _memoized(path, f"idx:{expected_sha256}", compute)


def _mnist_images(folder: Path, stem: str, checksums: Mapping[str, str]) -> np.ndarray:
    path = find_mnist_file(folder, stem)
    if path is None:
        raise DatasetError(f"{folder / stem}.gz not found (nor uncompressed {stem}): {fix_hint('mnist')}")
    if stem not in checksums:
        raise DatasetError(f"no SHA-256 known for {stem}")
    images = read_mnist_idx(path, checksums[stem])
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise DatasetError(f"{path}: expected images N x 28 x 28, got dims {images.shape}")
    return images


def _load_mnist(folder: Path, checksums: Mapping[str, str]) -> Dataset:
    train_all = _mnist_images(folder, MNIST_TRAIN, checksums)
    test = _mnist_images(folder, MNIST_TEST, checksums)
    if len(train_all) <= MNIST_VALID:
        raise DatasetError(f"{folder / MNIST_TRAIN}: {len(train_all)} images, need more than {MNIST_VALID}")
    # Intensities stay grey levels: binarize() samples pixels at each use (dynamic binarization).
    x, t = _tensor(train_all, 255), _tensor(test, 255)
    n = len(x) - MNIST_VALID
    return Dataset(
        "mnist", x[:n], x[n:], t, "dynamic", x[:n].mean(0),
        f"MNIST, grey levels / 255, dynamic binarization: {n} train, last {MNIST_VALID} of the training "
        f"file valid, {len(t)} test",
        source=str(folder),
    )  # fmt: skip


# ---- binarized MNIST (Larochelle & Murray) -----------------------------------------------------------


def amat_name(split: str) -> str:
    return f"binarized_mnist_{split}.amat"


_AMAT_OK = np.zeros(256, bool)
_AMAT_OK[list(b"01 \t\r\n")] = True


def parse_amat(data: bytes, source: str | Path) -> np.ndarray:
    """Text, one image per line: 784 values 0/1 separated by whitespace. Vectorised: 50k lines in < 1 s."""
    buf = np.frombuffer(data, np.uint8)
    bad = np.flatnonzero(~_AMAT_OK[buf])
    if bad.size:
        line = int(np.count_nonzero(buf[: bad[0]] == 10)) + 1
        raise DatasetError(f"{source}: line {line}: unexpected character {chr(buf[bad[0]])!r} (expected 0/1 values)")
    digit = (buf == 48) | (buf == 49)
    if np.any(digit[:-1] & digit[1:]):
        raise DatasetError(f"{source}: a value longer than one character (expected only 0 and 1)")
    ends = np.append(np.flatnonzero(buf == 10), len(buf))
    counts = np.diff(np.concatenate([[0], np.concatenate([[0], np.cumsum(digit)])[ends]]))
    wrong = np.flatnonzero((counts != 0) & (counts != PIXELS))
    if wrong.size:
        raise DatasetError(f"{source}: line {wrong[0] + 1} has {counts[wrong[0]]} values, expected {PIXELS}")
    if not counts.any():
        raise DatasetError(f"{source}: no images")
    return (buf[digit] - 48).reshape(-1, PIXELS)


def read_amat(path: Path) -> np.ndarray:
    return _memoized(path, "amat", lambda: parse_amat(read_bytes(path), path))


def _load_binarized_mnist(folder: Path) -> Dataset:
    splits = []
    for split in AMAT_SPLITS:
        path = folder / amat_name(split)
        if not path.is_file():
            raise DatasetError(f"{path} not found: {fix_hint('binarized-mnist')}")
        splits.append(read_amat(path))
    sizes = "/".join(str(len(s)) for s in splits)
    return _make(
        "binarized-mnist", *splits, binarization="fixed", source=str(folder),
        description=f"MNIST binarized once (Larochelle & Murray), fixed binarization: {sizes} train/valid/test",
    )  # fmt: skip


# ---- OMNIGLOT ----------------------------------------------------------------------------------------


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


def _load_omniglot(folder: Path) -> Dataset:
    mat = folder / CHARDATA
    if mat.is_file():
        train_all, test = _memoized(mat, "chardata", lambda: read_chardata(mat))
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
    return _make(
        "omniglot", train, valid, test, binarization="dynamic", source=source,
        description=f"OMNIGLOT, {what}; dynamic binarization: {len(train)}/{len(valid)}/{len(test)} train/valid/test",
    )  # fmt: skip
