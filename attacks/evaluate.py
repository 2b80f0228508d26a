"""robust_eval: what the runner calls per cell (clean, PGD sweep, AutoAttack on PGD survivors, worst case)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

from .autoattack import run_autoattack
from .pgd import AttackError, check_norm, pgd_sweep
from .threat import check_attack


@dataclass
class RobustEval:
    """clean: Bool (N,); pgd_robust / aa_robust / robust: {eps: Bool (N,)}; x_adv: {eps: Tensor like x};
    aa_flags: sorted unique flags; timings: {"pgd": s, "autoattack": s}; info: details (per-eps counts, PGD and
    AutoAttack info, AutoAttack breaks per attack).

    aa_robust[e] is robustness after the AutoAttack stage of the pipeline: AutoAttack ran only on the points PGD
    did not break (and that no attack broke at a smaller eps), so aa_robust[e] == robust[e] for e in aa_eps.
    robust[e] is the per-point worst case over every attack run at e or at any smaller eps of the sweep (an
    example found inside a smaller ball lies inside the larger one)."""

    clean: torch.Tensor
    pgd_robust: dict
    aa_robust: dict
    robust: dict
    x_adv: dict
    aa_flags: list
    timings: dict
    info: dict = field(default_factory=dict)

    def accuracy(self) -> dict:
        n = max(1, self.clean.numel())
        return {
            "clean": float(self.clean.sum()) / n,
            "pgd": {e: float(v.sum()) / n for e, v in self.pgd_robust.items()},
            "autoattack": {e: float(v.sum()) / n for e, v in self.aa_robust.items()},
            "robust": {e: float(v.sum()) / n for e, v in self.robust.items()},
        }


def robust_eval(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: Sequence[float],
                steps: int, restarts: int, step_size: float | None = None,
                autoattack: str | Sequence[str] = "standard", aa_eps: Sequence[float] | None = None,
                seed: int = 0, log: Callable[[str], None] | None = None, loss: str = "ce",
                max_batch: int | None = None, aa_batch_size: int = 1000,
                aa_phase: Callable[[int], ContextManager] | None = None) -> RobustEval:
    """Evaluate one model: clean mask, PGD over the ascending eps sweep, AutoAttack at ``aa_eps`` on the points PGD
    did not break, per-point worst case over all attacks.

    autoattack: "standard" | "plus" | "off" | list of pyautoattack attack names.
    aa_eps: the eps values (a subset of eps) at which AutoAttack runs; None means the largest eps.
    aa_phase: called with the number of points AutoAttack gets; the context it returns wraps that AutoAttack run
    (the runner sets its thread count there: a few dozen points run faster on one thread).
    """
    check_norm(norm)
    eps_list = [float(e) for e in eps]
    if not eps_list:
        raise AttackError("eps list is empty")
    if autoattack == "off" or autoattack is None:
        aa_list: list[float] = []
    else:
        aa_list = [max(eps_list)] if aa_eps is None else [float(e) for e in aa_eps]
        missing = [e for e in aa_list if not any(abs(e - f) <= 1e-12 for f in eps_list)]
        if missing:
            raise AttackError(f"aa_eps {missing} not in the eps sweep {eps_list}")
        aa_list = sorted({min(eps_list, key=lambda f: abs(f - e)) for e in aa_list})
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        if log:
            log(f"pgd: {norm} eps={eps_list} steps={steps} restarts={restarts} on {x.shape[0]} points")
        pr = pgd_sweep(model, x, y, eps_list, norm=norm, steps=steps, step_size=step_size, restarts=restarts,
                       loss=loss, seed=seed, max_batch=max_batch, log=log)
        clean = pr.info["clean"]
        pgd_robust, x_adv, checks = {}, {}, {}

        def rerun(idx, ek, k):
            return pgd_sweep(model, x[idx], y[idx], [ek], norm=norm, steps=steps, step_size=step_size,
                             restarts=restarts, loss=loss, seed=seed + k, max_batch=max_batch).x_adv[0]

        for i, e in enumerate(eps_list):  # the one validation path, for our own examples too
            ck = check_attack(model, x, y, pr.x_adv[i], e, norm, rerun=rerun, batch=max_batch, log=log)
            pgd_robust[e], x_adv[e] = ~ck.broken, ck.x_adv
            checks[e] = {"pgd": ck.info}
        _monotone(eps_list, pgd_robust, x_adv)
        t_pgd = time.perf_counter() - t0
        robust = {e: v.clone() for e, v in pgd_robust.items()}
        aa_robust: dict = {}
        flags: set = set()
        aa_info: dict = {}
        t1 = time.perf_counter()
        for e in aa_list:
            idx = torch.nonzero(robust[e]).flatten()
            if log:
                log(f"autoattack: {autoattack} {norm} eps={e} on {idx.numel()} points PGD did not break")
            with (aa_phase or _no_context)(idx.numel()):
                res = run_autoattack(model, x[idx], y[idx], e, norm=norm, version=autoattack, seed=seed,
                                     batch_size=aa_batch_size, log=log, n_total=x.shape[0])
                extra = _masking_restarts(model, x[idx], y[idx], e, norm, res, seed, aa_batch_size, log)
            flags.update(res.flags)
            broke = idx[~res.robust]
            for f in eps_list:  # monotone: an example inside the eps-ball lies in every larger ball
                if f >= e and broke.numel():
                    newly = broke[robust[f][broke]]
                    robust[f][newly] = False
                    x_adv[f][newly] = res.x_adv[~res.robust][robust_mask_positions(broke, newly)]
            aa_robust[e] = robust[e].clone()
            aa_info[e] = {k: v for k, v in res.info.items()}
            aa_info[e]["broken"] = int(broke.numel())
            aa_info[e]["masking_restarts"] = extra
            checks[e]["autoattack"] = res.info.get("check", {})
        t_aa = time.perf_counter() - t1
    finally:
        model.train(was_training)
    info = {
        "pgd": {k: v for k, v in pr.info.items() if k not in ("clean", "broken_step")},
        "autoattack": aa_info,
        "aa_eps": aa_list,
        "check": checks,
        "reattacked": {e: sum(c.get("reattacked", 0) for c in checks[e].values()) for e in eps_list},
        "n": int(x.shape[0]),
    }
    return RobustEval(clean=clean, pgd_robust=pgd_robust, aa_robust=aa_robust, robust=robust, x_adv=x_adv,
                      aa_flags=sorted(flags), timings={"pgd": t_pgd, "autoattack": t_aa}, info=info)


def _no_context(n_points: int) -> ContextManager:
    return nullcontext()


# pyautoattack's own advice when these flags appear: run Square with more restarts
MASKING_FLAGS = ("zero_gradients", "square_beats_whitebox", "randomized")
MASKING_SQUARE_RESTARTS = 2


def _masking_restarts(model, x, y, eps, norm, res, seed, batch_size, log) -> dict:
    """Where AutoAttack saw signs of gradient masking, gradient-based attacks cannot be trusted on the survivors:
    Square (black box) runs again with other seeds on them, so the pipeline does strictly more than AutoAttack
    alone on every point it calls robust. Updates ``res`` in place; returns what it did."""
    done = {"restarts": 0, "broken": 0}
    if not set(res.flags) & set(MASKING_FLAGS) or "square" not in res.info.get("attacks", ()):
        return done
    for k in range(1, MASKING_SQUARE_RESTARTS + 1):
        alive = res.robust.nonzero().flatten()
        if alive.numel() == 0:
            break
        if log:
            log(f"autoattack flags {res.flags}: Square restart {k} on {alive.numel()} survivors")
        sq = run_autoattack(model, x[alive], y[alive], eps, norm=norm, version=["square"], seed=seed + 1000 * k,
                            batch_size=batch_size, log=log)
        got = alive[~sq.robust]
        res.robust[got] = False
        res.x_adv[got] = sq.x_adv[~sq.robust]
        done["restarts"] += 1
        done["broken"] += int(got.numel())
    return done


def _monotone(eps_list, robust: dict, x_adv: dict) -> None:
    """A point broken at eps (a valid example inside that ball) is broken, with that example, at every larger eps."""
    order = sorted(eps_list)
    for a, b in zip(order, order[1:]):
        carry = ~robust[a] & robust[b]
        if bool(carry.any()):
            robust[b][carry] = False
            x_adv[b][carry] = x_adv[a][carry]


def robust_mask_positions(broke: torch.Tensor, newly: torch.Tensor) -> torch.Tensor:
    """Positions in ``broke`` of the entries of ``newly`` (a subset of broke, same order)."""
    if newly.numel() == broke.numel():
        return torch.arange(broke.numel(), device=broke.device)
    return torch.isin(broke, newly).nonzero().flatten()
