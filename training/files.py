"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file beside it and a rename.

    An interrupted write leaves the old file (or none), never a truncated one; the temporary name carries the
    process id, so two processes filling the same cache entry do not write into each other's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
