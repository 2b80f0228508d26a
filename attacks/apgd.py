"""APGD (Croce & Hein, ICML 2020), AutoAttack's gradient attacks, with targets and restarts as rows of one batch.

The algorithm is the original's: a start drawn on the ball's surface (Linf: a uniform draw scaled to norm eps; L2: a
Gaussian direction), step 2·eps, momentum 0.75 after the first step, and checkpoints after 22% of the iterations,
then every 3% less down to 6%. At a checkpoint a row halves its step and restarts from its best point when its loss
rose in at most rho (0.75) of the steps since the last checkpoint, or when its step was kept last time and its best
loss has not improved since. Losses: cross-entropy (APGD-CE), DLR (APGD-DLR), targeted DLR (APGD-T).

What differs is the layout: every (point, target, restart) is a row; AutoAttack runs the 9 targets of APGD-T one after
another, each on the points still robust. A point broken by any row drops all its rows (attacks.rows), and a broken
row stops there: the original runs every row to its last iteration. The verdict of a point is the same either way:
it is broken when any of its iterates is misclassified. Boxes are the exact ball's (attacks.threat.box_bounds), so
no example overshoots it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .randomized import Randomized, majority_misclassified
from .rows import Found, compaction, sync_every
from .threat import box_bounds, project_l2

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


@dataclass(frozen=True)
class APGDConfig:
    loss: str = "ce"
    n_iter: int = 100
    rho: float = 0.75
    restarts: int = 1
    eot: int = 1          # gradient draws per step (a randomized model: Randomized.eot)
    # AutoAttack's rand version on a randomized model: a row runs its whole budget, and a point's example is the
    # iterate most of its step's EOT draws misclassified (the latest among equals; the original keeps its latest
    # misclassified iterate). Why: the first iterate past the boundary is misclassified by barely half the draws,
    # and a fresh vote reverses it half the time (noisy MLP at 0.2: 11 of 250 points robust against the
    # original's 2-3). A row leaves early only when every draw of its step misclassifies its iterate: no later one
    # can have more votes, and a fresh vote reverses such an example only when a draw's chance to misclassify it
    # is far below 20/20.
    run_on: bool = False

    def checkpoints(self):
        """(first period, its decrease, its minimum) in iterations, as the original sets them."""
        n = self.n_iter
        return max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)


def rank_by_logit(model, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) AutoAttack's targets: the classes of the 2nd..(k+1)th largest clean logits."""
    with torch.no_grad():
        z = model(x)
    return z.argsort(1, descending=True)[:, 1:k + 1]


def dlr(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """The original's DLR loss (to maximise): untargeted, or targeted at ``target``."""
    zs = z.sort(1)[0]
    zy = z.gather(1, y[:, None])[:, 0]
    if target is None:
        top_is_y = z.argmax(1) == y
        other = torch.where(top_is_y, zs[:, -2], zs[:, -1])
        return -(zy - other) / (zs[:, -1] - zs[:, -3] + 1e-12)
    zt = z.gather(1, target[:, None])[:, 0]
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def _loss(z, y, target, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(z, y, reduction="none")
    return dlr(z, y, target if loss == "dlr-targeted" else None)


class _Rows:
    """The state of every live row; ``restrict`` drops rows."""

    def __init__(self, **tensors):
        self.__dict__.update(tensors)

    def restrict(self, rows: torch.Tensor, names):
        for name in names:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:, rows] if name == "history" else t[rows])


def apgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, cfg: APGDConfig, *, seed: int = 0,
         targets: torch.Tensor | None = None, found: Found | None = None, warnings: list | None = None,
         x_init: torch.Tensor | None = None) -> Found:
    """APGD on every point of x not already broken in ``found``: one row per (target, restart) of each point
    (``targets``: (N, k) for the targeted loss). Returns ``found`` updated: the points some row misclassified at
    one of its iterates, with that iterate as their example. The model is used as given (eval mode, frozen).
    ``warnings``: where the DLR losses find rows with an exactly zero gradient at their start, the original's
    warning is appended. ``x_init``: the start of every row (shaped like the rows: k·restarts·N points, in the rows'
    order) instead of the random draw, as the original's x_init (the same start makes two engines comparable
    iteration by iteration)."""
    n = x.shape[0]
    found = found if found is not None else Found.start(x)
    todo = (~found.broken).nonzero().flatten()
    if todo.numel() == 0:
        return found
    k = 1 if targets is None else targets.shape[1]
    reps = k * cfg.restarts
    # rows in the original's order: target-major, then restart, then point
    pid = todo.repeat(reps)
    tgt = None if targets is None else targets[todo].T.repeat_interleave(cfg.restarts, 0).reshape(-1)
    shape = x.shape[1:]
    x0 = x.detach().reshape(n, -1)[pid]
    yy = y[pid]
    lo, hi = box_bounds(x.detach().reshape(n, -1), eps, norm)
    lo, hi = lo[pid], hi[pid]
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    fwd = lambda xf: model(xf.view(xf.shape[0], *shape))  # noqa: E731
    eot = model.eot if isinstance(model, Randomized) else cfg.eot

    def loss_grad(xf, y_, t_):
        """(logits, loss, gradient, draws that misclassify): a randomized model's ``eot`` draws are rows of one
        batch (per-row randomness, as PGD's EOT), where the original loops over them; logits and loss of the last."""
        rows = xf.shape[0]
        xr = (xf.detach() if eot == 1 else xf.detach().repeat(eot, 1)).requires_grad_(True)
        with torch.enable_grad():
            z = fwd(xr)
            lv = _loss(z, y_.repeat(eot), None if t_ is None else t_.repeat(eot), cfg.loss)
            g = torch.autograd.grad(lv.sum(), xr)[0] if lv.requires_grad else torch.zeros_like(xr)
        z, lv = z.detach().view(eot, rows, -1), lv.detach().view(eot, rows)
        g = g if eot == 1 else g.view(eot, rows, -1).sum(0) / eot
        return z[-1], lv[-1], g, (z.argmax(2) != y_).sum(0)

    def missed(z, wrong):  # run_on: the step's own EOT draws vote (no extra pass)
        return 2 * wrong > eot if cfg.run_on else _missed(model, z, r)

    xa = _start(x0, lo, hi, eps, norm, gen) if x_init is None else \
        torch.minimum(torch.maximum(x_init.detach().reshape(x0.shape).to(x0.dtype), lo), hi)
    z, lv, g, wrong = loss_grad(xa, yy, tgt)
    if warnings is not None and cfg.loss != "ce":
        zero = int((g.abs().sum(1) == 0).sum())
        if zero:
            warnings.append(f"there are {zero} points with zero gradient! This might lead to unreliable evaluation "
                            f"with gradient-based attacks.")
    r = _Rows(x0=x0, y=yy, t=tgt, pid=pid, lo=lo, hi=hi, x=xa, x_old=xa.clone(), x_best=xa.clone(), g=g,
              g_best=g.clone(), loss_best=lv.clone(), step=torch.full((xa.shape[0], 1), 2.0 * eps, device=x.device,
                                                                      dtype=xa.dtype),
              history=torch.zeros(cfg.n_iter, xa.shape[0], device=x.device, dtype=lv.dtype),
              best_at_check=lv.clone(), reduced=torch.ones_like(lv, dtype=torch.bool),
              hit=torch.zeros_like(yy, dtype=torch.bool), x_hit=xa.clone(), in_shape=tuple(shape), wrong=wrong)
    r.hit = missed(z, wrong)
    names = ("x0", "y", "t", "pid", "lo", "hi", "x", "x_old", "x_best", "g", "g_best", "loss_best", "step", "history",
             "best_at_check", "reduced", "hit", "x_hit", "wrong")
    period, decr, minimum = cfg.checkpoints()
    since = 0
    every = sync_every(x.device)
    def settled(final: bool = False):  # run_on: before its last step a row leaves only on a unanimous vote
        return r.hit if final or not cfg.run_on else r.hit & (r.wrong >= eot)

    keep = compaction(found.settle(r.pid, settled(), r.x_hit))
    if keep is not None:
        r.restrict(keep, names)
    for i in range(cfg.n_iter):
        if r.x.shape[0] == 0:
            break
        with torch.no_grad():
            a = 0.75 if i > 0 else 1.0
            x_new = _step(r, a, eps, norm)
            r.x_old, r.x = r.x, x_new
        z, lv, g, wrong = loss_grad(r.x, r.y, r.t)
        r.g = g
        with torch.no_grad():
            miss = missed(z, wrong)
            if cfg.run_on:  # the iterate most draws misclassify so far
                miss = miss & (wrong >= r.wrong)
                r.wrong = torch.where(miss, wrong, r.wrong)
            r.x_hit = torch.where((miss if cfg.run_on else miss & ~r.hit)[:, None], r.x, r.x_hit)
            r.hit = r.hit | miss
            r.history[i] = lv
            better = lv > r.loss_best
            r.x_best = torch.where(better[:, None], r.x, r.x_best)
            r.g_best = torch.where(better[:, None], g, r.g_best)
            r.loss_best = torch.where(better, lv, r.loss_best)
            since += 1
            if since == period:
                _checkpoint(r, i, period, cfg.rho)
                period = max(period - decr, minimum)
                since = 0
        last = i == cfg.n_iter - 1
        if (i + 1) % every == 0 or last:
            keep = compaction(found.settle(r.pid, settled(last), r.x_hit))
            if keep is not None:
                r.restrict(keep, names)
    return found


def _missed(model, z: torch.Tensor, r: _Rows) -> torch.Tensor:
    """Rows whose iterate is misclassified; on a randomized model one draw is no verdict: the majority of its vote
    draws must agree before a row may stop its point (attacks.randomized)."""
    miss = z.argmax(1) != r.y
    if isinstance(model, Randomized) and bool(miss.any()):
        idx = miss.nonzero().flatten()
        miss[idx] = majority_misclassified(model, r.x[idx].view(idx.numel(), *r.in_shape), r.y[idx])
    return miss


def _start(x0, lo, hi, eps, norm, gen):
    """The original's start: a random direction scaled to norm eps (Linf: uniform in [-1, 1] over its max), then
    into the box."""
    if norm == "Linf":
        t = 2 * torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype) - 1
        d = t / (t.abs().amax(1, keepdim=True) + 1e-12)
        return torch.clamp(x0 + eps * d, lo, hi)
    t = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    d = t / (t.norm(dim=1, keepdim=True) + 1e-12)
    return project_l2(x0, x0 + eps * d, eps)


def _step(r: _Rows, a: float, eps: float, norm: str) -> torch.Tensor:
    """The step with momentum: z = P(x + step·dir(g)), x' = P(x + a(z - x) + (1 - a)(x - x_old))."""
    if norm == "Linf":
        z = torch.clamp(r.x + r.step * torch.sign(r.g), r.lo, r.hi)
        return torch.clamp(r.x + (z - r.x) * a + (r.x - r.x_old) * (1 - a), r.lo, r.hi)
    gn = r.g / (r.g.norm(dim=1, keepdim=True) + 1e-12)
    z = project_l2(r.x0, r.x + r.step * gn, eps)
    return project_l2(r.x0, r.x + (z - r.x) * a + (r.x - r.x_old) * (1 - a), eps)


def _checkpoint(r: _Rows, i: int, period: int, rho: float) -> None:
    """Halve the step (and go back to the best point) where the loss rose too rarely since the last checkpoint or the
    best loss stalled after a kept step. The count reads the history as the original does: the step before the
    first reads the last slot, still zero."""
    ups = torch.zeros_like(r.loss_best)
    for c in range(period):
        ups += (r.history[i - c] > r.history[i - c - 1]).to(ups.dtype)
    osc = ups <= period * rho
    stalled = ~r.reduced & (r.best_at_check >= r.loss_best)
    cut = osc | stalled
    r.reduced = cut
    r.best_at_check = r.loss_best.clone()
    r.step = torch.where(cut[:, None], r.step / 2.0, r.step)
    r.x = torch.where(cut[:, None], r.x_best, r.x)
    r.g = torch.where(cut[:, None], r.g_best, r.g)
