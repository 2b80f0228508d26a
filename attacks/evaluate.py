"""robust_eval: what the runner calls per cell (clean, PGD sweep, AutoAttack on PGD survivors, worst case)."""
from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

from lawbench.base.modes import eval_mode

from .cost import Passes, counted
from .autoattack import MASKING_FLAGS, MASKING_SQUARE_RESTARTS  # noqa: F401  (re-exported)
from .pgd import AttackError, check_norm, pgd_sweep
from .randomized import Randomized, is_randomized, randomized
from .threat import ce_saturated, check_attack, check_record


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


@dataclass(frozen=True)
class SuiteStep:
    """One attack the suite runs after the PGD sweep, on the points nothing broke yet: a registry name (or
    "autoattack", the original AutoAttack; options {"version": ...}), the eps it runs at, and its options."""
    name: str
    eps: tuple
    options: dict = field(default_factory=dict)

    @property
    def verifies(self) -> bool:
        """AutoAttack grade: the attack is (registry's AttackEntry.verifies), and an AutoAttack run is a whole version
        (standard or plus), not a custom list of its attacks."""
        from .registry import attack_entry
        return attack_entry(self.name).verifies and isinstance(self.options.get("version", "standard"), str)


def robust_eval(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: Sequence[float],
                steps: int, restarts: int, step_size: float | None = None,
                autoattack: str | Sequence[str] = "standard", aa_eps: Sequence[float] | None = None,
                seed: int = 0, log: Callable[[str], None] | None = None, loss: str = "ce",
                max_batch: int | None = None, aa_batch_size: int = 1000,
                aa_phase: Callable[[int], ContextManager] | None = None, pgd: bool = True,
                suite: Sequence[SuiteStep] | None = None) -> RobustEval:
    """Evaluate one model: clean mask, PGD over the ascending eps sweep (unless pgd=False), then each attack of
    ``suite`` in order on the points nothing broke yet, per-point worst case over all attacks.

    suite: None means AutoAttack (``autoattack``: "standard" | "plus" | "off" | a list of pyautoattack attack names)
    at ``aa_eps`` (a subset of eps; None: the largest eps).
    aa_phase: called with the number of points an attack after PGD gets; the context it returns wraps that run
    (the runner sets its thread count there: a few dozen points run faster on one thread).
    info["breaks"][eps][name]: the points each attack broke first; they add up to the drop from clean to robust.
    """
    check_norm(norm)
    eps_list = [float(e) for e in eps]
    if not eps_list:
        raise AttackError("eps list is empty")
    if suite is None:
        off = autoattack == "off" or autoattack is None
        suite = [] if off else [SuiteStep("autoattack", tuple([max(eps_list)] if aa_eps is None else aa_eps),
                                          {"version": autoattack})]
    suite = [SuiteStep(s.name, tuple(_on_sweep(s.eps, eps_list, s.name)), dict(s.options)) for s in suite]
    with eval_mode(model):
        target, flags = _as_attacked(model, x, log)
        target, counter = counted(target)  # every stage's forward and backward passes, in rows
        t0 = time.perf_counter()
        clean, pgd_robust, x_adv, checks, pgd_info = _pgd_stage(target, x, y, eps_list, norm, steps, restarts,
                                                                step_size, loss, seed, max_batch, log, pgd)
        t_pgd = time.perf_counter() - t0
        passes = {"pgd": {"all": counter.passes.as_dict()}} if pgd else {}
        flags |= saturation_flags(target, x, y, clean, max_batch)
        robust = {e: v.clone() for e, v in pgd_robust.items()}
        breaks = {e: ({"pgd": int((clean & ~pgd_robust[e]).sum())} if pgd else {}) for e in eps_list}
        state = _SuiteState(target, x, y, norm, eps_list, robust, x_adv, checks, breaks, seed, log, aa_phase,
                            aa_batch_size, counter, passes)
        state.flags |= flags
        for step in suite:
            state.run(step)
    verified = {e: bool(state.verified.get(e)) or not bool(robust[e].any()) for e in eps_list}
    info = {
        "verified": verified,
        "randomized": ({"eot": target.eot, "votes": target.votes} if isinstance(target, Randomized) else None),
        "pgd": pgd_info,
        "autoattack": state.aa_info,
        "aa_eps": sorted(state.aa_robust),
        "check": checks,
        "reattacked": {e: sum(c.get("reattacked", 0) for c in checks[e].values()) for e in eps_list},
        "n": int(x.shape[0]),
        "breaks": breaks,
        "suite": (["pgd"] if pgd else []) + [s.name for s in suite],
        "seconds": {**({"pgd": t_pgd} if pgd else {}), **state.seconds},
        "settings": {s.name: s.options for s in suite},
        "passes": state.passes,
        "details": state.details,
        "indicators": state.indicators,
    }
    t_aa = state.seconds.get("autoattack", 0.0)
    timings = {"pgd": t_pgd, "autoattack": t_aa}
    return RobustEval(clean=clean, pgd_robust=pgd_robust, aa_robust=state.aa_robust, robust=robust, x_adv=x_adv,
                      aa_flags=sorted(state.flags), timings=timings, info=info)


# at least this share of the clean-correct points with a saturated softmax raises `softmax_saturated`
SATURATION_SHARE = 0.5


def _as_attacked(model, x, log):
    """(the model as every attack sees it, flags): a randomized model (two eval forwards differ) is wrapped for
    majority verdicts and EOT gradients (attacks.randomized) before any stage runs, so every budget is chosen
    knowing it."""
    if not is_randomized(model, x):
        return model, set()
    wrapped = randomized(model)
    if log:
        log(f"randomized model: verdicts by the majority of {wrapped.votes} draws, gradients averaged over "
            f"{wrapped.eot} draws (EOT)")
    return wrapped, {"randomized"}


@torch.no_grad()
def saturation_flags(model, x, y, clean, batch=None) -> set:
    """{"softmax_saturated"} when most clean-correct points have a softmax saturated at their label
    (attacks.threat.ce_saturated: cross-entropy has no gradient there; every PGD row there ascends the margin)."""
    idx = clean.nonzero().flatten()
    if idx.numel() == 0:
        return set()
    b = idx.numel() if not batch else int(batch)
    sat = sum(int(ce_saturated(model(x[idx[s:s + b]]), y[idx[s:s + b]]).sum()) for s in range(0, idx.numel(), b))
    return {"softmax_saturated"} if sat >= SATURATION_SHARE * idx.numel() else set()


def _on_sweep(eps, eps_list, name) -> list:
    """An attack's eps, each matched to the sweep's own value (an attack runs only where robust accuracy is
    reported)."""
    out = []
    for e in eps:
        near = min(eps_list, key=lambda f: abs(f - float(e)))
        if abs(near - float(e)) > 1e-12:
            raise AttackError(f"{name}: eps {float(e):g} not in the eps sweep {eps_list}")
        out.append(near)
    return sorted(set(out))


def _pgd_stage(model, x, y, eps_list, norm, steps, restarts, step_size, loss, seed, max_batch, log, pgd):
    """The PGD sweep with every example validated; without PGD, nothing is broken yet (robust = clean)."""
    if not pgd:
        from .threat import misclassified
        clean = ~misclassified(model, x, y, max_batch)
        return (clean, {e: clean.clone() for e in eps_list}, {e: x.detach().clone() for e in eps_list},
                {e: {} for e in eps_list}, {})
    if log:
        log(f"pgd: {norm} eps={eps_list} steps={steps} restarts={restarts} on {x.shape[0]} points")
    pr = pgd_sweep(model, x, y, eps_list, norm=norm, steps=steps, step_size=step_size, restarts=restarts,
                   loss=loss, seed=seed, max_batch=max_batch, log=log)
    pgd_robust, x_adv, checks = {}, {}, {}

    def rerun(idx, ek, k):
        return pgd_sweep(model, x[idx], y[idx], [ek], norm=norm, steps=steps, step_size=step_size,
                         restarts=restarts, loss=loss, seed=seed + k, max_batch=max_batch).x_adv[0]

    for i, e in enumerate(eps_list):  # the one validation path, for our own examples too
        ck = check_attack(model, x, y, pr.x_adv[i], e, norm, rerun=rerun, batch=max_batch, log=log)
        pgd_robust[e], x_adv[e] = ~ck.broken, ck.x_adv
        checks[e] = {"pgd": ck.info}
    _monotone(eps_list, pgd_robust, x_adv)
    return pr.info["clean"], pgd_robust, x_adv, checks, {k: v for k, v in pr.info.items()
                                                         if k not in ("clean", "broken_step")}


class _SuiteState:
    """What the attacks after PGD share: per eps the points still robust and their examples, which attack broke
    what first, AutoAttack's own records, and each attack's time."""

    def __init__(self, model, x, y, norm, eps_list, robust, x_adv, checks, breaks, seed, log, phase, aa_batch,
                 counter, passes):
        self.model, self.x, self.y, self.norm, self.eps_list = model, x, y, norm, eps_list
        self.robust, self.x_adv, self.checks, self.breaks = robust, x_adv, checks, breaks
        self.seed, self.log, self.phase, self.aa_batch = seed, log, phase or _no_context, aa_batch
        self.aa_robust: dict = {}
        self.aa_info: dict = {}
        self.flags: set = set()
        self.seconds: dict = {}
        self.details: dict = {}
        self.verified: dict = {}  # eps -> an AutoAttack-grade attack ran on every point still standing there
        self.counter = counter    # attacks.cost.Counted around the model every stage attacks
        self.passes = passes      # stage -> eps -> {"forward", "backward"} rows through the model
        self.indicators: dict = {}  # eps -> indicators of attack failure (attacks.indicators), where measured

    def run(self, step: SuiteStep) -> None:
        """One attack of the suite at each of its eps, on the points nothing broke yet, through the registry (the one
        door for every attack, AutoAttack included)."""
        from .registry import attack_entry
        entry = attack_entry(step.name)
        t0 = time.perf_counter()
        for e in step.eps:
            self.verified[e] = self.verified.get(e, False) or step.verifies
            idx = torch.nonzero(self.robust[e]).flatten()
            if self.log:
                self.log(f"{step.name}: {step.options.get('version', '')} {self.norm} eps={e} on {idx.numel()} "
                         f"points nothing broke yet".replace(":  ", ": "))
            info = {"attacks": [], "n_attacked": 0, "broken": 0, "masking_restarts": {}}
            if idx.numel() == 0:  # nothing left to attack at this eps
                self._record(step.name, e, idx, torch.zeros(0, dtype=torch.bool, device=self.x.device), self.x[:0])
            else:
                before = Passes(**self.counter.passes.as_dict())
                with self.phase(idx.numel()):
                    still, examples, info = self._attack(step, entry, idx, e)
                self.passes.setdefault(step.name, {})[e] = (self.counter.passes - before).as_dict()
                self._record(step.name, e, idx, still, examples)
            if entry.autoattack_stage:  # robustness after the AutoAttack stage (robust_acc <= autoattack_acc)
                self.aa_robust[e] = self.robust[e].clone()
                self.aa_info[e] = {k: v for k, v in info.items() if k != "flags"}
        self.seconds[step.name] = self.seconds.get(step.name, 0.0) + time.perf_counter() - t0

    def _record(self, name, e, idx, still, examples) -> None:
        broke = idx[~still]
        for f in self.eps_list:  # monotone: an example inside the eps-ball lies in every larger ball
            if f >= e and broke.numel():
                newly = broke[self.robust[f][broke]]
                self.robust[f][newly] = False
                self.x_adv[f][newly] = examples[~still][robust_mask_positions(broke, newly)]
                self.breaks[f][name] = self.breaks[f].get(name, 0) + int(newly.numel())
            elif f >= e:
                self.breaks[f].setdefault(name, 0)

    def _attack(self, step, entry, idx, e):
        """(still robust, examples, the attack's info) on the points idx at e. Every attack's examples go through
        the one check here (re-attacked at a smaller eps where projection undoes them), whatever the attack says of
        itself: its verdict and its own check record are never read as evidence."""
        from .registry import Attack
        options = {k: v for k, v in step.options.items() if k != "eps"}
        accepted = inspect.signature(entry.factory).parameters
        for key, value in (("batch_size", self.aa_batch), ("n_total", self.x.shape[0])):
            if key in accepted:
                options.setdefault(key, value)
        if "evidence" in accepted:
            options["evidence"] = self.evidence(e)
        attack = Attack(entry, options)
        x, y = self.x[idx], self.y[idx]
        out = attack.run(self.model, x, y, e, norm=self.norm, seed=self.seed, log=self.log)
        self.flags.update(out.info.get("flags", []))
        if "stages" in out.info:  # a suite's own account of its stages
            self.details.setdefault(step.name, {})[e] = out.info["stages"]
        if isinstance(out.info.get("indicators"), dict):
            self.indicators[e] = out.info["indicators"]
        rerun = lambda j, ek, k: attack.run(self.model, x[j], y[j], ek, norm=self.norm,  # noqa: E731
                                             seed=self.seed + k).x_adv
        ck = check_attack(self.model, x, y, out.x_adv, e, self.norm, rerun=rerun, log=self.log)
        self.checks[e][step.name] = check_record(out.info.get("check"), ck.info)
        return ~ck.broken, ck.x_adv, out.info


    def evidence(self, e) -> dict:
        """What the suite knows at eps e, for an attack that reads it (the adaptive stage): the flags raised so far,
        each attack's check record, the points black-box Square broke after the white-box attacks, the size of the
        evaluation set."""
        square = 0
        aa = self.aa_info.get(e) or {}
        square += int((aa.get("broken_by") or {}).get("square", 0)) + int(
            (aa.get("masking_restarts") or {}).get("broken", 0))
        fast = (self.details.get("fast") or {}).get(e) or {}
        square += int((fast.get("square") or {}).get("broke", 0))
        return {"flags": sorted(self.flags), "checks": dict(self.checks[e]), "square_after_whitebox": square,
                "n_total": int(self.x.shape[0])}


def _no_context(n_points: int) -> ContextManager:
    return nullcontext()


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
