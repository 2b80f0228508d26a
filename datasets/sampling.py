"""Seeded randomness over the data: independent streams, stratified subsets, flipped labels, and the checks on their
arguments."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import DatasetError

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
