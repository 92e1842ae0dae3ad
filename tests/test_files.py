"""The one atomic-write helper used by checkpoints, the data commands and the data-set cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.files import atomic_write_bytes


def test_atomic_write_creates_folders_and_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
