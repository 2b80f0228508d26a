"""What an attack costs, counted the way that holds on any machine: forward and backward passes, in rows (one input
through the model once). A3 (Liu et al., CVPR 2022) reports AutoAttack's cost this way.

    counted = Counted(model)          # wraps any model; both AutoAttack engines run through it
    ... attack(counted, ...) ...
    counted.passes                     # Passes(forward=..., backward=...)

A backward pass is counted when the gradient of an output reaches that forward's input: a hook on a per-forward
alias of the input fires once per backward, however many forwards share the input tensor (EOT) and whether the
gradient comes from ``torch.autograd.grad`` or ``.backward()`` (FAB's untargeted form runs one per class).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Passes:
    forward: int = 0
    backward: int = 0

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(self.forward + other.forward, self.backward + other.backward)

    def __sub__(self, other: "Passes") -> "Passes":
        return Passes(self.forward - other.forward, self.backward - other.backward)

    def per_point(self, n: int) -> dict:
        """{"forward": f / n, "backward": b / n} rounded to 0.01 (n points attacked or evaluated)."""
        n = max(int(n), 1)
        return {k: round(v / n, 2) for k, v in asdict(self).items()}

    def as_dict(self) -> dict:
        return asdict(self)


class Counted(torch.nn.Module):
    """``model`` with its forward and backward passes counted in rows (``self.passes``). Attribute access other than
    forward goes to the wrapped model's class only through ``model``: wrappers that must be recognised
    (attacks.randomized.Randomized) are counted from inside (wrap the inner model)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.passes = Passes()
        self.train(model.training)  # its mode is the model's: a caller's save and restore must not flip the model

    def forward(self, x):
        self.passes.forward += int(x.shape[0])
        if torch.is_grad_enabled() and x.requires_grad:
            x = x.view_as(x)  # an alias of its own: its hook fires once per backward through this forward
            x.register_hook(self._backward)
        return self.model(x)

    def _backward(self, g):
        self.passes.backward += int(g.shape[0])
        return g


def counted(model: torch.nn.Module):
    """(model to attack, its counter): a Randomized model keeps its wrapper outside (attacks recognise it), with the
    count inside; any other model is wrapped whole."""
    from .randomized import Randomized
    if isinstance(model, Randomized):
        inner = Counted(model.model)
        return Randomized(inner, model.eot, model.votes).train(model.training), inner
    c = Counted(model)
    return c, c
