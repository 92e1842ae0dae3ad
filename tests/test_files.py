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


def test_image_grid_frames_each_image_in_its_cell(tmp_path: Path) -> None:
    import io

    import numpy as np
    import torch
    from PIL import Image

    from training.plots import grid_png, save_image_grid

    images = np.stack([np.full((3, 2), v) for v in (0.2, 0.6, 1.0)])
    with Image.open(io.BytesIO(grid_png(images, cols=2, gap=1, fill=0.0))) as im:
        grid = np.asarray(im)
    assert grid.shape == (2 * 4 + 1, 2 * 3 + 1)  # 2 rows x 2 columns of 3 x 2 cells, 1-pixel gaps around
    assert (grid[1:4, 1:3] == 51).all() and (grid[1:4, 4:6] == 153).all() and (grid[5:8, 1:3] == 255).all()
    assert grid[0].max() == 0 and grid[:, 3].max() == 0 and grid[5:8, 4:6].max() == 0  # gaps, empty cell: fill
    out = tmp_path / "figs" / "samples.png"
    save_image_grid(torch.rand(10, 784), out)
    with Image.open(out) as im:
        assert im.size == (8 * 30 + 2, 2 * 30 + 2) and im.mode == "L"


def test_service_and_training_grids_share_one_layout() -> None:
    """The service's PNG samples and the training figures are tiled by the same function (models.grid)."""
    import io

    import numpy as np
    from PIL import Image

    from service.routes.sample import grid_png as service_grid
    from training.plots import grid_png as training_grid

    images = np.random.default_rng(0).random((5, 4, 3))
    with (
        Image.open(io.BytesIO(service_grid(images))) as a,
        Image.open(io.BytesIO(training_grid(images, 3, fill=0.5))) as b,
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert a.size == (3 * 5 + 2, 2 * 6 + 2)  # near-square: 3 columns, 2 rows of 4 x 3 images
