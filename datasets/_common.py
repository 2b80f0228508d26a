"""Shared pieces of the datasets package: error type, result types, paths, hashing, seeded randomness,
stratified subsetting and label noise.

Only numpy, torch and the standard library are used here.
"""
from __future__ import annotations

import hashlib
import math
import os
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from lawbench.base.files import atomic_output

__all__ = [
    "DatasetError",
    "DatasetMeta",
    "Split",
    "cache_dir",
    "data_root",
    "md5_file",
    "make_rng",
    "stratified_indices",
    "inject_label_noise",
]

HOW_TO_POINT = "point at the data with --data-dir DIR or the BENCH_DATA environment variable"


class DatasetError(ValueError):
    """A dataset could not be loaded. The message is one line naming the file, key or value at fault."""


@dataclass
class DatasetMeta:
    """What a loaded split is. `d` is the ambient input dimension, `d_eff` the Levina-Bickel MLE of the
    intrinsic dimension of the dataset's full training pool (not of the subset)."""

    name: str
    d: int
    num_classes: int
    in_shape: tuple
    source: str
    d_eff: float
    n_train: int
    n_test: int
    label_noise: float
    n_noisy: int
    seed: int = 0
    scale: float | None = None          # gauss only: x_pix = 0.5 + scale * x
    options: dict = field(default_factory=dict)
    # where the data come from, as verified: "embedded" (shipped inside a package: mnist5k, digits), "synthetic"
    # (gauss), "official" (files whose checksums match the official release), "unverified local files"
    data_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["in_shape"] = list(self.in_shape)
        return out


@dataclass
class Split:
    """Float32 inputs in [0,1] ((N,C,H,W) images or (N,d) vectors) and int64 labels.

    y_train carries the injected label noise, y_train_clean the original labels; y_test is always clean."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    y_train_clean: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    meta: DatasetMeta

    @property
    def noisy_mask(self) -> torch.Tensor:
        """Bool (n_train,): True where the training label was flipped."""
        return self.y_train != self.y_train_clean


# ----------------------------------------------------------------------------------------------- paths

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


# --------------------------------------------------------------------------------------------- hashing / io

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


# --------------------------------------------------------------------------------------------- randomness

# Independent random streams derived from the one seed, so e.g. the test split does not move when n_train changes.
STREAM_SPLIT, STREAM_TRAIN, STREAM_TEST, STREAM_NOISE, STREAM_GEN_TRAIN, STREAM_GEN_TEST = 1, 2, 3, 4, 5, 6


def make_rng(seed: int, *stream: int) -> np.random.Generator:
    """A local numpy Generator for (seed, stream...); never touches global random state."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(s) for s in stream]]))


def check_int(name: str, value: Any, *, lo: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise DatasetError(f"{what}{name}={value!r} is not an integer")
    value = int(value)
    if lo is not None and value < lo:
        raise DatasetError(f"{what}{name}={value} must be >= {lo}")
    return value


def check_label_noise(value: Any) -> float:
    try:
        eta = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"label_noise={value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(eta) or eta < 0.0 or eta >= 1.0:
        raise DatasetError(f"label_noise={value!r} must be a fraction in [0, 1)")
    return eta


# --------------------------------------------------------------------------------------------- subsetting

def stratified_indices(y: np.ndarray, n: int, rng: np.random.Generator, *, shuffle: bool = True) -> np.ndarray:
    """Pick n indices of y with class proportions as in y (largest-remainder rounding, seeded tie-breaks).

    Returns the indices in a seeded random order (or sorted when shuffle=False)."""
    y = np.asarray(y)
    N = len(y)
    if n > N:
        raise DatasetError(f"cannot take {n} points from {N}")
    if n == N:
        idx = np.arange(N)
        return rng.permutation(idx) if shuffle else idx
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = n * counts / N
    base = np.floor(quota).astype(np.int64)
    rest = int(n - base.sum())
    if rest > 0:
        frac = quota - base
        tie = rng.random(len(classes))
        order = np.lexsort((tie, -frac))       # largest fractional part first, random among ties
        base[order[:rest]] += 1
    chosen = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        take = int(min(base[c], len(members)))
        if take:
            chosen.append(rng.permutation(members)[:take])
    idx = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return rng.permutation(idx) if shuffle else np.sort(idx)


def inject_label_noise(y: np.ndarray, eta: float, num_classes: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Replace round(eta*n) labels, chosen with rng, by a uniformly random DIFFERENT class.

    Returns (noisy labels, bool mask of the flipped points)."""
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    n_noisy = int(math.floor(eta * n + 0.5))
    mask = np.zeros(n, dtype=bool)
    out = y.copy()
    if n_noisy == 0:
        return out, mask
    if num_classes < 2:
        raise DatasetError(f"label_noise={eta} needs at least 2 classes, the data has {num_classes}")
    idx = rng.choice(n, size=n_noisy, replace=False)
    shift = rng.integers(1, num_classes, size=n_noisy)    # 1..C-1, never 0: always a different class
    out[idx] = (y[idx] + shift) % num_classes
    mask[idx] = True
    return out, mask


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
