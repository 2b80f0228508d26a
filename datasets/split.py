"""What a loader returns: the tensors of a train/test split and what is known about the data (DatasetMeta)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


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
