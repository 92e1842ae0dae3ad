"""What every data-set reader shares: the Dataset record, DatasetError, where files live, memoised parsing,
byte reading and checksums."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from platformdirs import user_cache_dir

SIDE = 28
PIXELS = SIDE * SIDE


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


# ---- reading files -----------------------------------------------------------------------------------

_MEMO: dict[tuple[object, ...], Any] = {}
T = TypeVar("T")


def memoized(path: Path, tag: str, compute: Callable[[], T]) -> T:
    """One parse (and checksum) per file per process; a replaced file has a new size/mtime and is re-read."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, tag)
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def as_images(a: np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """A float32 [N, 784] copy: memoised arrays must not share memory with tensors callers may edit in place."""
    return torch.from_numpy(np.array(a, np.float32).reshape(-1, PIXELS) / np.float32(scale))


def make_dataset(name: str, train: np.ndarray, valid: np.ndarray, test: np.ndarray, **kw: str) -> Dataset:
    tensors = [as_images(a) for a in (train, valid, test)]
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
