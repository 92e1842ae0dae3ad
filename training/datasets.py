"""The paper's data sets: MNIST (dynamic binarization), Larochelle's binarized MNIST, OMNIGLOT.

Files live under ``data_dir()/<name>/`` (layout, splits and the OMNIGLOT approximation: docs/data.md).
Everything read is checked (IDX magic and dims, MNIST SHA-256, .amat token shape, .mat keys and shapes);
a missing or bad file raises DatasetError naming the file and the command that fixes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training.data_io import (
    PIXELS,
    SIDE,
    Dataset,
    DatasetError,
    as_images,
    cache_dir,
    data_dir,
    fix_hint,
    make_dataset,
    memoized,
    read_bytes,
    sha256,
)
from training.omniglot import (
    CHARDATA,
    CHARDATA_SIZES,
    OMNIGLOT_SETS,
    OMNIGLOT_VALID,
    area_downsample,
    area_matrix,
    holdout_indices,
    load_omniglot,
    npz_pen,
    png_files,
    read_chardata,
)

# The names other modules and the tests use, wherever they are defined.
__all__ = [
    "AMAT_SPLITS",
    "CHARDATA",
    "CHARDATA_SIZES",
    "MNIST_LABELS",
    "MNIST_SHA256",
    "MNIST_TEST",
    "MNIST_TRAIN",
    "NAMES",
    "OMNIGLOT_SETS",
    "OMNIGLOT_VALID",
    "PIXELS",
    "SIDE",
    "Dataset",
    "DatasetError",
    "amat_name",
    "area_downsample",
    "area_matrix",
    "binarize",
    "cache_dir",
    "data_dir",
    "find_mnist_file",
    "fix_hint",
    "holdout_indices",
    "load_dataset",
    "npz_pen",
    "parse_amat",
    "parse_idx",
    "png_files",
    "read_bytes",
    "read_chardata",
    "read_mnist_idx",
    "sha256",
    "subset",
]

NAMES = ("mnist", "binarized-mnist", "omniglot")

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
        return load_omniglot(root / "omniglot")
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

    return memoized(path, f"idx:{expected_sha256}", compute)


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
    x, t = as_images(train_all, 255), as_images(test, 255)
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
    return memoized(path, "amat", lambda: parse_amat(read_bytes(path), path))


def _load_binarized_mnist(folder: Path) -> Dataset:
    splits = []
    for split in AMAT_SPLITS:
        path = folder / amat_name(split)
        if not path.is_file():
            raise DatasetError(f"{path} not found: {fix_hint('binarized-mnist')}")
        splits.append(read_amat(path))
    sizes = "/".join(str(len(s)) for s in splits)
    return make_dataset(
        "binarized-mnist", *splits, binarization="fixed", source=str(folder),
        description=f"MNIST binarized once (Larochelle & Murray), fixed binarization: {sizes} train/valid/test",
    )  # fmt: skip


# ---- OMNIGLOT ----------------------------------------------------------------------------------------
