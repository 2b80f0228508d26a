"""Intrinsic dimension: the Levina-Bickel maximum-likelihood estimator (NeurIPS 2004) with the
MacKay-Ghahramani correction (average the inverse local estimates, then invert), averaged over k = k1..k2.

For a point x with sorted neighbour distances T_1 <= ... <= T_k, the local estimate is
    m_k(x) = [ 1/(k-1) * sum_{j=1}^{k-1} log(T_k / T_j) ]^{-1}
and the dataset estimate for one k is m_k = [ mean_x m_k(x)^{-1} ]^{-1}; the reported value is mean_k m_k.
Pope et al. (ICLR 2021) report MNIST ~ 7-13 and CIFAR-10 ~ 13-26 with this estimator.

`dataset_d_eff` caches results in memory and in a small JSON file in the cache directory, keyed by dataset name
and a fingerprint of exactly the rows the estimate is computed from.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from typing import Any

import numpy as np
import torch

from lawbench.base.files import atomic_write_bytes

from .errors import DatasetError
from .files import cache_dir
from .sampling import make_rng

__all__ = ["intrinsic_dimension", "dataset_d_eff", "D_EFF_CACHE_FILE"]

D_EFF_CACHE_FILE = "d_eff.json"
_MEMO: dict[str, float] = {}
_LOCK = threading.Lock()
_ESTIMATOR_VERSION = "lb-mg-v1"


def _as_2d_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim < 2:
        raise DatasetError(f"intrinsic_dimension: expected an array of shape (N, ...), got shape {a.shape}")
    return a.reshape(a.shape[0], math.prod(a.shape[1:])).astype(np.float64, copy=False)  # (0, ...) too


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(make_rng(seed, 77).choice(n, size=max_points, replace=False))


def _knn_distances(X: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Sorted distances to the k nearest other points, shape (N, k), exact (recomputed after selection)."""
    Xt = torch.from_numpy(np.ascontiguousarray(X))
    sq = (Xt * Xt).sum(1)
    N = Xt.shape[0]
    out = torch.empty(N, k, dtype=torch.float64)
    for s in range(0, N, block):
        e = min(N, s + block)
        d2 = sq[s:e, None] + sq[None, :] - 2.0 * (Xt[s:e] @ Xt.T)
        d2[torch.arange(e - s), torch.arange(s, e)] = float("inf")    # exclude the point itself
        nbr = torch.topk(d2, k, dim=1, largest=False, sorted=True).indices
        # exact distances for the selected neighbours (the Gram trick above loses precision for close points)
        for a in range(s, e, 64):
            b = min(e, a + 64)
            diff = Xt[a:b, None, :] - Xt[nbr[a - s:b - s]]
            out[a:b] = torch.sort(diff.norm(dim=2), dim=1).values
    return out.numpy()


def intrinsic_dimension(x: Any, k1: int = 5, k2: int = 20, max_points: int = 2000, seed: int = 0) -> float:
    """Levina-Bickel MLE of the intrinsic dimension of the rows of x, averaged over k in k1..k2.

    x: array or tensor (N, ...) (flattened per row). At most max_points rows are used (seeded choice).
    Duplicate rows are removed first (they would give zero distances); any remaining zero distance is
    clamped to a tiny positive value. Returns nan when the data are degenerate (e.g. all points equidistant)."""
    def _is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not (_is_int(k1) and _is_int(k2) and 2 <= k1 <= k2):
        raise DatasetError(f"intrinsic_dimension: need integers 2 <= k1 <= k2, got k1={k1!r}, k2={k2!r}")
    if not _is_int(max_points) or max_points < 2:
        raise DatasetError(f"intrinsic_dimension: max_points={max_points!r} must be an integer >= 2")
    k1, k2 = int(k1), int(k2)
    X = _as_2d_float64(x)
    if not np.isfinite(X).all():
        raise DatasetError("intrinsic_dimension: the data contain NaN or infinite values")
    X = X[_subsample(len(X), int(max_points), seed)]
    X = np.unique(X, axis=0)
    if len(X) <= k2:
        raise DatasetError(f"intrinsic_dimension: need more than k2={k2} distinct points, got {len(X)}")
    T = _knn_distances(X, k2)
    positive = T[T > 0]
    tiny = (positive.min() if positive.size else 1.0) * 1e-6
    logT = np.log(np.maximum(T, tiny))                 # (N, k2); column j-1 holds log T_j
    csum = np.cumsum(logT, axis=1)
    estimates = []
    for k in range(k1, k2 + 1):
        # sum_{j<k} log(T_k/T_j) = (k-1) log T_k - sum_{j<k} log T_j
        s = (k - 1) * logT[:, k - 1] - csum[:, k - 2]
        inv_local = s / (k - 1)                        # m_k(x)^{-1}
        mean_inv = float(inv_local.mean())
        if mean_inv > 0 and math.isfinite(mean_inv):
            estimates.append(1.0 / mean_inv)
    if not estimates:
        return float("nan")
    return float(np.mean(estimates))


# ------------------------------------------------------------------------------------------------ caching

def _cache_path():
    return cache_dir() / D_EFF_CACHE_FILE


def _read_disk() -> dict:
    try:
        with open(_cache_path(), "r", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, value: float) -> None:
    try:
        data = _read_disk()
        data[key] = value
        atomic_write_bytes(_cache_path(), json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError:
        pass    # a read-only cache directory only costs a recomputation next time


def dataset_d_eff(name: str, pool: np.ndarray, *, divisor: float = 1.0, k1: int = 5, k2: int = 20,
                  max_points: int = 2000, seed: int = 0) -> float:
    """d_eff of a dataset's training pool (raw array (N, ...); values are divided by `divisor` first).

    Cached in memory and in <cache_dir>/d_eff.json under a key made of the name and a fingerprint of the
    rows actually used, so changed data give a new entry."""
    pool = np.asarray(pool)
    if len(pool) <= k2:
        return float("nan")     # too few points for the estimator (an empty pool included)
    idx = _subsample(len(pool), max_points, seed)
    rows = np.ascontiguousarray(pool[idx])
    h = hashlib.blake2b(digest_size=12)
    h.update(repr((_ESTIMATOR_VERSION, pool.shape, str(rows.dtype), float(divisor), k1, k2, max_points, seed)).encode())
    h.update(rows.tobytes())
    key = f"{name}:{h.hexdigest()}"
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
    disk = _read_disk().get(key)
    if isinstance(disk, (int, float)):
        value = float(disk)
    else:
        if len(np.unique(rows.reshape(len(rows), -1), axis=0)) <= k2:
            return float("nan")     # too few distinct points for the estimator; not worth failing a load over
        value = intrinsic_dimension(rows.astype(np.float64) / divisor, k1=k1, k2=k2, max_points=len(rows), seed=seed)
        _write_disk(key, value)
    with _LOCK:
        _MEMO[key] = value
    return value


def clear_memory_cache() -> None:
    """Forget in-memory d_eff values (the JSON file stays)."""
    with _LOCK:
        _MEMO.clear()
