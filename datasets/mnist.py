"""Full MNIST from the four standard IDX files, and an optional checksum-verified download.

Files (each optionally .gz): train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte, looked for in <data dir>/mnist/ and <data dir>/, where the data dir is the `data_dir`
argument, else $BENCH_DATA, else the user's cache dir ($XDG_CACHE_HOME or ~/.cache, subfolder lawbench).

Local files are checked against the official release's md5 (of the .gz file, or of its idx content): all four match
-> data source "official"; otherwise they still load (a malformed file is refused), as "unverified local files".
"""
from __future__ import annotations

import gzip
import hashlib
import threading
import urllib.error
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import HOW_TO_POINT, DatasetError
from .files import candidate_dirs, data_root, download_dir, fetch_verified, file_key, md5_file
from .idx import read_idx

__all__ = ["MNIST_FILES", "MNIST_MD5", "MNIST_RAW_MD5", "MNIST_MIRRORS", "OFFICIAL", "UNVERIFIED", "unofficial_files",
           "find_mnist_files", "load_mnist_arrays", "download_mnist"]

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# md5 of the official .gz files (looked up at call time, so tests can replace the table).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# md5 of the official files' content (the idx bytes inside each .gz): verifies uncompressed files, and .gz files
# compressed anew.
MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# What a row's data_source says of local MNIST files: all four match the official checksums, or not.
OFFICIAL = "official"
UNVERIFIED = "unverified local files"

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)

_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
_VERIFIED: dict[tuple, tuple[str, str]] = {}  # (files, checksum tables) -> (data source, note)
_LOCK = threading.Lock()


def find_mnist_files(data_dir=None) -> tuple[list[Path], Path]:
    """Locate the four files; returns (paths in MNIST_FILES order, the directory they were found in)."""
    root, how = data_root(data_dir)
    dirs = candidate_dirs(root, "mnist")
    for d in dirs:
        found = []
        for name in MNIST_FILES:
            for cand in (d / name, d / (name + ".gz")):
                if cand.is_file():
                    found.append(cand)
                    break
        if len(found) == len(MNIST_FILES):
            return found, d
    # say which file is missing from the most complete directory
    best = max(dirs, key=lambda d: sum((d / n).is_file() or (d / (n + ".gz")).is_file() for n in MNIST_FILES))
    missing = next(n for n in MNIST_FILES if not ((best / n).is_file() or (best / (n + ".gz")).is_file()))
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetError(f"mnist: file {missing}[.gz] not found (looked in {looked}; data dir from {how}); "
                       f"{HOW_TO_POINT}, or fetch it with datasets.download_mnist(DIR)")


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lab_path: Path) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{img_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{lab_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise DatasetError(f"{img_path}: holds 0 images (the header declares an empty set)")
    if len(labels) != len(images):
        raise DatasetError(f"{lab_path}: {len(labels)} labels but {img_path.name} has {len(images)} images")
    if len(labels) and labels.max() > 9:
        raise DatasetError(f"{lab_path}: label {int(labels.max())} out of range 0..9")


def _content_md5(path: Path) -> str:
    if not path.name.endswith(".gz"):
        return md5_file(path)
    h = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error):
        return ""
    return h.hexdigest()


def unofficial_files(paths: Sequence[Path]) -> list[Path]:
    """The files among `paths` that are not the official release: neither the .gz file's md5 (MNIST_MD5) nor the md5
    of its idx content (MNIST_RAW_MD5) matches. Tables are looked up at call time."""
    out = []
    for path in paths:
        if path.name.endswith(".gz") and md5_file(path) == MNIST_MD5.get(path.name):
            continue
        base = path.name[:-3] if path.name.endswith(".gz") else path.name
        if _content_md5(path) != MNIST_RAW_MD5.get(base):
            out.append(path)
    return out


def load_mnist_arrays(data_dir=None, *, with_source: bool = False):
    """(train images uint8 (N,28,28), train labels int64, test images, test labels, directory); cached in-process.

    with_source: also return what the checksums say, OFFICIAL or UNVERIFIED, and a note naming the first file that
    is not the official one ("" when all are)."""
    paths, where = find_mnist_files(data_dir)
    key = file_key(paths)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        arrs = [read_idx(p) for p in paths]
        _check_pair(arrs[0], arrs[1], paths[0], paths[1])
        _check_pair(arrs[2], arrs[3], paths[2], paths[3])
        hit = (arrs[0], arrs[1].astype(np.int64), arrs[2], arrs[3].astype(np.int64))
        with _LOCK:
            _CACHE.clear()      # keep at most one copy of MNIST in memory
            _CACHE[key] = hit
    if not with_source:
        return (*hit, where)
    tables = (key, tuple(sorted(MNIST_MD5.items())), tuple(sorted(MNIST_RAW_MD5.items())))
    with _LOCK:
        verdict = _VERIFIED.get(tables)
    if verdict is None:
        other = unofficial_files(paths)
        verdict = (UNVERIFIED, f"{other[0].name} does not match the official MNIST checksum") if other else \
            (OFFICIAL, "")
        with _LOCK:
            _VERIFIED.clear()
            _VERIFIED[tables] = verdict
    return (*hit, where, *verdict)


# ------------------------------------------------------------------------------------------------ download

def download_mnist(data_dir=None, mirror: str | Sequence[str] | None = None, *, force: bool = False,
                   timeout: float = 60.0) -> Path:
    """Fetch the four MNIST .gz files into <data dir>/mnist/ and verify each against MNIST_MD5.

    mirror: a base URL (http(s):// or file://) or a list tried in order; default MNIST_MIRRORS.
    Files already present with the right checksum are kept unless force=True. Returns the directory."""
    dest_dir = download_dir(data_dir, "mnist")
    mirrors = [mirror] if isinstance(mirror, str) else list(mirror or MNIST_MIRRORS)
    if not mirrors:
        raise DatasetError("download: no mirror given")
    table = MNIST_MD5
    for name in MNIST_FILES:
        fname = name + ".gz"
        expected = table.get(fname)
        if not expected:
            raise DatasetError(f"download: no checksum known for {fname}")
        dest = dest_dir / fname
        if dest.is_file() and not force and md5_file(dest) == expected:
            continue
        errors = []
        for base in mirrors:
            url = base if base.endswith("/") else base + "/"
            url += fname
            try:
                fetch_verified(url, dest, expected, timeout)
                break
            except DatasetError as e:
                errors.append(str(e))
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
                errors.append(f"download: {fname} from {url} failed ({reason})")
        else:
            raise DatasetError(errors[-1] if len(errors) == 1 else "; ".join(errors))
    return dest_dir
