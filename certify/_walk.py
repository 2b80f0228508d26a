"""Walk a model into a small program of linear operators, activations, max-pools and residual sums.

A bound that ignores what a module really computes is not a bound, so a module is walked only when ``admit`` can
vouch for its forward: its class is a key of ``LAYERS`` (torch's own layers, or ``lawbench.models.layers.Normalize``
/ ``lawbench.models.layers.Residual``, matched by the class object, never by name or attributes) or a subclass that
redefines nothing those classes define (no ``forward``, ``__call__``, helper, copy-path method or property), the
instance shadows no method, and no forward or forward-pre hook is set on it or globally. Anything else raises one
CertifyError line naming the module's path (``model.2.branch.0``) and why. Each linear operator is recorded by its
*linear part* (biases and mean shifts dropped: they do not change a Lipschitz constant) as a float64 callable.
"""
from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import torch.nn.modules.module as torch_module
from torch import nn

from lawbench.models.layers import Normalize, Residual

from ._linalg import conv_padding, maxpool_factor

__all__ = ["CertifyError", "Op", "Act", "MaxPool", "Res", "LAYERS", "supported_layers", "admit", "check_model",
           "walk", "float64_copy"]


class CertifyError(ValueError):
    """A model (or argument) certify refuses; one line naming the module's path in the model and why."""


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
    """Elementwise nonlinearity whose derivative lies in [lo, hi] wherever it exists; ``fn`` is the (monotone)
    module itself, for local bounds."""
    lo: float
    hi: float
    path: str
    type: str
    shape: tuple
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class MaxPool:
    l2: float
    path: str
    type: str
    in_shape: tuple
    out_shape: tuple
    module: nn.Module | None = None


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


# ------------------------------------------------------------------------------------------ refusals

def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _desc(m, base=None) -> str:
    name = type(m).__name__
    return f"{name}, subclass of {base.__name__}" if base is not None and type(m) is not base else name


def refuse(m, path: str, why: str, base=None) -> CertifyError:
    """``certify: model.<path> (<Type>[, subclass of <Base>]) <why>``: one line; <path> is the dotted attribute path
    (``model.1.branch.0``), ``model`` alone for the top module."""
    return CertifyError(f"certify: {'model.' + path if path else 'model'} ({_desc(m, base)}) {why}")


def _out_shape(m: nn.Module, path: str, shape: tuple) -> tuple:
    p = next((t for t in (*m.parameters(), *m.buffers())), None)
    with torch.no_grad():
        y = m(torch.zeros(1, *shape, dtype=_dtype(m), device=None if p is None else p.device))
    if not isinstance(y, torch.Tensor):
        raise refuse(m, path, f"returned {type(y).__name__}, not a tensor")
    return tuple(y.shape[1:])


# a live walk (training through bounds) keeps the weights attached to autograd, in the model's own dtype
_LIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("live_walk", default=False)


def _dtype(m: nn.Module) -> torch.dtype:
    if not _LIVE.get():
        return torch.float64
    return next((t.dtype for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()), torch.float32)


def _weight(m: nn.Module) -> torch.Tensor:
    return m.weight if _LIVE.get() else m.weight.detach()


def _at(m: nn.Module, shape: tuple, value: float) -> torch.Tensor:
    """m at the constant input ``value`` (with autograd in a live walk)."""
    p = next((t for t in (*m.parameters(), *m.buffers())), None)
    v = torch.full((1, *shape), value, dtype=_dtype(m), device=None if p is None else p.device)
    with torch.enable_grad() if _LIVE.get() else torch.no_grad():
        return m(v)[0]


def _diag_vector(m: nn.Module, shape: tuple) -> torch.Tensor:
    """Scale vector of an elementwise-affine layer over the full shape: m(1) - m(0)."""
    return _at(m, shape, 1.0) - _at(m, shape, 0.0)


# ------------------------------------------------------------------------------------------ handlers
# handler(module, in_shape, path, prog) -> out_shape; appends the module's factors to prog.

def _parts(m: nn.Module, base) -> list:
    """(name, submodule) pairs the base class's forward runs: all slots of a Sequential, in order and with
    repeats (named_children would drop a module used twice), or a Residual's branch and shortcut."""
    if base is nn.Sequential:
        return list(m._modules.items())
    if base is Residual:
        return [("branch", m.branch), ("shortcut", m.shortcut)]
    return []


def _sequential(m, shape, path, prog):
    for name, child in _parts(m, nn.Sequential):
        shape = _walk_into(child, shape, _join(path, name), prog)
    return shape


def _residual(m, shape, path, prog):
    branch, shortcut = [], []
    b_out = _walk_into(m.branch, shape, _join(path, "branch"), branch)
    s_out = _walk_into(m.shortcut, shape, _join(path, "shortcut"), shortcut)
    if b_out != s_out:
        raise refuse(m, path, f"adds a branch of shape {b_out} to a shortcut of shape {s_out} (broadcasting is "
                              f"not bounded); refusing to bound it")
    prog.append(Res(branch, shortcut, path, shape, b_out))
    return b_out


def _identity(m, shape, path, prog):
    return shape


def _reshape(m, shape, path, prog):
    out = _out_shape(m, path, shape)
    prog.append(Op("reshape", path, type(m).__name__, shape, out, m))
    return out


def _act(lo: float, hi: float):
    def handler(m, shape, path, prog):
        prog.append(Act(lo, hi, path, type(m).__name__, shape, m))
        return shape
    return handler


def _leaky_relu(m, shape, path, prog):
    a = float(m.negative_slope)
    return _act(min(a, 1.0), max(a, 1.0))(m, shape, path, prog)


def _maxpool(m, shape, path, prog):
    if m.return_indices:
        raise refuse(m, path, "has return_indices=True; refusing to bound it")
    out = _out_shape(m, path, shape)
    prog.append(MaxPool(maxpool_factor(m), path, type(m).__name__, shape, out, m))
    return out


def _need_image(m, shape, path):
    if len(shape) != 3:
        raise refuse(m, path, f"expects (C, H, W) input, got shape {shape}; refusing to bound it")


def _avgpool(m, shape, path, prog):
    _need_image(m, shape, path)
    out = _out_shape(m, path, shape)
    prog.append(Op("pool", path, type(m).__name__, shape, out, m, {"module": m}))
    return out


def _offset(m: nn.Module, shape: tuple) -> torch.Tensor:
    """An affine layer's value at 0 (its bias, broadcast over the output): the part a Lipschitz constant ignores and
    a local bound needs."""
    return _at(m, shape, 0.0)


def _diag(m, shape, path, prog):
    d = _diag_vector(m, shape)
    if tuple(d.shape) != shape:
        raise refuse(m, path, f"maps shape {shape} to {tuple(d.shape)}; refusing to bound it")
    prog.append(Op("diag", path, type(m).__name__, shape, shape, (lambda x, d=d: x * d),
                   {"diag": d, "offset": _offset(m, shape)}))
    return shape


def _batchnorm(m, shape, path, prog):
    if not m.track_running_stats or m.running_var is None:
        raise refuse(m, path, "uses batch statistics without running estimates (not a fixed function); "
                              "refusing to bound it")
    return _diag(m, shape, path, prog)


def _linear(m, shape, path, prog):
    W = _weight(m)
    out = shape[:-1] + (W.shape[0],)
    prog.append(Op("linear", path, type(m).__name__, shape, out, (lambda x, W=W: x @ W.T),
                   {"weight": W, "offset": _offset(m, shape)}))
    return out


def _conv2d(m, shape, path, prog):
    if m.groups != 1:
        raise refuse(m, path, f"has groups={m.groups}; only groups=1 is supported")
    if m.padding_mode != "zeros":
        raise refuse(m, path, f"has padding_mode={m.padding_mode!r}; only 'zeros' is supported")
    _need_image(m, shape, path)
    W = _weight(m)
    pads = conv_padding(m, shape[1:])
    stride, dil = tuple(m.stride), tuple(m.dilation)

    def fn(x, W=W, pads=pads, stride=stride, dil=dil):
        pt, pb, pl, pr = pads
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), W, None, stride=stride, padding=0, dilation=dil)
    out = _out_shape(m, path, shape)
    prog.append(Op("conv", path, type(m).__name__, shape, out, fn,
                   {"weight": W, "pads": pads, "stride": stride, "dilation": dil, "offset": _offset(m, shape)}))
    return out


#: The one table of supported layers: exact class -> handler. The walker, the refusal messages and
#: ``supported_layers()`` all read it; a class is supported only through this table.
LAYERS: dict[type, Callable] = {
    nn.Sequential: _sequential, Residual: _residual, Normalize: _diag,
    nn.Linear: _linear, nn.Conv2d: _conv2d,
    nn.ReLU: _act(0.0, 1.0), nn.LeakyReLU: _leaky_relu, nn.Tanh: _act(0.0, 1.0), nn.Sigmoid: _act(0.0, 0.25),
    nn.MaxPool2d: _maxpool, nn.AvgPool2d: _avgpool, nn.AdaptiveAvgPool2d: _avgpool,
    nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm, nn.BatchNorm3d: _batchnorm,
    nn.Flatten: _reshape, nn.Unflatten: _reshape, nn.Identity: _identity, nn.Dropout: _identity,
}


def _display(cls: type) -> str:
    """'nn.Linear' for torch.nn's classes, 'module.Class' otherwise (two classes named Normalize stay apart)."""
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def supported_layers() -> list[str]:
    """Display names of the supported layer classes, in table order ('nn.Linear', 'lawbench.models.layers.Residual')."""
    return [_display(c) for c in LAYERS]


# ------------------------------------------------------------------------------------------ admission

# Entries every class dict may carry, and methods that cannot change what forward computes on a built module.
_HARMLESS = frozenset({
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__", "__annotate__",
    "__firstlineno__", "__static_attributes__", "__type_params__", "__orig_bases__", "__parameters__",
    "__classcell__", "__slots__", "__abstractmethods__", "_abc_impl",
    "__init__", "extra_repr", "reset_parameters", "__repr__", "__str__",
})


def _overrides(cls: type, base: type) -> list[str]:
    """Names that classes of cls's MRO outside base's MRO define and that base's forward, the call machinery or
    the float64 copy (deepcopy, .to, .eval) could reach: anything base's MRO defines, plus copy hooks and
    properties (a property can hide a parameter the forward reads)."""
    reachable = set().union(*(vars(k) for k in base.__mro__)) | {"__deepcopy__", "__copy__"}
    names = [name for k in cls.__mro__ if k not in base.__mro__ for name, v in vars(k).items()
             if name not in _HARMLESS and (name in reachable or hasattr(type(v), "__set__"))]
    return list(dict.fromkeys(names))


def _shadowed(m: nn.Module) -> list[str]:
    """Instance attributes hiding a method of the class (``m.forward = ...`` replaces what the call runs)."""
    static = [(k, inspect.getattr_static(type(m), k, None)) for k in vars(m)]
    return [k for k, a in static if a is not None and hasattr(type(a), "__get__")]


def _hook(m: nn.Module) -> str:
    """Why a hook disqualifies m ('' if none): a hook may replace the input or output of its forward."""
    g = "torch.nn.modules.module.register_module_forward"
    if torch_module._global_forward_pre_hooks:
        return f"has a global forward-pre hook ({g}_pre_hook)"
    if torch_module._global_forward_hooks:
        return f"has a global forward hook ({g}_hook)"
    if getattr(m, "_forward_pre_hooks", None):
        return "has a forward-pre hook"
    if getattr(m, "_forward_hooks", None):
        return "has a forward hook"
    return ""


def admit(m, path: str = "") -> type:
    """The supported class m is walked as, after checking type, overrides, shadowed methods and hooks;
    CertifyError (naming the path) otherwise."""
    base = next((k for k in type(m).__mro__ if k in LAYERS), None)
    if base is None:
        raise refuse(m, path, f"unsupported layer type {_display(type(m))}; supported: "
                              + ", ".join(supported_layers()))
    names = _overrides(type(m), base)
    if names:
        raise refuse(m, path, f"overrides {', '.join(names)}; refusing to bound it", base)
    names = _shadowed(m)
    if names:
        raise refuse(m, path, f"has {', '.join(names)} replaced on the instance; refusing to bound it", base)
    why = _hook(m)
    if why:
        raise refuse(m, path, f"{why}; refusing to bound it", base)
    return base


def check_model(model: nn.Module, path: str = "") -> None:
    """Admit every module the walk would reach, before anything runs the model; CertifyError on the first refusal."""
    base = admit(model, path)
    for name, child in _parts(model, base):
        check_model(child, _join(path, name))


def walk(module: nn.Module, shape: tuple, path: str = "", live: bool = False) -> list:
    """Program (list of Op / Act / MaxPool / Res) for a float64 eval-mode module acting on inputs of `shape`;
    ``live``: of the module as it is (its dtype, its weights attached to autograd), for training through bounds."""
    prog: list = []
    token = _LIVE.set(live)
    try:
        _walk_into(module, tuple(int(s) for s in shape), path, prog)
    finally:
        _LIVE.reset(token)
    return prog


def _walk_into(m: nn.Module, shape: tuple, path: str, prog: list) -> tuple:
    return LAYERS[admit(m, path)](m, shape, path, prog)
