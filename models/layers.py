"""Building blocks that keep every model walkable by the Lipschitz-bound code.

Every model of the suite is a top-level ``nn.Sequential`` built only from the module types in
:data:`WALKABLE_TYPES`. ``Normalize`` lets a model keep its inputs in [0, 1] pixel space (attacks and eps are always
in pixel units) and ``Residual`` expresses skip connections as ``branch(x) + shortcut(x)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Normalize", "Residual", "WALKABLE_TYPES", "check_structure", "CIFAR10_MEAN", "CIFAR10_STD",
           "MNIST_MEAN", "MNIST_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def _as_floats(values, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"Normalize: {what} must be a number or a sequence of numbers, got {values!r}") from None
    if not out:
        raise ValueError(f"Normalize: {what} is empty")
    return out


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dimension 1), with ``mean`` and ``std`` stored as 1-D buffers of length C.

    A single value broadcasts over every channel. The default (mean 0, std 1) is the identity. For image input
    (N, C, H, W) the buffers broadcast as (1, C, 1, 1); for vector input (N, d) as (1, C) (C == 1 or C == d).
    The layer is affine with Lipschitz constant ``1 / min(std)``.
    """

    def __init__(self, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0):
        super().__init__()
        m = _as_floats(mean, "mean")
        s = _as_floats(std, "std")
        if len(m) != len(s) and 1 not in (len(m), len(s)):
            raise ValueError(f"Normalize: mean has {len(m)} values but std has {len(s)}")
        if len(m) == 1 and len(s) > 1:
            m = m * len(s)
        if len(s) == 1 and len(m) > 1:
            s = s * len(m)
        if any(not (v > 0) for v in s):
            raise ValueError(f"Normalize: std must be positive, got {s}")
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32))

    @property
    def is_identity(self) -> bool:
        return bool(torch.all(self.mean == 0) and torch.all(self.std == 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = self.mean.to(dtype=x.dtype).view(shape)
        std = self.std.to(dtype=x.dtype).view(shape)
        return (x - mean) / std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


class Residual(nn.Module):
    """``forward(x) = branch(x) + shortcut(x)``; ``shortcut`` defaults to ``nn.Identity()``."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"Residual: branch must be an nn.Module, got {type(branch).__name__}")
        if shortcut is None:
            shortcut = nn.Identity()
        if not isinstance(shortcut, nn.Module):
            raise TypeError(f"Residual: shortcut must be an nn.Module, got {type(shortcut).__name__}")
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


#: The module types a model may be built from (see the internal API contract).
WALKABLE_TYPES: tuple[type, ...] = (
    Normalize, nn.Flatten, nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.BatchNorm2d, nn.Identity, nn.Sequential, Residual,
)


def check_structure(model: nn.Module) -> list[str]:
    """Return the dotted paths of modules that break the walkable-structure rule (empty list: the model is walkable).

    The top level must be an ``nn.Sequential``; every module inside must be of an exact type in
    :data:`WALKABLE_TYPES` (subclasses may change ``forward`` and are reported).
    """
    problems: list[str] = []
    if type(model) is not nn.Sequential:
        problems.append(f"<top>: {type(model).__name__} (expected nn.Sequential)")

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if type(child) not in WALKABLE_TYPES:
                problems.append(f"{path}: {type(child).__name__}")
                continue
            walk(child, path)

    walk(model, "")
    return problems

