"""AutoAttack on our own engine ("native"): the standard version's attacks in the original's order, each on the points
still robust, with targets and restarts as rows (attacks.apgd, attacks.fab, attacks.square), every pass counted
(attacks.cost), and the original's checks on the model raised as the same warnings.

    standard: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), one restart each;
    rand:     APGD-CE and APGD-DLR with EOT 20 (a randomized model; its verdicts by majority vote);
    a list:   these attacks with the standard settings, in the order given.

The plus version and untargeted FAB are not part of the engine: attacks.autoattack runs them with the original.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .apgd import APGDConfig, apgd, rank_by_logit
from .cost import Passes
from .fab import FABConfig, fab_targeted
from .randomized import EOT_DRAWS, Randomized
from .rows import Found
from .square import SquareConfig, square

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND = ("apgd-ce", "apgd-dlr")


@dataclass
class Attempt:
    """What every native attack is called with: the points, the threat, and the run's settings."""
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    norm: str
    seed: int
    n_target_classes: int      # targets of APGD-T and FAB-T (at most C - 1)
    square: SquareConfig       # Square's budget (and its discarding)
    square_view: object        # (net, xi, back) for vector data, None for images
    warnings: list


@dataclass(frozen=True)
class NativeAttack:
    """One attack of the engine: the fewest classes it runs with (the original skips it below that; the DLR losses
    need their sorted logits) and how it runs on the points not yet broken in ``found``."""
    min_classes: int
    run: Callable[[Attempt, Found], None]


def _untargeted(loss: str) -> Callable[[Attempt, Found], None]:
    """APGD on an untargeted loss (ce, dlr), with EOT on a randomized model."""
    def run(a: Attempt, found: Found) -> None:
        rand = isinstance(a.model, Randomized)  # the rand version: rows run their whole budget (APGDConfig.run_on)
        apgd(a.model, a.x, a.y, a.eps, a.norm, APGDConfig(loss=loss, eot=a.model.eot if rand else 1, run_on=rand),
             seed=a.seed, found=found, warnings=a.warnings)
    return run


def _apgd_t(a: Attempt, found: Found) -> None:
    apgd(a.model, a.x, a.y, a.eps, a.norm, APGDConfig(loss="dlr-targeted"), seed=a.seed,
         targets=rank_by_logit(a.model, a.x, a.y, a.n_target_classes), found=found, warnings=a.warnings)


def _fab_t(a: Attempt, found: Found) -> None:
    fab_targeted(a.model, a.x, a.y, a.eps, a.norm, rank_by_logit(a.model, a.x, a.y, a.n_target_classes),
                 FABConfig(), found=found)


def _square(a: Attempt, found: Found) -> None:
    """Square on image data as is; vector data through its image view, the found examples mapped back."""
    cfg = a.square
    if a.square_view is None:
        square(a.model, a.x, a.y, a.eps, a.norm, cfg, seed=a.seed, found=found)
        return
    net, xi, back = a.square_view
    sub = Found(found.broken.clone(), xi.detach().clone())
    before = sub.broken.clone()
    square(net, xi, a.y, a.eps, a.norm, cfg, seed=a.seed, found=sub)
    new = sub.broken & ~before
    if bool(new.any()):
        found.x_adv[new] = back(sub.x_adv[new]).to(found.x_adv.dtype)
        found.broken |= new


# The engine's attacks: one call signature, each one's class-count rule declared here and read everywhere
NATIVE = {"apgd-ce": NativeAttack(2, _untargeted("ce")), "apgd-dlr": NativeAttack(3, _untargeted("dlr")),
          "apgd-t": NativeAttack(4, _apgd_t), "fab-t": NativeAttack(2, _fab_t), "square": NativeAttack(2, _square)}
NATIVE_ATTACKS = tuple(NATIVE)


@dataclass
class NativeRun:
    """x_raw: examples like x (unbroken points: x itself); broken (N,); per attack: points it broke, passes it spent
    and seconds; warnings as the original words them (attacks.autoattack turns them into flags and adds Square's own
    check against the whole evaluation set)."""

    x_raw: torch.Tensor
    broken: torch.Tensor
    attacks: list
    broken_by: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def run_native(model, counter, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, attacks, *, seed: int = 0,
               n_target_classes: int = 9, square: SquareConfig = SquareConfig(), square_view=None,
               log=None) -> NativeRun:
    """The attacks in order on (x, y) at eps. ``model``: what the attacks call (eval mode, frozen; a Randomized
    wrapper for the rand protocol); ``counter``: its attacks.cost.Counted. ``square_view``: (net, xi, back) showing
    vector data to Square as images (attacks.autoattack.aa_view), None for image data."""
    n = x.shape[0]
    warnings = checks(model, x, y, attacks, n_target_classes)
    with torch.no_grad():
        z = model(x)
    C = z.shape[1]
    found = Found.start(x, z.argmax(1) != y)   # clean-misclassified points need no attack: x itself
    run = NativeRun(found.x_adv, found.broken, list(attacks), warnings=warnings)
    attempt = Attempt(model, x, y, eps, norm, seed, max(1, min(n_target_classes, C - 1)), square, square_view,
                      warnings)
    for name in attacks:
        if bool(found.broken.all()):
            break
        if C < NATIVE[name].min_classes:
            continue
        before, t0, was = Passes(counter.passes.forward, counter.passes.backward), time.perf_counter(), \
            int(found.broken.sum())
        NATIVE[name].run(attempt, found)
        run.broken_by[name] = int(found.broken.sum()) - was
        run.passes[name] = (counter.passes - before).as_dict()
        run.seconds[name] = round(time.perf_counter() - t0, 4)
        if log:
            log(f"{name}: broke {run.broken_by[name]} of {n - was} in {run.seconds[name]:.2f} s "
                f"({run.passes[name]['forward']} forward, {run.passes[name]['backward']} backward passes)")
    run.x_raw, run.broken = found.x_adv, found.broken
    return run


# --------------------------------------------------------------------------------------------- the original's checks

def checks(model, x, y, attacks, n_target_classes: int) -> list[str]:
    """The warnings pyautoattack raises before it attacks, worded as it words them: a randomized model (outside the
    rand protocol), probabilities instead of logits, a forward that calls backward, too few classes."""
    out = []
    xs, ys = x[:250], y[:250]
    if not isinstance(model, Randomized) and _randomized(model, xs):
        out.append('it seems to be a randomized defense! Please use version="rand".')
    with torch.no_grad():
        z = model(xs)
    if bool(z.max() < 1 + 1e-5) and bool(z.min() > -1e-5) and bool(((z.sum(-1) - 1).abs() < 1e-5).all()):
        out.append("it seems that the output is a probability distribution, please be sure that the logits are used!")
    if _dynamic(model, xs):
        out.append("it seems to be a dynamic defense! The evaluation with AutoAttack might be insufficient.")
    C = z.shape[1]
    if ("apgd-dlr" in attacks or "apgd-t" in attacks) and C <= 3:
        out.append(f"with only {C} classes it is not possible to use the {'targeted ' if C == 3 else ''}DLR loss!")
    if ("apgd-t" in attacks or "fab-t" in attacks) and n_target_classes + 1 > C:
        out.append(f"it seems that more target classes ({n_target_classes}) than possible ({C - 1}) are used!")
    return out


def _randomized(model, x, draws: int = 5, tol: float = 1e-4) -> bool:
    with torch.no_grad():
        outs = [model(x) for _ in range(draws)]
    preds = [o.argmax(1) for o in outs]
    normed = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    if any(bool((p != preds[0]).any()) for p in preds):
        return True
    return max(float((a - b).norm(dim=1).max()) for i, a in enumerate(normed) for b in normed[i + 1:]) > tol


def _dynamic(model, x) -> bool:
    """The forward pass calls autograd (backward or grad): a defense that adapts at test time."""
    seen = []

    def trace(frame, event, arg):
        if event == "call" and frame.f_code.co_name in ("grad", "backward", "_make_grads"):
            seen.append(frame.f_code.co_name)
        return None

    old = sys.gettrace()
    sys.settrace(trace)
    try:
        with torch.no_grad():
            model(x)
    finally:
        sys.settrace(old)
    return bool(seen)
