"""Our PGD's ascent loop (the sign or normalised gradient step with a fixed schedule): adversarial training, the eps
sweep (sequential and joint schedules) and the stacked multi-model path all move their rows with :func:`ascend`.
AutoAttack's attacks on our engine (APGD's momentum and checkpoints, FAB's projections, Square's random search) have
update rules of their own; every one of them runs its rows on the one batch-of-rows mechanism (attacks.rows: the
first hit row of each point records it, the rows of a broken point leave, one compaction rule).

What differs between the callers of :func:`ascend` is said by data, not by another copy of the loop:

* :class:`Rows` -- the flat iterates (A, d) and what each row needs (clean point, label, box, radius, step sizes,
  target) plus ``pos``, the row's name in the caller's record (a point; an (eps, point) pair; a (model, point) pair);
* a gradient -- :class:`ModelGradient` (one model, with an autograd-free path for plain ReLU MLPs) or any callable
  ``(rows, need_grad) -> (logits, input gradient)`` such as the stacked forward of several models;
* ``on_break`` -- evaluation only: called with the rows whose iterate is misclassified, it records them and says which
  rows are still alive. Without it (training) every row runs every step.

Retired rows leave at attacks.rows.compaction's rule with a slack of 1/COMPACT_EVERY (rows are independent, so a
retired row still in the batch only costs its share of the pass); rows laid out in ``groups`` (one block per stacked
model) as a rectangle.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .randomized import Randomized
from .rows import compaction
from .threat import alpha_at, ascent_step, attack_loss, ce_saturated, input_grad

FAST_MLP = True  # module switch (tests compare both paths)
COMPACT_EVERY = 32  # compact once 1/COMPACT_EVERY of the rows are retired


@dataclass
class Rows:
    """The rows one ascent moves, all indexed alike. x0 is needed by the L2 projection only (None for Linf).
    eps: one float or (A, 1); alpha: None (the plan's shared step rule) or (A, steps) per-row step sizes."""

    x: torch.Tensor
    y: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    eps: float | torch.Tensor
    pos: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    target: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    groups: int = 1

    def take(self, idx: torch.Tensor) -> "Rows":
        """The rows at ``idx`` (a 1-D index)."""
        pick = lambda v: v.index_select(0, idx) if torch.is_tensor(v) and v.dim() > 0 else v  # noqa: E731
        return replace(self, x=pick(self.x), y=pick(self.y), lo=pick(self.lo), hi=pick(self.hi), pos=pick(self.pos),
                       eps=pick(self.eps), x0=pick(self.x0), target=pick(self.target), alpha=pick(self.alpha))

    def final(self, alive: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos, x) of the rows still alive after ``ascend`` (its alive mask; None: all)."""
        return (self.pos, self.x) if alive is None else (self.pos[alive], self.x[alive])


@dataclass
class Ascent:
    """How rows move: the norm, the number of steps and the shared step rule (a float or a per-step tuple).
    counters (grad_rows, fwd_rows) count the rows each pass computed."""

    norm: str
    steps: int
    alpha: float | tuple = 0.0
    counters: dict = field(default_factory=lambda: {"grad_rows": 0, "fwd_rows": 0})

    def step_size(self, rows: Rows, t: int):
        return alpha_at(self.alpha, t) if rows.alpha is None else rows.alpha[:, t:t + 1]


OnBreak = Callable[[Rows, torch.Tensor, int], "torch.Tensor | None"]


def ascend(rows: Rows, plan: Ascent, grad, on_break: OnBreak | None = None,
           alive: torch.Tensor | None = None) -> tuple[Rows, torch.Tensor | None]:
    """Move ``rows`` for ``plan.steps`` ascent steps; returns the final rows and their alive mask (None: all alive).

    With ``on_break`` every iterate (the start, each step, and the last) is first checked: alive rows whose logits'
    argmax is not their label go to ``on_break(rows, hit, t)``, which records them and returns the rows that retire
    (None: the hit rows). ``alive``: False for rows retired from the start (padding of grouped rows)."""
    for t in range(plan.steps + 1):
        last = t == plan.steps
        if last and on_break is None:
            break
        z, g = grad(rows, not last)
        plan.counters["fwd_rows" if last else "grad_rows"] += rows.x.shape[0]
        if on_break is not None:
            hit = z.argmax(1) != rows.y
            if alive is not None:
                hit &= alive
            if bool(hit.any()):
                retire = on_break(rows, hit, t)
                retire = hit if retire is None else retire
                alive = ~retire if alive is None else alive & ~retire
                if not bool(alive.any()):
                    return rows, alive
        if last:
            break
        rows.x = ascent_step(rows.x, g, rows.x0, rows.lo, rows.hi, plan.step_size(rows, t), rows.eps, plan.norm)
        del g, z
        if alive is not None:
            idx = compaction(alive, rows.groups, 1 / COMPACT_EVERY)
            if idx is not None:
                rows, alive = rows.take(idx), alive.index_select(0, idx)
                if rows.groups == 1:
                    alive = None
    return rows, alive


# ----------------------------------------------------------------------------------------------------------------
# gradients

class ModelGradient:
    """Logits and the input gradient of the summed attack loss of one model, on flat rows reshaped to ``shape``.
    A plain ReLU MLP takes the autograd-free :class:`FastMLP` path. A randomized model (attacks.randomized) gets
    expectation over transformation: each row is repeated ``eot`` times in the batch, the gradient is the sum of the
    draws' loss gradients, the logits (for the early exit) their mean."""

    def __init__(self, model: torch.nn.Module, shape: tuple, loss: str):
        self.model, self.shape, self.loss = model, tuple(shape), loss
        self.fast = FastMLP.build(model, self.shape)
        self.draws = model.eot if isinstance(model, Randomized) else 1

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(k·A, C) logits of the k draws of every row (k = 1 for a deterministic model)."""
        xs = x.view(-1, *self.shape)
        return self.model(xs.repeat(self.draws, *([1] * len(self.shape))) if self.draws > 1 else xs)

    def _mean(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.draws == 1 else z.view(self.draws, -1, z.shape[1]).mean(0)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast.forward(x)[0] if self.fast is not None else self._mean(self._forward(x))

    def __call__(self, rows: Rows, need_grad: bool = True):
        x = rows.x
        if not need_grad:
            return self.logits(x), None
        if self.fast is not None:
            z, acts = self.fast.forward(x)
            return z, self.fast.input_grad(loss_grad(z, rows.y, self.loss, rows.target), acts)
        rep = lambda v: v if v is None or self.draws == 1 else v.repeat(self.draws)  # noqa: E731
        x.requires_grad_(True)
        with torch.enable_grad():
            z = self._forward(x)
            g = input_grad(attack_loss(z, rep(rows.y), self.loss, rep(rows.target)).sum(), x)
        x.requires_grad_(False)
        return self._mean(z.detach()), g


def loss_grad(z, y, loss, target):
    """d(sum of attack_loss)/dz, in closed form for cross-entropy (the margin's on saturated rows, as attack_loss),
    by autograd on the (A, C) logits otherwise."""
    if loss == "ce":
        p = torch.softmax(z, 1)
        if target is not None:
            return p.neg_().scatter_add_(1, target[:, None], torch.ones_like(p[:, :1]))
        sat = ce_saturated(z, y)  # the margin's gradient there
        dz = p.scatter_add_(1, y[:, None], torch.full_like(p[:, :1], -1.0))
        if bool(sat.any()):
            ys = y[sat][:, None]
            runner_up = z[sat].scatter(1, ys, float("-inf")).argmax(1, keepdim=True)
            dz[sat] = torch.zeros_like(dz[sat]).scatter_(1, runner_up, 1.0).scatter_(1, ys, -1.0)
        return dz
    with torch.enable_grad():
        zl = z.detach().requires_grad_(True)
        (dz,) = torch.autograd.grad(attack_loss(zl, y, loss, target).sum(), zl)
    return dz


class FastMLP:
    """Forward and input gradient of a plain ReLU MLP with explicit matmuls: no autograd graph, no saved-tensor
    bookkeeping, ReLU applied in place. Used automatically when the model is such an nn.Sequential without hooks."""

    def __init__(self, ops):
        self.ops = ops

    @staticmethod
    def build(model, in_shape=None):
        nn = torch.nn
        if not FAST_MLP or type(model) is not nn.Sequential:
            return None
        ops = []
        for mod in model.modules():
            if mod._forward_hooks or mod._forward_pre_hooks or getattr(mod, "_backward_hooks", None):
                return None
        flat = in_shape is not None and len(tuple(in_shape)) == 1
        for mod in model:
            if type(mod) is nn.Linear:
                if not ops and not flat:  # a Linear on unflattened images acts on the last axis only
                    return None
                ops.append(("linear", mod.weight, mod.bias))
            elif type(mod) is nn.ReLU:
                ops.append(("relu",))
            elif type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1:
                flat = True
            elif type(mod) is nn.Identity:
                continue
            else:
                return None
        if not ops or ops[0][0] != "linear":
            return None
        return FastMLP(ops)

    @torch.no_grad()
    def forward(self, x):
        """x (A, d) -> (logits, post-ReLU activations for the backward)."""
        acts = []
        h = x
        for op in self.ops:
            if op[0] == "linear":
                h = torch.nn.functional.linear(h, op[1].detach(), None if op[2] is None else op[2].detach())
            else:
                h = torch.relu_(h)
                acts.append(h)
        return h, acts

    @torch.no_grad()
    def input_grad(self, dz, acts):
        g = dz
        k = len(acts)
        for op in reversed(self.ops):
            if op[0] == "linear":
                g = torch.mm(g, op[1].detach())
            else:
                k -= 1
                g = torch.ops.aten.threshold_backward(g, acts[k], 0.0)
        return g
