"""Walk a model into a small program of linear operators, activations, max-pools and residual sums.

The walk needs no import of the models package: ``Normalize`` and ``Residual`` are recognised by duck typing (class
name, or the attributes ``mean``/``std`` resp. ``branch``/``shortcut``). Each linear operator is recorded by its
*linear part* (biases and mean shifts dropped: they do not change a Lipschitz constant) as a float64 callable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._linalg import conv_padding, maxpool_factor

__all__ = ["CertifyError", "Op", "Act", "MaxPool", "Res", "walk", "float64_copy"]


class CertifyError(ValueError):
    """A model (or argument) certify cannot handle; one line naming the module type and where it sits."""


@dataclass
class Op:
    """A linear operator (linear part of an affine layer): in_shape -> out_shape (shapes without batch)."""
    kind: str                       # "diag" | "identity" | "reshape" | "linear" | "conv" | "pool"
    path: str
    type: str
    in_shape: tuple
    out_shape: tuple
    fn: Callable[[torch.Tensor], torch.Tensor]
    data: dict = field(default_factory=dict)

    @property
    def in_dim(self) -> int:
        return _numel(self.in_shape)

    @property
    def out_dim(self) -> int:
        return _numel(self.out_shape)

    @property
    def flops(self) -> float:
        if self.kind == "conv":
            w = self.data["weight"]
            return float(w.numel()) * _numel(self.out_shape[1:])
        if self.kind == "linear":
            return float(self.data["weight"].numel()) * max(1, self.in_dim // self.data["weight"].shape[1])
        return float(self.in_dim + self.out_dim)


@dataclass
class Act:
    """Elementwise nonlinearity whose derivative lies in [lo, hi] wherever it exists."""
    lo: float
    hi: float
    path: str
    type: str
    shape: tuple


@dataclass
class MaxPool:
    l2: float
    path: str
    type: str
    in_shape: tuple
    out_shape: tuple


@dataclass
class Res:
    branch: list
    shortcut: list
    path: str
    in_shape: tuple
    out_shape: tuple


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def float64_copy(model: nn.Module, device=None) -> nn.Module:
    """A float64 eval-mode deep copy (the caller's model is left untouched)."""
    import copy
    m = copy.deepcopy(model)
    m = m.to(device=device if device is not None else "cpu", dtype=torch.float64)
    m.eval()
    return m


def _is_normalize(m: nn.Module) -> bool:
    if type(m).__name__ == "Normalize":
        return True
    return (isinstance(getattr(m, "mean", None), torch.Tensor) and isinstance(getattr(m, "std", None), torch.Tensor)
            and not any(True for _ in m.parameters()) and not any(True for _ in m.children()))


def _is_residual(m: nn.Module) -> bool:
    return isinstance(getattr(m, "branch", None), nn.Module) and isinstance(getattr(m, "shortcut", None), nn.Module)


def _unsupported(m: nn.Module, path: str, why: str = "") -> CertifyError:
    where = path or "<top>"
    extra = f" ({why})" if why else ""
    return CertifyError(f"{type(m).__name__} at '{where}' is unsupported for certification{extra}")


def _out_shape(m: nn.Module, shape: tuple) -> tuple:
    with torch.no_grad():
        y = m(torch.zeros(1, *shape, dtype=torch.float64))
    if not isinstance(y, torch.Tensor):
        raise CertifyError(f"{type(m).__name__} returned {type(y).__name__}, not a tensor")
    return tuple(y.shape[1:])


def _diag_vector(m: nn.Module, shape: tuple) -> torch.Tensor:
    """Scale vector of an elementwise-affine layer over the full shape: m(1) - m(0)."""
    with torch.no_grad():
        one = m(torch.ones(1, *shape, dtype=torch.float64))
        zero = m(torch.zeros(1, *shape, dtype=torch.float64))
    return (one - zero)[0]


def walk(module: nn.Module, shape: tuple, path: str = "") -> list:
    """Program (list of Op / Act / MaxPool / Res) for a float64 eval-mode module acting on inputs of `shape`."""
    prog: list = []
    _walk_into(module, tuple(int(s) for s in shape), path, prog)
    return prog


def _walk_into(m: nn.Module, shape: tuple, path: str, prog: list) -> tuple:
    name = type(m).__name__
    if isinstance(m, nn.Sequential):
        for child_name, child in m.named_children():
            shape = _walk_into(child, shape, f"{path}.{child_name}" if path else child_name, prog)
        return shape
    if _is_residual(m):
        branch = walk(m.branch, shape, f"{path}.branch" if path else "branch")
        shortcut = walk(m.shortcut, shape, f"{path}.shortcut" if path else "shortcut")
        out = _out_shape(m, shape)
        prog.append(Res(branch, shortcut, path, shape, out))
        return out
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return shape
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        out = _out_shape(m, shape)
        prog.append(Op("reshape", path, name, shape, out, m))
        return out
    if isinstance(m, nn.ReLU):
        prog.append(Act(0.0, 1.0, path, name, shape))
        return shape
    if isinstance(m, nn.LeakyReLU):
        a = float(m.negative_slope)
        prog.append(Act(min(a, 1.0), max(a, 1.0), path, name, shape))
        return shape
    if isinstance(m, nn.Tanh):
        prog.append(Act(0.0, 1.0, path, name, shape))
        return shape
    if isinstance(m, nn.Sigmoid):
        prog.append(Act(0.0, 0.25, path, name, shape))
        return shape
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise _unsupported(m, path, "return_indices=True")
        out = _out_shape(m, shape)
        prog.append(MaxPool(maxpool_factor(m), path, name, shape, out))
        return out
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        if len(shape) != 3:
            raise _unsupported(m, path, f"expects (C, H, W) input, got shape {shape}")
        out = _out_shape(m, shape)
        prog.append(Op("pool", path, name, shape, out, m, {"module": m}))
        return out
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if not m.track_running_stats or m.running_var is None:
            raise _unsupported(m, path, "batch statistics without running estimates are not a fixed function")
        d = _diag_vector(m, shape)
        prog.append(Op("diag", path, name, shape, shape, (lambda x, d=d: x * d), {"diag": d}))
        return shape
    if _is_normalize(m):
        d = _diag_vector(m, shape)
        if _out_shape(m, shape) != shape:
            raise _unsupported(m, path, "output shape differs from input shape")
        prog.append(Op("diag", path, name, shape, shape, (lambda x, d=d: x * d), {"diag": d}))
        return shape
    if isinstance(m, nn.Linear):
        W = m.weight.detach()
        out = shape[:-1] + (W.shape[0],)
        prog.append(Op("linear", path, name, shape, out, (lambda x, W=W: x @ W.T), {"weight": W}))
        return out
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise _unsupported(m, path, f"groups={m.groups}; only groups=1 is supported")
        if m.padding_mode != "zeros":
            raise _unsupported(m, path, f"padding_mode={m.padding_mode!r}; only 'zeros' is supported")
        if len(shape) != 3:
            raise _unsupported(m, path, f"expects (C, H, W) input, got shape {shape}")
        W = m.weight.detach()
        pads = conv_padding(m, shape[1:])
        stride, dil = tuple(m.stride), tuple(m.dilation)

        def fn(x, W=W, pads=pads, stride=stride, dil=dil):
            pt, pb, pl, pr = pads
            return F.conv2d(F.pad(x, (pl, pr, pt, pb)), W, None, stride=stride, padding=0, dilation=dil)
        out = _out_shape(m, shape)
        prog.append(Op("conv", path, name, shape, out, fn,
                       {"weight": W, "pads": pads, "stride": stride, "dilation": dil}))
        return out
    raise _unsupported(m, path)
