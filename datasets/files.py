"""Where data lives and how it is fetched: cache and data folders, file identity and checksums, verified downloads
(written atomically, never half a file)."""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Iterable

from lawbench.base.files import atomic_output

from .errors import DatasetError


def cache_dir() -> Path:
    """The user's cache directory for this suite: $XDG_CACHE_HOME/lawbench or ~/.cache/lawbench."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lawbench"


def data_root(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Resolve the data directory: the argument, else $BENCH_DATA, else cache_dir().

    Returns (path, how it was chosen) so error messages can say where they looked and why."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "the data_dir argument"
    env = os.environ.get("BENCH_DATA")
    if env:
        return Path(env).expanduser(), "$BENCH_DATA"
    return cache_dir(), "the default cache dir"


def download_dir(data_dir, name: str) -> Path:
    """<data dir>/<name>/, created for a download; a folder that cannot be made is a DatasetError naming it."""
    root, _ = data_root(data_dir)
    dest_dir = root / name
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"download: cannot create {dest_dir} ({e.strerror or e})") from None
    return dest_dir


def candidate_dirs(root: Path, sub: str) -> list[Path]:
    """Directories searched for a dataset's files: <root>/<sub>/ then <root>/."""
    return [root / sub, root]


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_key(paths: Iterable[Path]) -> tuple:
    """Identity of a set of files for the in-process cache (path, size, mtime)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def fetch_verified(url: str, dest: Path, expected_md5: str, timeout: float) -> None:
    """Stream url to a temp file next to dest, check md5, rename into place; on mismatch delete and raise."""
    h = hashlib.md5(usedforsecurity=False)
    with atomic_output(dest) as out, urllib.request.urlopen(url, timeout=timeout) as resp:
        for chunk in iter(lambda: resp.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
        got = h.hexdigest()
        if got != expected_md5:  # raised inside the block: the partial file is removed, dest never written
            raise DatasetError(f"download: {dest.name} from {url} has md5 {got}, expected {expected_md5}; "
                               f"the file was discarded")
