"""Gradients through what a model hides from them, found at run time: straight-through (BPDA) and smoothed surrogates.

While a :class:`Surrogate` mode is active (a torch function mode, so the model's code is not touched), every torch
operation the forward pass calls is seen before it runs:

* rounding (round, floor, ceil, trunc) keeps its value and passes the gradient through unchanged (the identity,
  Athalye et al.'s BPDA);
* steps and comparisons (sign, heaviside, >, >=, <, <=) keep their value and take the gradient of a sigmoid (tanh
  for sign) whose temperature is a share of the compared quantity's spread; a boolean or integer result is carried
  on through later operations (``.float()``, arithmetic, ``where``, ``&``, ``~``, ``sum``), so an encoding such as a
  thermometer code passes a gradient to the input;
* casts of a float to an integer type (``.to(torch.uint8)``, ``.long()``) and ``detach`` pass the gradient through;
* argmax/argmin selections feed ``one_hot`` and table look-ups a softmax of the scores;
* saturating functions (tanh, sigmoid, clamp, hardtanh, erf) whose derivative vanishes on most of their input keep
  their value and take the derivative of the same function at a temperature that spreads the input over its curve.

``soft=True`` makes the forward values the surrogate's own (a smooth model to attack and transfer from). The mode
records what it replaced (``swapped``), so a row can say what the adaptive stage differentiated through.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

T = torch.Tensor

ROUNDING = {torch.round, T.round, torch.floor, T.floor, torch.ceil, T.ceil, torch.trunc, T.trunc, torch.fix, T.fix}
# step -> the smooth function whose gradient it takes (at a temperature)
STEPS = {torch.sign: torch.tanh, T.sign: torch.tanh, torch.sgn: torch.tanh, T.sgn: torch.tanh,
         torch.heaviside: torch.sigmoid, T.heaviside: torch.sigmoid}
# comparison -> the sign of (a - b) that makes it true
COMPARISONS = {torch.gt: 1, T.gt: 1, T.__gt__: 1, torch.greater: 1, torch.ge: 1, T.ge: 1, T.__ge__: 1,
               torch.greater_equal: 1, torch.lt: -1, T.lt: -1, T.__lt__: -1, torch.less: -1, torch.le: -1,
               T.le: -1, T.__le__: -1, torch.less_equal: -1}
INT_CASTS = {T.long, T.int, T.short, T.byte, T.char}
CASTS = {T.to, T.type}
DETACH = {T.detach}
SELECTIONS = {torch.argmax: 1, T.argmax: 1, torch.argmin: -1, T.argmin: -1}
NOT = {torch.logical_not, T.logical_not, torch.bitwise_not, T.bitwise_not, T.__invert__}
AND = {torch.logical_and, T.logical_and, torch.bitwise_and, T.bitwise_and, T.__and__, T.__rand__}
OR = {torch.logical_or, T.logical_or, torch.bitwise_or, T.bitwise_or, T.__or__, T.__ror__}
WHERE = {torch.where, T.where}
# saturating function -> (its value at a temperature, the share of its input beyond which the derivative vanishes)
SATURATING = {torch.tanh: torch.tanh, T.tanh: torch.tanh, torch.sigmoid: torch.sigmoid, T.sigmoid: torch.sigmoid,
              torch.special.expit: torch.sigmoid, torch.erf: torch.erf, T.erf: torch.erf, F.softsign: F.softsign}
CLAMPS = {torch.clamp, T.clamp, torch.clip, T.clip, F.hardtanh}
# beyond this |input| (at temperature 1) the derivative of tanh, sigmoid and erf is below ~1e-3 of its peak
SATURATED_AT = {torch.tanh: 4.0, torch.sigmoid: 8.0, torch.erf: 2.7, F.softsign: 30.0}
# a function call is smoothed when at least this share of its input is saturated
SATURATED_SHARE = 0.5
# temperatures: a share of the spread of what a comparison compares (or of a selection's scores)
TEMPERATURE = 0.25


def _floatlike(t) -> bool:
    return torch.is_tensor(t) and t.is_floating_point()


def _needs_grad(args, kwargs) -> bool:
    for a in list(args) + list(kwargs.values()):
        if torch.is_tensor(a) and a.requires_grad:
            return True
        if isinstance(a, (list, tuple)) and any(torch.is_tensor(b) and b.requires_grad for b in a):
            return True
    return False


def _spread(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float()
    s = t.std() if t.numel() > 1 else t.abs().mean()
    return torch.nan_to_num(s, nan=1.0).clamp_min(1e-6)


class Surrogate(TorchFunctionMode):
    """The mode (see the module docstring). ``temperature`` scales the comparisons' and selections' surrogates."""

    def __init__(self, soft: bool = False, temperature: float = TEMPERATURE):
        super().__init__()
        self.soft = bool(soft)
        self.temperature = float(temperature)
        self.swapped: Counter = Counter()
        self._carried: dict = {}   # id(bool or int tensor) -> (that tensor, its float carrier with a gradient)
        self._scores: dict = {}    # id(index tensor) -> (that tensor, scores, dim, sign)

    def _live(self, t) -> bool:
        """The surrogate applies to t: it carries a gradient, or the forward values are the surrogate's (soft)."""
        return _floatlike(t) and (self.soft or t.requires_grad)

    # -- the carriers: a value the model computed, and a float with a gradient path that stands for it ----------------

    def _carry(self, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """Remember the float that stands for the non-float ``hard``: its value (or soft's in soft mode), soft's
        gradient."""
        carrier = soft if self.soft else hard.to(soft.dtype) + (soft - soft.detach())
        self._carried[id(hard)] = (hard, carrier)
        return hard

    def _through(self, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """hard's value with soft's gradient (soft's value in soft mode), in hard's dtype where it is a float."""
        dtype = hard.dtype if hard.is_floating_point() else soft.dtype
        if self.soft:
            return soft.to(dtype)
        return hard.detach().to(dtype) + (soft - soft.detach()).to(dtype)

    def _carrier(self, a):
        if torch.is_tensor(a):
            hit = self._carried.get(id(a))
            return hit[1] if hit is not None and hit[0] is a else a
        if isinstance(a, (list, tuple)):
            return type(a)(self._carrier(b) for b in a)
        return a

    def _has_carried(self, args, kwargs) -> bool:
        for a in list(args) + list(kwargs.values()):
            if torch.is_tensor(a) and id(a) in self._carried and self._carried[id(a)][0] is a:
                return True
            if isinstance(a, (list, tuple)) and self._has_carried(a, {}):
                return True
        return False

    # -- the dispatch ------------------------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        carried = self._has_carried(args, kwargs)
        if not carried and not self.soft and not _needs_grad(args, kwargs):
            return func(*args, **kwargs)
        handler = self._handler(func) if not carried else None
        if handler is not None:
            return handler(func, args, kwargs)
        if carried:
            return self._propagate(func, args, kwargs)
        return func(*args, **kwargs)

    def _handler(self, func):
        if func in ROUNDING:
            return self._rounding
        if func in STEPS:
            return self._step
        if func in COMPARISONS:
            return self._comparison
        if func in INT_CASTS or func in CASTS:
            return self._cast
        if func in DETACH:
            return self._detach
        if func in SELECTIONS:
            return self._selection
        if func in SATURATING:
            return self._saturating
        if func in CLAMPS:
            return self._clamp
        return None

    def _rounding(self, func, args, kwargs):
        x = args[0]
        out = func(*args, **kwargs)
        if not self._live(x) or not _floatlike(out):
            return out
        self.swapped[func.__name__] += 1
        return self._through(out, x)

    def _step(self, func, args, kwargs):
        x = args[0]
        out = func(*args, **kwargs)
        if not self._live(x) or not _floatlike(out):
            return out
        smooth = STEPS[func]
        self.swapped[func.__name__] += 1
        return self._through(out, smooth(x / (self.temperature * _spread(x))))

    def _comparison(self, func, args, kwargs):
        out = func(*args, **kwargs)
        a = args[0]
        b = args[1] if len(args) > 1 else kwargs.get("other")
        if not torch.is_tensor(out) or out.dtype != torch.bool:
            return out
        diff = (a - b) * COMPARISONS[func]
        if not self._live(diff):
            return out
        self.swapped[func.__name__.strip("_")] += 1
        return self._carry(out, torch.sigmoid(diff / (self.temperature * _spread(diff))))

    def _cast(self, func, args, kwargs):
        out = func(*args, **kwargs)
        x = args[0]
        if (torch.is_tensor(out) and self._live(x) and not out.is_floating_point()
                and out.dtype != torch.bool and out.shape == x.shape):
            self.swapped[f"cast to {out.dtype}".replace("torch.", "")] += 1
            return self._carry(out, x)
        return out

    def _detach(self, func, args, kwargs):
        x = args[0]
        if not _floatlike(x) or not x.requires_grad:  # (soft or not: detach changes no value)
            return func(*args, **kwargs)
        self.swapped["detach"] += 1
        return x.view_as(x)

    def _selection(self, func, args, kwargs):
        out = func(*args, **kwargs)
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or not self._live(x):
            return out
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        self._scores[id(out)] = (out, x, int(dim), SELECTIONS[func], bool(keep))
        return out

    def _saturating(self, func, args, kwargs):
        x = args[0]
        out = func(*args, **kwargs)
        fn = SATURATING[func]
        if not self._live(x) or x.numel() == 0:
            return out
        share = float((x.detach().abs() > SATURATED_AT[fn]).float().mean())
        if share < SATURATED_SHARE:
            return out
        self.swapped[f"{fn.__name__} (saturated)"] += 1
        # the median input brought to a quarter of the saturation point, where the curve still bends
        scale = (x.detach().abs().median() * 4.0 / SATURATED_AT[fn] * self.temperature / TEMPERATURE).clamp_min(1.0)
        return self._through(out, fn(x / scale))

    def _clamp(self, func, args, kwargs):
        x = args[0]
        out = func(*args, **kwargs)
        if not self._live(x) or x.numel() == 0:
            return out
        flat = (out.detach() != x.detach()).float().mean()  # where the derivative is zero
        if float(flat) < SATURATED_SHARE:
            return out
        self.swapped[f"{getattr(func, '__name__', 'clamp')} (saturated)"] += 1
        return self._through(out, x)

    # -- carried values through the rest of the forward pass ------------------------------------------------------

    def _propagate(self, func, args, kwargs):
        """An operation on a carried (bool or int) value: computed on the real values; its carrier computed on the
        carriers, so the gradient follows."""
        hard = func(*args, **kwargs)
        if not torch.is_tensor(hard):
            return hard
        try:
            soft = self._soft(func, args, kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return hard
        if not _floatlike(soft) or soft.shape != hard.shape:
            return hard
        if hard.is_floating_point():
            return self._through(hard, soft)
        return self._carry(hard, soft)

    def _soft(self, func, args, kwargs):
        if func in WHERE and len(args) == 3:
            c = self._carrier(args[0])
            a, b = self._carrier(args[1]), self._carrier(args[2])
            return c * a + (1 - c) * b
        if func in NOT:
            return 1 - self._carrier(args[0])
        if func in AND:
            return self._carrier(args[0]) * self._carrier(args[1])
        if func in OR:
            a, b = self._carrier(args[0]), self._carrier(args[1])
            return a + b - a * b
        if func in CASTS or func in INT_CASTS:  # a cast of a carried value: its carrier (the caller casts the value)
            return self._carrier(args[0])
        return func(*self._carrier(args), **{k: self._carrier(v) for k, v in kwargs.items()})

    # -- selections: one_hot and look-ups of an argmax ----------------------------------------------------------------

    def one_hot_of(self, idx, num_classes):
        hit = self._scores.get(id(idx))
        if hit is None or hit[0] is not idx:
            return None
        _, scores, dim, sign, keep = hit
        p = torch.softmax(sign * scores / (self.temperature * _spread(scores)), dim)
        p = p.movedim(dim, -1)
        if keep:
            p = p.squeeze(dim)
        return p if p.shape[-1] == num_classes else None


class _OneHot(Surrogate):
    """Surrogate plus one_hot and look-ups of a carried argmax (kept apart: F.one_hot has no float result)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.one_hot and args and id(args[0]) in self._scores:
            out = func(*args, **kwargs)
            p = self.one_hot_of(args[0], out.shape[-1])
            if p is not None:
                self.swapped["one_hot(argmax)"] += 1
                return self._carry(out, p)
            return out
        if func is T.__getitem__ and len(args) == 2 and torch.is_tensor(args[1]) and id(args[1]) in self._scores:
            table, idx = args
            out = func(*args, **kwargs)
            p = self.one_hot_of(idx, table.shape[0]) if torch.is_tensor(table) and table.dim() >= 1 else None
            if p is not None and _floatlike(table):
                self.swapped["lookup(argmax)"] += 1
                return self._through(out, torch.tensordot(p, table, dims=1))
            return out
        return super().__torch_function__(func, types, args, kwargs)


class Through(torch.nn.Module):
    """``model`` seen through the surrogate mode: its own values and surrogate gradients, or (soft) the surrogate's
    values. ``swapped`` accumulates what the mode replaced. A forward that fails under the mode (code that leaves
    torch, e.g. through numpy) runs as it is, without surrogate gradients (``failed`` says why)."""

    def __init__(self, model: torch.nn.Module, soft: bool = False, temperature: float = TEMPERATURE):
        super().__init__()
        self.model = model
        self.soft = soft
        self.temperature = temperature
        self.swapped: Counter = Counter()
        self.failed: str | None = None

    def forward(self, x):
        if self.failed is None:
            mode = _OneHot(self.soft, self.temperature)
            try:
                with mode:
                    out = self.model(x)
                self.swapped.update(mode.swapped)
                return out
            except Exception as exc:  # noqa: BLE001 - the model's own code failed under the mode: run it plainly
                self.failed = f"{type(exc).__name__}: {exc}"
        return self.model(x)


def swapped_ops(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, str | None]:
    """({operation: calls} the mode would replace in one forward of ``model`` on x (with a gradient), the reason the
    mode cannot run there or None)."""
    net = Through(model)
    xr = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        net(xr)
    return dict(net.swapped), net.failed
