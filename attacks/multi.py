"""Multi-model PGD: attack several models of one architecture (seeds, noise levels) together.

Two layouts:

* ``sequential``: one :func:`attacks.pgd_sweep` per model.
* ``stacked``: the models' parameters are stacked (``torch.func.stack_module_state``) and one vmapped
  forward/backward serves all models at once (batched matmuls). Per-model early exit is kept with a padded
  active set that is re-compacted when enough rows have left.

``layout="auto"`` times one gradient step of each layout on the actual models and points and picks the faster
(measured on this repository's 2-core CPU: stacking 16 small MLPs is ~3x slower at 1000 points per model and ~6x
faster at 10 points per model, so no fixed rule fits every size). The choice and the probe timings are returned in
``info``. Both layouts give the same results up to floating-point summation order: random starts come from
per-model generators seeded exactly as :func:`pgd_sweep` seeds them.
"""
from __future__ import annotations

import copy
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lawbench.base.memory import Backoff
from lawbench.base.modes import eval_mode

from .ascent import Ascent, Rows, ascend
from .errors import AttackError
from .pgd import PGDResult, Sweep, auto_max_batch, pgd_sweep
from .threat import (attack_loss, box_bounds, check_loss, check_norm, describe_step, eps_and_step_sizes, input_grad,
                     random_start, start_point)

LAYOUTS = ("auto", "stacked", "sequential")


@dataclass
class MultiResult:
    results: list            # one PGDResult per model
    info: dict = field(default_factory=dict)


def stack_models(models: Sequence[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function (M, A, *in_shape) -> (M, A, C) evaluating model m on slice m (vmapped functional_call)."""
    from torch.func import functional_call, stack_module_state

    if len(models) < 1:
        raise AttackError("no models to stack")
    names = [tuple(n for n, _ in m.named_parameters()) for m in models]
    shapes = [tuple(p.shape for p in m.parameters()) for m in models]
    if any(n != names[0] for n in names) or any(s != shapes[0] for s in shapes):
        raise AttackError("stacked layout needs models of one architecture (same parameter names and shapes)")
    fast = _stack_mlp(models)
    if fast is not None:
        return fast
    params, buffers = stack_module_state(list(models))
    params = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in buffers.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def f(p, b, xx):
        return functional_call(base, (p, b), (xx,))

    vf = torch.vmap(f, in_dims=(0, 0, 0))

    def F(X):
        return vf(params, buffers, X)

    F.kind = "vmap"
    return F


def _stack_mlp(models):
    """Batched-matmul forward for nn.Sequential models made of Flatten / Linear / ReLU / Identity (the MLP
    families): one baddbmm per layer for all models. None for any other structure (vmap is used then)."""
    nn = torch.nn
    if not all(isinstance(m, nn.Sequential) for m in models):
        return None
    ops = []
    for i, mod in enumerate(models[0]):
        mods = [m[i] for m in models]
        if any(type(mm) is not type(mod) for mm in mods):
            return None
        if isinstance(mod, nn.Linear):
            W = torch.stack([mm.weight.detach() for mm in mods]).transpose(1, 2).contiguous()  # (M, in, out)
            b = None if mod.bias is None else torch.stack([mm.bias.detach() for mm in mods])[:, None, :]
            ops.append(("linear", W, b))
        elif isinstance(mod, nn.ReLU):
            ops.append(("relu",))
        elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            ops.append(("flatten",))
        elif isinstance(mod, nn.Identity):
            continue
        else:
            return None
    if not ops or ops[0][0] not in ("flatten", "linear"):
        return None

    def F(X):
        h = X
        for op in ops:
            if op[0] == "flatten":
                h = h.reshape(h.shape[0], h.shape[1], -1)
            elif op[0] == "linear":
                h = torch.bmm(h, op[1]) if op[2] is None else torch.baddbmm(op[2], h, op[1])
            else:
                h = torch.relu(h)
        return h

    F.kind = "bmm"
    return F


def _as_list(v, M, what):
    if isinstance(v, (list, tuple)):
        if len(v) != M:
            raise AttackError(f"{what}: got {len(v)} tensors for {M} models")
        return list(v)
    return [v] * M


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (M, A, ...) gathered along dim 1 by idx (M, B)."""
    M, B = idx.shape
    flat = idx + (torch.arange(M, device=idx.device) * t.shape[1])[:, None]
    return t.reshape(M * t.shape[1], *t.shape[2:])[flat.reshape(-1)].reshape(M, B, *t.shape[2:])


class StackedGradient:
    """Logits and input gradients of M stacked models on grouped rows (M blocks of B rows, block m for model m)."""

    def __init__(self, F_, M: int, shape: tuple, loss: str):
        self.F, self.M, self.shape, self.loss = F_, M, tuple(shape), loss

    def __call__(self, rows: Rows, need_grad: bool = True):
        x, M = rows.x, self.M
        B = x.shape[0] // M
        if not need_grad:
            with torch.no_grad():
                z = self.F(x.view(M, B, *self.shape))
            return z.reshape(M * B, -1), None
        x.requires_grad_(True)
        with torch.enable_grad():
            z = self.F(x.view(M, B, *self.shape)).reshape(M * B, -1)
            g = input_grad(attack_loss(z, rows.y, self.loss).sum(), x)
        x.requires_grad_(False)
        return z.detach(), g


def _stacked_run(grad: StackedGradient, plan: Ascent, x0, y, lo, hi, alive, eps, start):
    """One PGD run of all models on their alive rows. x0/lo/hi (M, A, d), y (M, A), alive (M, A) bool;
    start(xg0, lo, hi, counts, pos) gives the start of the rows gathered at pos (M, Ap).

    Returns broken (M, A) bool, x_out (M, A, d) (valid where alive), brk_step (M, A)."""
    dev = x0.device
    M, A, d = x0.shape
    counts = alive.sum(1)
    Ap = int(counts.max())
    broken = torch.zeros(M, A, dtype=torch.bool, device=dev)
    x_out = x0.clone()
    brk = torch.full((M, A), -1, dtype=torch.long, device=dev)
    if Ap == 0:
        return broken, x_out, brk
    pos = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :Ap]
    valid = torch.arange(Ap, device=dev)[None, :] < counts[:, None]
    xg0, lg, hg = _gather_rows(x0, pos), _gather_rows(lo, pos), _gather_rows(hi, pos)
    xs = start(xg0, lg, hg, counts, pos)
    flat = lambda t: t.reshape(M * Ap, *t.shape[2:])  # noqa: E731

    def on_break(rows, hit, t):
        key = rows.pos[hit]
        mi, pi = key // A, key % A
        broken[mi, pi] = True
        x_out[mi, pi] = rows.x[hit]
        brk[mi, pi] = t

    rows = Rows(x=flat(xs), y=flat(_gather_rows(y, pos)), lo=flat(lg), hi=flat(hg), eps=eps,
                pos=flat(pos + torch.arange(M, device=dev)[:, None] * A), x0=flat(xg0) if plan.norm == "L2" else None,
                groups=M)
    rows, live = ascend(rows, plan, grad, on_break, alive=flat(valid))
    key, x_last = rows.final(live)
    x_out[key // A, key % A] = x_last
    return broken, x_out, brk


def _starts(sw: Sweep, eps, gens, x_init):
    """The start rule of one stacked run: x_init (warm start) or per-model random starts seeded as pgd_sweep's."""
    def start(xg0, lg, hg, counts, pos):
        M, Ap, d = xg0.shape
        if x_init is not None:
            flat = lambda t: t.reshape(M * Ap, d)  # noqa: E731
            return start_point(flat(xg0), flat(lg), flat(hg), eps, sw.norm, None,
                               x_init=flat(_gather_rows(x_init, pos))).reshape(M, Ap, d)
        xs = xg0.clone()
        if sw.random_start:
            for m in range(M):
                n = int(counts[m])
                if n:
                    xs[m, :n] = random_start(xg0[m, :n], lg[m, :n], hg[m, :n], eps, sw.norm, gens[m])
        return xs
    return start


def _stacked_sweep(grad: StackedGradient, xs, ys, sw: Sweep, seed: int, mb: int, counters):
    """The ascending sweep of pgd_sweep for M stacked models, chunk by chunk (eps as sorted in ``sw``).
    Returns clean (M, N), robust (E, M, N), x_adv (E, M, N, d), broken_step (E, M, N)."""
    M, N, dev = grad.M, xs[0].shape[0], xs[0].device
    X = torch.stack([x.detach().reshape(N, -1) for x in xs])           # (M, N, d)
    Y = torch.stack([y.to(dev) for y in ys])                            # (M, N)
    E = len(sw.eps)
    chunk = max(1, mb // M)
    with torch.no_grad():
        pred = torch.cat([grad.F(X[:, s:s + chunk].reshape(M, -1, *grad.shape)).argmax(2) for s in range(0, N, chunk)],
                         1)
    counters["fwd_rows"] += M * N
    clean = pred == Y
    robust = torch.zeros(E, M, N, dtype=torch.bool, device=dev)
    x_adv = X.unsqueeze(0).repeat(E, 1, 1, 1)
    brk_all = torch.full((E, M, N), -1, dtype=torch.long, device=dev)
    for s in range(0, N, chunk):
        sl = slice(s, min(N, s + chunk))
        gens = []
        for _ in range(M):  # seeded as pgd_sweep seeds its chunk: the same random starts per model
            g = torch.Generator(device=dev)
            g.manual_seed(int(seed) * 1_000_003 + s)
            gens.append(g)
        x0, y = X[:, sl], Y[:, sl]
        alive = clean[:, sl].clone()
        x_last, k_prev = None, 0
        for k, e in enumerate(sw.eps):
            if bool(alive.any()) and e > 0:
                lo, hi = box_bounds(x0, e, sw.norm)
                for r in range(sw.restarts):
                    init = None
                    if r == 0 and sw.warm_start and x_last is not None:  # stretched to the new radius, as pgd_sweep
                        init = x0 + (x_last - x0) * (e / sw.eps[k_prev])
                    b, xo, st = _stacked_run(grad, sw.ascent(k, counters), x0, y, lo, hi, alive, e,
                                             _starts(sw, e, gens, init))
                    x_last, k_prev = xo, k
                    if bool(b.any()):
                        for k2 in range(k, E):  # broken here: broken (same example) at every larger eps
                            x_adv[k2, :, sl][b] = xo[b]
                        brk_all[k, :, sl][b] = st[b]
                    alive = alive & ~b
                    if r == sw.restarts - 1 or not bool(alive.any()):
                        x_adv[k, :, sl][alive] = xo[alive]
                        break
            robust[k, :, sl] = alive
    return clean, robust, x_adv, brk_all


def _probe(models, F_, x, y, rows, loss):
    """Seconds for one gradient step of each layout on ``rows`` points per model (best of 2)."""
    M = len(models)
    xr = x[:rows].detach()
    yr = y[:rows]
    dev = xr.device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def seq():
        for m in models:
            xx = xr.clone().requires_grad_(True)
            z = m(xx)
            torch.autograd.grad(attack_loss(z, yr, loss).sum(), xx)

    X = xr.unsqueeze(0).expand(M, *xr.shape).contiguous()
    Y = yr.unsqueeze(0).expand(M, -1).reshape(-1)

    def stk():
        xx = X.clone().requires_grad_(True)
        z = F_(xx)
        torch.autograd.grad(attack_loss(z.reshape(-1, z.shape[-1]), Y, loss).sum(), xx)

    out = {}
    for name, fn in (("sequential", seq), ("stacked", stk)):
        best = float("inf")
        for _ in range(3):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        out[name] = best
    return out


def pgd_sweep_multi(models: Sequence[torch.nn.Module], x, y, eps, *, norm: str = "Linf", steps: int = 100,
                    step_size=None, restarts: int = 1, loss: str = "ce", random_start: bool = True, seed: int = 0,
                    max_batch: int | None = None, layout: str = "auto", warm_start: bool = True,
                    log: Callable[[str], None] | None = None) -> MultiResult:
    """:func:`pgd_sweep` for several models of one architecture. x, y: shared tensors or one per model.

    layout: "auto" (probe both, take the faster), "stacked" or "sequential". Returns a MultiResult whose
    ``results[m]`` equals what ``pgd_sweep(models[m], ...)`` returns and whose info says which layout ran and why.
    """
    check_norm(norm)
    check_loss(loss)
    if layout not in LAYOUTS:
        raise AttackError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    models = list(models)
    M = len(models)
    if M == 0:
        raise AttackError("no models given")
    xs, ys = _as_list(x, M, "x"), _as_list(y, M, "y")
    N = xs[0].shape[0]
    if any(t.shape != xs[0].shape for t in xs) or any(t.shape[0] != N for t in ys):
        raise AttackError("all models need the same number of points of the same shape")
    eps_list, alphas = eps_and_step_sizes(eps, step_size, steps, norm)
    t0 = time.perf_counter()
    info: dict = {"models": M, "points": N}
    with ExitStack() as modes:
        for m in models:
            modes.enter_context(eval_mode(m))
        F_ = None
        chosen = layout
        if layout != "sequential" and M > 1:
            try:
                F_ = stack_models(models)
            except Exception as exc:  # noqa: BLE001 - not stackable: fall back, say why
                if layout == "stacked":
                    raise
                chosen, info["reason"] = "sequential", f"models not stackable: {exc}"
        elif M == 1:
            chosen, info["reason"] = "sequential", "one model"
        if chosen == "auto":
            per_model = int(max_batch) // M if max_batch else auto_max_batch(models[0], xs[0], N)
            rows = max(1, min(N, per_model))
            pr = _probe(models, F_, xs[0], ys[0], rows, loss)
            chosen = "stacked" if pr["stacked"] < pr["sequential"] else "sequential"
            info["probe_seconds"] = pr
            info["reason"] = (f"probe on {rows} points x {M} models: stacked {pr['stacked'] * 1e3:.2f} ms vs "
                              f"sequential {pr['sequential'] * 1e3:.2f} ms per step")
        elif "reason" not in info:
            info["reason"] = f"layout={layout} requested"
        info["layout"] = chosen
        if F_ is not None:
            info["stack_kind"] = getattr(F_, "kind", "vmap")
        if log:
            log(f"pgd multi-model: {chosen} ({info['reason']})")
        if chosen == "sequential":
            results = [pgd_sweep(m, xs[i], ys[i], eps_list, norm=norm, steps=steps, step_size=alphas,
                                 restarts=restarts, loss=loss, random_start=random_start, seed=seed,
                                 max_batch=max_batch, schedule="sequential", warm_start=warm_start, log=log)
                       for i, m in enumerate(models)]
        else:
            counters = {"grad_rows": 0, "fwd_rows": 0}
            mb = Backoff(int(max_batch) if max_batch else M * auto_max_batch(models[0], xs[0], N), floor=M)
            order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
            inv = sorted(range(len(order)), key=lambda j: order[j])  # sorted position of each given eps
            sweep = Sweep(eps=[eps_list[i] for i in order], alphas=[alphas[i] for i in order], norm=norm,
                          steps=int(steps), restarts=int(restarts), random_start=bool(random_start),
                          warm_start=bool(warm_start))
            shape = tuple(xs[0].shape[1:])
            grad = StackedGradient(F_, M, shape, loss)
            clean, robust, x_adv, brk = mb.run(lambda b: _stacked_sweep(grad, xs, ys, sweep, seed, b, counters))
            robust, x_adv, brk = robust[inv], x_adv[inv], brk[inv]
            secs = time.perf_counter() - t0
            results = []
            for m in range(M):
                results.append(PGDResult(robust=robust[:, m].clone(), x_adv=x_adv[:, m].reshape(len(eps_list), N,
                                                                                                   *shape),
                                         info={"eps": eps_list, "norm": norm, "steps": int(steps),
                                               "step_size": [describe_step(a) for a in alphas],
                                               "restarts": int(restarts), "loss": loss,
                                               "random_start": bool(random_start), "seed": int(seed),
                                               "clean": clean[m], "broken_step": brk[:, m],
                                               "max_batch": mb.batch, "oom_backoffs": mb.ooms, "schedule": "stacked",
                                               "seconds": secs}))
            info["grad_rows"], info["fwd_rows"] = counters["grad_rows"], counters["fwd_rows"]
    info["seconds"] = time.perf_counter() - t0
    return MultiResult(results=results, info=info)


__all__ = ["pgd_sweep_multi", "stack_models", "MultiResult", "LAYOUTS"]
