"""Batched PGD (Linf / L2) on [0,1] inputs, built on the one ascent loop of :mod:`attacks.ascent`.

Two entry points:

* :func:`pgd_perturb` -- plain fixed-step PGD (no early exit), used by adversarial training.
* :func:`pgd_sweep`   -- the evaluation engine: an ascending eps sweep with restarts, per-point early exit
  (a point is broken as soon as one iterate is misclassified; that iterate is kept), monotone sweep (a point
  broken at eps_k is broken at every larger eps and is not attacked again), ``max_batch`` and automatic
  back-off on out-of-memory. Two schedules share :class:`Sweep`: sequential (eps and restarts one after another on
  the shrinking active set) and joint (every (eps, restart, point) row at once, for GPUs).

Every returned example satisfies ``|x_adv - x| <= eps`` (Linf) exactly when computed in the input's dtype
(the box bounds are rounded inwards once at set-up) and lies in [0, 1].
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lawbench.base.memory import Backoff

from .ascent import Ascent, ModelGradient, Rows, ascend
from .rows import Found, channels_last, first_of_each
from .errors import AttackError
from .randomized import Randomized, majority_misclassified
from .threat import (alpha_at, attack_loss, box_bounds, check_loss, check_norm, default_step_size, describe_step,  # noqa: F401
                     eps_and_step_sizes, predict, start_point)

@dataclass
class PGDResult:
    """Result of :func:`pgd_sweep`.

    robust: BoolTensor (E, N), True where the point survived every restart at that eps (False where the clean
            point is misclassified). Rows follow the order of the ``eps`` argument.
    x_adv:  Tensor (E, N, ...) adversarial examples (the breaking iterate for broken points, the last iterate
            for robust points, the clean input for clean-misclassified points).
    info:   dict with eps (as given), norm, steps, step_size per eps, restarts, loss, clean (Bool N),
            broken_step (E, N) int (gradient steps used in the breaking run, -1 if never broken there),
            grad_row_steps / fwd_rows (work counters), max_batch, oom_backoffs, seconds, schedule.
    """

    robust: torch.Tensor
    x_adv: torch.Tensor
    info: dict = field(default_factory=dict)

    def accuracy(self) -> dict:
        eps = self.info.get("eps", list(range(self.robust.shape[0])))
        return {float(e): float(self.robust[i].float().mean()) for i, e in enumerate(eps)}


# ----------------------------------------------------------------------------------------------------------------
# helpers

def auto_max_batch(model, x, n) -> int:
    """Rows per pass: all points unless an estimate of activation memory says otherwise."""
    budget = 2 * 2 ** 30 if x.device.type == "cpu" else None
    if budget is None:
        try:
            free, _ = torch.cuda.mem_get_info(x.device)
            budget = int(free * 0.5)
        except Exception:  # pragma: no cover - device without query
            budget = 2 * 2 ** 30
    sizes = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel())

    hs = [m.register_forward_hook(hook) for m in model.modules() if len(list(m.children())) == 0]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hs:
            h.remove()
    per_row = (sum(sizes) * 3 + x[:1].numel() * 12) * x.element_size()
    return int(max(1, min(n, budget // max(per_row, 1))))


# ----------------------------------------------------------------------------------------------------------------
# plain PGD for adversarial training

def pgd_perturb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "Linf",
                steps: int, step_size: float | None = None, random_start: bool = True, loss: str = "ce",
                generator: torch.Generator | None = None, targeted: bool = False,
                target: torch.Tensor | None = None) -> torch.Tensor:
    """Plain fixed-step PGD (Madry): ``steps`` projected signed-gradient (Linf) or normalised-gradient (L2) ascent
    steps from a random start, no early exit. Returns the last iterate (same shape as x, detached), inside the eps
    ball and [0,1]. The model's train/eval mode is left as it is; parameter gradients are not touched."""
    check_norm(norm)
    check_loss(loss)
    if steps < 0:
        raise AttackError(f"steps must be >= 0, got {steps}")
    eps = float(eps)
    shape = x.shape
    x0 = x.detach().reshape(x.shape[0], -1)
    if eps <= 0 or x0.shape[0] == 0:
        return x.detach().clone()
    if targeted and target is None:
        raise AttackError("targeted pgd_perturb needs target labels")
    alpha = default_step_size(eps, steps, norm) if step_size is None else float(step_size)
    lo, hi = box_bounds(x0, eps, norm)
    rows = Rows(x=start_point(x0, lo, hi, eps, norm, generator, random_start), y=y, lo=lo, hi=hi, eps=eps, x0=x0,
                target=target if targeted else None)
    rows, _ = ascend(rows, Ascent(norm, int(steps), alpha), ModelGradient(model, shape[1:], loss))
    return rows.x.detach().view(shape)


# ----------------------------------------------------------------------------------------------------------------
# the sweep engine

@dataclass
class Sweep:
    """One eps sweep's settings, read by both schedules: eps ascending, one step rule per eps."""

    eps: list
    alphas: list
    norm: str
    steps: int
    restarts: int = 1
    random_start: bool = True
    targeted: bool = False
    warm_start: bool = False

    def ascent(self, k: int, counters: dict) -> Ascent:
        return Ascent(self.norm, self.steps, self.alphas[k], counters)


def _empty_record(x0: torch.Tensor, E: int):
    """(robust (E, A), x_adv (E, A, d), broken_step (E, A)) before any attack: robust, clean inputs, never broken."""
    A = x0.shape[0]
    return (torch.ones(E, A, dtype=torch.bool, device=x0.device), x0.unsqueeze(0).repeat(E, 1, 1),
            torch.full((E, A), -1, dtype=torch.long, device=x0.device))


def _run(grad: ModelGradient, plan: Ascent, x0, y, target, lo, hi, eps, start):
    """One PGD run with per-row early exit. Returns (broken (A,), final or breaking iterate (A, d), step (A,)).
    On a randomized model a hit (the mean logits of the EOT draws misclassify) counts, and its row exits, only when
    the majority verdict of fresh draws confirms it; otherwise the row keeps ascending."""
    A = x0.shape[0]
    found = Found(torch.zeros(A, dtype=torch.bool, device=x0.device), torch.empty_like(x0))
    brk_step = torch.full((A,), -1, dtype=torch.long, device=x0.device)
    noisy = isinstance(grad.model, Randomized)

    def on_break(rows, hit, t):
        if noisy:
            idx = hit.nonzero().flatten()
            sure = majority_misclassified(grad.model, rows.x[idx].view(-1, *grad.shape), rows.y[idx])
            hit = torch.zeros_like(hit).index_fill_(0, idx[sure], True)
        was = found.broken.clone()
        found.settle(rows.pos, hit, rows.x)  # one row per point: each hit row breaks its point
        brk_step[found.broken & ~was] = t
        return hit

    rows = Rows(x=start, y=y, lo=lo, hi=hi, eps=eps, pos=torch.arange(A, device=x0.device),
                x0=x0 if plan.norm == "L2" else None, target=target)
    rows, alive = ascend(rows, plan, grad, on_break)
    pos, x_last = rows.final(alive)
    last = ~found.broken[pos]  # rows without a hit end at their last iterate
    found.x_adv[pos[last]] = x_last[last]
    return found.broken, found.x_adv, brk_step


def _targets_for_restart(z_clean: torch.Tensor, y: torch.Tensor, r: int) -> torch.Tensor:
    """Target for restart r: the (r mod (C-1))-th most likely wrong class at the clean point."""
    C = z_clean.shape[1]
    zz = z_clean.scatter(1, y[:, None], float("-inf"))
    order = zz.argsort(1, descending=True)[:, : C - 1]
    return order[:, r % (C - 1)]


def _sweep_chunk(grad: ModelGradient, x0, y, target, sw: Sweep, gen, counters):
    """Ascending sweep on one chunk of clean-correct rows, eps and restarts one after another on the shrinking
    active set. Returns (robust (E,A), x_adv (E,A,d), brk (E,A))."""
    robust, x_adv, brk = _empty_record(x0, len(sw.eps))
    z_clean = None
    if sw.targeted and target is None:
        z_clean = grad.logits(x0)
        counters["fwd_rows"] += x0.shape[0]
    active = torch.arange(x0.shape[0], device=x0.device)
    x_last, k_prev = None, 0  # warm start: survivors of eps_k start eps_{k+1} where their last eps_k run ended
    for k, e in enumerate(sw.eps):
        if active.numel() == 0:
            break
        if e <= 0:
            continue
        lo, hi = box_bounds(x0[active], e, sw.norm)
        for r in range(sw.restarts):
            if active.numel() == 0:
                break
            tg = None
            if sw.targeted:
                tg = target[active] if target is not None else _targets_for_restart(z_clean[active], y[active], r)
            init = None
            if r == 0 and sw.warm_start and x_last is not None:
                # the last eps_k iterate, its perturbation stretched to the new radius
                init = x0[active] + (x_last - x0[active]) * (e / sw.eps[k_prev])
            xa0 = x0[active]
            start = start_point(xa0, lo, hi, e, sw.norm, gen, sw.random_start, init)
            b, xo, st = _run(grad, sw.ascent(k, counters), xa0, y[active], tg, lo, hi, e, start)
            if bool(b.any()):
                ib = active[b]
                robust[k:, ib] = False
                x_adv[k:, ib] = xo[b].unsqueeze(0)
                brk[k, ib] = st[b]
            nb = ~b
            if r == sw.restarts - 1 or not bool(nb.any()):
                x_adv[k, active[nb]] = xo[nb]
            active, lo, hi = active[nb], lo[nb], hi[nb]
            x_last, k_prev = xo[nb], k
    return robust, x_adv, brk


def _joint_rows(grad, x0, y, target, sw: Sweep, gen, counters) -> Rows:
    """Every (eps k, restart r, point i) of a chunk as one row, named pos = k * A + i."""
    A, dev, dt = x0.shape[0], x0.device, x0.dtype
    z_clean = None
    if sw.targeted and target is None:
        z_clean = grad.logits(x0)
        counters["fwd_rows"] += A
    pos, lo_l, hi_l, tg_l = [], [], [], []
    for k, e in enumerate(sw.eps):
        if e <= 0:
            continue
        lo, hi = box_bounds(x0, e, sw.norm)
        for r in range(sw.restarts):
            pos.append(k * A + torch.arange(A, device=dev))
            lo_l.append(lo)
            hi_l.append(hi)
            if sw.targeted:
                tg_l.append(target if target is not None else _targets_for_restart(z_clean, y, r))
    pos = torch.cat(pos)
    kr, pt = pos // A, pos % A
    eps_t = torch.tensor(sw.eps, dtype=dt, device=dev)
    al_t = torch.tensor([[alpha_at(a, t) for t in range(max(sw.steps, 1))] for a in sw.alphas], dtype=dt, device=dev)
    xr0, er, lo, hi = x0[pt], eps_t[kr][:, None], torch.cat(lo_l), torch.cat(hi_l)
    return Rows(x=start_point(xr0, lo, hi, er, sw.norm, gen, sw.random_start), y=y[pt], lo=lo, hi=hi, eps=er,
                pos=pos, x0=xr0 if sw.norm == "L2" else None, target=torch.cat(tg_l) if sw.targeted else None,
                alpha=al_t[kr])


def _sweep_joint(grad: ModelGradient, x0, y, target, sw: Sweep, gen, counters):
    """All eps and all restarts of a chunk in one set of rows (row = (eps k, restart r, point i)).

    A row that breaks point i at eps_k marks i broken at every eps >= k and retires every row of i at those eps
    (including the other restarts); rows at smaller eps keep going. Same results contract as _sweep_chunk, more
    rows per pass (for devices that need large batches to be efficient)."""
    E, A = len(sw.eps), x0.shape[0]
    robust, x_adv, brk = _empty_record(x0, E)
    if A == 0 or not any(e > 0 for e in sw.eps):
        return robust, x_adv, brk
    rows = _joint_rows(grad, x0, y, target, sw, gen, counters)
    broken_at = torch.full((A,), E, dtype=torch.long, device=x0.device)

    def on_break(rows, hit, t):
        key, hx = rows.pos[hit], rows.x[hit]
        first = first_of_each(key)  # one row per (eps, point): duplicate row writes would mix rows
        hk, hp, hx = key[first] // A, key[first] % A, hx[first]
        for k in torch.unique(hk).tolist():  # ascending: the smallest breaking eps wins
            sel = hk == k
            p = hp[sel]
            new = broken_at[p] > k
            if bool(new.any()):
                pn = p[new]
                broken_at[pn] = k
                x_adv[k, pn] = hx[sel][new]
                brk[k, pn] = t
        return rows.pos // A >= broken_at[rows.pos % A]

    rows, _ = ascend(rows, sw.ascent(0, counters), grad, on_break)
    # survivors: the last iterate of their first row at each eps they survived
    kr, pt = rows.pos // A, rows.pos % A
    alive = (kr < broken_at[pt]).nonzero().flatten()
    alive = alive[first_of_each(rows.pos[alive])]
    x_adv[kr[alive], pt[alive]] = rows.x[alive]
    robust = torch.arange(E, device=x0.device)[:, None] < broken_at[None, :]
    for k in range(E):  # broken at k: the same example at every larger eps
        b = broken_at == k
        if bool(b.any()):
            x_adv[k + 1:, b] = x_adv[k, b].unsqueeze(0)
    return robust, x_adv, brk


def pgd_sweep(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | Sequence[float], *,
              norm: str = "Linf", steps: int = 100, step_size: float | Sequence[float] | None = None,
              restarts: int = 1, loss: str = "ce", random_start: bool = True, targeted: bool = False,
              target: torch.Tensor | None = None, seed: int = 0, max_batch: int | None = None,
              schedule: str = "auto", warm_start: bool = False,
              log: Callable[[str], None] | None = None) -> PGDResult:
    """PGD over an eps sweep with restarts and per-point early exit.

    eps may be a float or a list; it is processed in ascending order (results follow the given order). A point
    broken at eps_k counts as broken (with the same example) at every larger eps and is not attacked again.
    step_size: None (2.5*eps/steps per eps), a float for all eps, or one per eps.
    targeted: if True, restart r aims at ``target`` (N,) or, when target is None, at the (r mod (C-1))-th most
    likely wrong class of the clean input; a point still counts as broken as soon as it is misclassified.
    max_batch bounds the rows per forward pass (None: all points unless memory estimates say otherwise); on
    out-of-memory the batch is halved and the chunk retried (info["oom_backoffs"]).
    schedule: "sequential" runs eps (ascending) and restarts one after another on the shrinking active set: the
    least work, best where the device is already busy with one batch (CPU). "joint" runs every (eps, restart,
    point) row at once and retires rows as their point breaks: more work, far fewer and larger passes (GPU).
    "auto" picks joint on CUDA and sequential elsewhere.
    warm_start (sequential schedule, off by default): the first restart at eps_{k+1} starts from the point's last
    eps_k iterate with its perturbation stretched to the new radius instead of at a random point (later restarts
    start at random points). Less work (survivors of eps_k break sooner at eps_{k+1}); measured on MNIST MLPs it is
    stronger on PGD-trained models and slightly weaker on undefended ones, hence not the default.
    """
    check_norm(norm)
    check_loss(loss)
    if int(steps) < 0 or int(restarts) < 1:
        raise AttackError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    eps_list, steps_list = eps_and_step_sizes(eps, step_size, steps, norm)
    if x.shape[0] != y.shape[0]:
        raise AttackError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    if schedule not in ("auto", "sequential", "joint"):
        raise AttackError(f"schedule must be 'auto', 'sequential' or 'joint', got {schedule!r}")
    if schedule == "auto":
        schedule = "joint" if x.device.type == "cuda" else "sequential"
    if max_batch is not None and int(max_batch) < 1:
        raise AttackError(f"max_batch must be >= 1, got {max_batch}")
    t_start = time.perf_counter()
    N = x.shape[0]
    shape = tuple(x.shape[1:])
    dev = x.device
    x_flat = x.detach().reshape(N, -1)
    y = y.to(dev)
    order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
    eps_sorted = [eps_list[i] for i in order]
    alphas = [steps_list[i] for i in order]
    E = len(eps_list)
    counters = {"grad_rows": 0, "fwd_rows": 0}
    grad = ModelGradient(model, shape, loss)
    sweep = Sweep(eps=eps_sorted, alphas=alphas, norm=norm, steps=int(steps), restarts=int(restarts),
                  random_start=bool(random_start), targeted=bool(targeted), warm_start=bool(warm_start))
    rows_per_point = (len(eps_list) * int(restarts)) if schedule == "joint" else 1
    mb = Backoff(int(max_batch) if max_batch else auto_max_batch(model, x, N * rows_per_point), log=log,
                 what="pgd: max_batch")
    pred = mb.run(lambda b: predict(model, x, b))  # clean predictions
    counters["fwd_rows"] += N
    clean = pred == y
    robust_s = torch.zeros(E, N, dtype=torch.bool, device=dev)
    x_adv_s = x_flat.unsqueeze(0).repeat(E, 1, 1)
    brk_s = torch.full((E, N), -1, dtype=torch.long, device=dev)
    idx = torch.nonzero(clean).flatten()
    s = 0
    def chunk(b: int, s: int):
        """The sweep on the next points from s, as many as a batch of b rows holds."""
        joint = schedule == "joint" and b >= rows_per_point
        rows = idx[s:s + (b // rows_per_point if joint else b)]
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed) * 1_000_003 + s)
        fn = _sweep_joint if joint else _sweep_chunk
        return rows, fn(grad, x_flat[rows], y[rows], None if target is None else target.to(dev)[rows], sweep, gen,
                        counters)

    with channels_last(model, x):  # the ascent only: clean predictions on the model as given
        while s < idx.numel():
            rows, (r_, xa_, b_) = mb.run(lambda b: chunk(b, s))
            robust_s[:, rows] = r_
            x_adv_s[:, rows] = xa_
            brk_s[:, rows] = b_
            s += rows.numel()
    inv = [0] * E
    for j, i in enumerate(order):
        inv[i] = j
    robust = robust_s[inv]
    x_adv = x_adv_s[inv].view(E, N, *shape)
    info = {
        "eps": eps_list, "norm": norm, "steps": int(steps), "step_size": [describe_step(a) for a in steps_list],
        "restarts": int(restarts),
        "loss": loss, "targeted": bool(targeted), "random_start": bool(random_start), "seed": int(seed),
        "clean": clean, "broken_step": brk_s[inv], "grad_rows": counters["grad_rows"],
        "fwd_rows": counters["fwd_rows"], "max_batch": mb.batch, "oom_backoffs": mb.ooms,
        "seconds": time.perf_counter() - t_start, "schedule": schedule,
        "warm_start": bool(warm_start) and schedule == "sequential",
    }
    return PGDResult(robust=robust, x_adv=x_adv, info=info)
