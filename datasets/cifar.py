"""CIFAR-10 from the standard python-pickle release (https://www.cs.toronto.edu/~kriz/cifar.html).

Looks in <data dir>/cifar10/ and <data dir>/ for the extracted folder `cifar-10-batches-py/` (data_batch_1..5,
test_batch), else for the tarball `cifar-10-python.tar.gz`, which is checksum-verified and extracted (members with
absolute paths, `..` components, links or device entries are refused) through a temporary directory renamed into
place. Every batch is verified against CIFAR10_MD5 and unpickled with a restricted unpickler that only admits the
numpy array reconstruction globals, so a malicious pickle cannot run code.
"""
from __future__ import annotations

import gzip
import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
import threading
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import HOW_TO_POINT, DatasetError
from .files import cache_dir, candidate_dirs, data_root, download_dir, fetch_verified, file_key, md5_file

__all__ = ["CIFAR10_MD5", "CIFAR10_TARBALL", "CIFAR10_FOLDER", "CIFAR10_BATCHES", "load_cifar10_arrays",
           "safe_extract", "restricted_load", "download_cifar10"]

CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_TEST = ("test_batch",)
CIFAR10_BATCHES = CIFAR10_TRAIN + CIFAR10_TEST
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# md5 of the official release (looked up at call time, so tests can replace the table).
CIFAR10_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

_CACHE: dict[tuple, tuple] = {}
_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------ restricted pickle

# (module, name) -> module to import it from (numpy >= 2 moved numpy.core to numpy._core)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "numpy.core.multiarray"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("_codecs", "encode"): ("_codecs",),     # how Python 3 protocol-2 pickles spell bytes
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        homes = _ALLOWED_GLOBALS.get((module, name))
        if homes is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        for home in homes:
            try:
                return getattr(importlib.import_module(home), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"global {module}.{name} is not available")


def restricted_load(path: str | os.PathLike):
    """Unpickle a file admitting only numpy array reconstruction; DatasetError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path}: refused or malformed pickle ({e})") from None
    except Exception as e:   # EOFError, ValueError, TypeError, ... from corrupt data
        raise DatasetError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None


def _parse_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict with keys b'data' and b'labels', got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        missing = "b'data'" if data is None else "b'labels'"
        raise DatasetError(f"{path}: key {missing} missing")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {desc}")
    try:
        lab = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: b'labels' is not a list of integers") from None
    if lab.ndim != 1 or len(lab) != len(data):
        raise DatasetError(f"{path}: {lab.size} labels for {len(data)} images")
    if len(lab) and (lab.min() < 0 or lab.max() > 9):
        raise DatasetError(f"{path}: label {int(lab.max() if lab.max() > 9 else lab.min())} out of range 0..9")
    return data.reshape(-1, 3, 32, 32), lab


# ------------------------------------------------------------------------------------------------ tarball

def _check_member(m: tarfile.TarInfo, archive: Path) -> None:
    name = m.name
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise DatasetError(f"{archive}: unsafe member {name!r} (absolute path)")
    if ".." in p.parts or "\\" in name:
        raise DatasetError(f"{archive}: unsafe member {name!r} (path escapes the target)")
    if m.issym() or m.islnk():
        raise DatasetError(f"{archive}: unsafe member {name!r} (link to {m.linkname!r})")
    if not (m.isfile() or m.isdir()):
        raise DatasetError(f"{archive}: unsafe member {name!r} (not a regular file or directory)")


def safe_extract(archive: str | os.PathLike, dest_dir: str | os.PathLike, folder: str = CIFAR10_FOLDER) -> Path:
    """Extract `folder` from a .tar(.gz) into dest_dir/folder, checking every member first; the files are
    written under a temporary directory in dest_dir that is renamed into place. Returns dest_dir/folder."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    target = dest_dir / folder
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{archive}: not a readable tar archive ({e})") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetError(f"{archive}: corrupt or truncated archive ({e})") from None
        for m in members:
            _check_member(m, archive)
        if not any(PurePosixPath(m.name).parts[:1] == (folder,) for m in members):
            raise DatasetError(f"{archive}: no {folder}/ folder inside")
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".extract", dir=str(dest_dir)))
        try:
            root = tmp.resolve()
            for m in members:
                out = (tmp / m.name).resolve()
                if root != out and root not in out.parents:
                    raise DatasetError(f"{archive}: unsafe member {m.name!r} (path escapes the target)")
                if m.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:
                    raise DatasetError(f"{archive}: cannot read member {m.name!r}")
                with src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
            if not target.exists():
                try:
                    os.replace(tmp / folder, target)
                except OSError:
                    if not target.is_dir():     # lost a race with another process: theirs is fine
                        raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DatasetError(f"{archive}: corrupt or truncated archive ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------ loading

def _verify(path: Path, key: str) -> None:
    expected = CIFAR10_MD5.get(key)
    if expected is None:
        raise DatasetError(f"{path}: no checksum known for {key}")
    got = md5_file(path)
    if got != expected:
        raise DatasetError(f"{path}: checksum mismatch (md5 {got}, expected {expected}); "
                           f"the file is corrupt or not the official CIFAR-10 release")


def find_cifar10_folder(data_dir=None) -> Path:
    """The extracted batches folder, extracting a verified tarball when only that is present."""
    root, how = data_root(data_dir)
    dirs = candidate_dirs(root, "cifar10")
    for d in dirs:
        if (d / CIFAR10_FOLDER).is_dir():
            return d / CIFAR10_FOLDER
    for d in dirs:
        tar = d / CIFAR10_TARBALL
        if tar.is_file():
            _verify(tar, CIFAR10_TARBALL)
            try:
                return safe_extract(tar, d)
            except PermissionError:
                alt = cache_dir() / "cifar10"
                if (alt / CIFAR10_FOLDER).is_dir():
                    return alt / CIFAR10_FOLDER
                return safe_extract(tar, alt)
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetError(f"cifar10: neither {CIFAR10_FOLDER}/ nor {CIFAR10_TARBALL} found (looked in {looked}; "
                       f"data dir from {how}); {HOW_TO_POINT}, or fetch it with datasets.download_cifar10(DIR)")


def load_cifar10_arrays(data_dir=None):
    """(train uint8 (50000,3,32,32), train labels int64, test images, test labels, folder); cached in-process."""
    folder = find_cifar10_folder(data_dir)
    paths = [folder / b for b in CIFAR10_BATCHES]
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"cifar10: file {p.name} missing from {folder}; {HOW_TO_POINT}")
    key = file_key(paths)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        for p in paths:
            _verify(p, p.name)
        parts = [_parse_batch(p) for p in paths]
        ntr = len(CIFAR10_TRAIN)
        xtr = np.concatenate([x for x, _ in parts[:ntr]])
        ytr = np.concatenate([y for _, y in parts[:ntr]])
        xte = np.concatenate([x for x, _ in parts[ntr:]])
        yte = np.concatenate([y for _, y in parts[ntr:]])
        hit = (xtr, ytr, xte, yte)
        with _LOCK:
            _CACHE.clear()
            _CACHE[key] = hit
    return (*hit, folder)


def download_cifar10(data_dir=None, url: str = CIFAR10_URL, *, timeout: float = 120.0) -> Path:
    """Fetch the tarball into <data dir>/cifar10/, verify its md5 (temp file + rename), extract it safely.
    Returns the batches folder."""
    dest_dir = download_dir(data_dir, "cifar10")
    tar = dest_dir / CIFAR10_TARBALL
    expected = CIFAR10_MD5[CIFAR10_TARBALL]
    if not (tar.is_file() and md5_file(tar) == expected):
        try:
            fetch_verified(url, tar, expected, timeout)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"download: {CIFAR10_TARBALL} from {url} failed ({getattr(e, 'reason', e)})") from None
    if (dest_dir / CIFAR10_FOLDER).is_dir():
        return dest_dir / CIFAR10_FOLDER
    return safe_extract(tar, dest_dir)
