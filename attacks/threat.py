"""The threat model: the exact eps ball, projection into it, the one check every attack's output goes through, and
the pieces every PGD-style ascent is made of (its loss, random start and step rule).

The ball is exact: ``x`` lies in it when ``|x - x0| <= eps`` (Linf, every coordinate) or ``||x - x0||_2 <= eps``
(L2), computed in float64 from the stored values (the difference of two float32 numbers is exact in float64), and
every coordinate lies in [0, 1]. An attack's example counts only when it lies in that ball and the model, in eval
mode, misclassifies it. Attacks that clip with ``x0 +- eps`` in float32 can overshoot by an ulp; projecting such an
example back may make it correctly classified again (a model that quantizes its input sits exactly on that edge).
:func:`check_attack` never drops such a point silently: it re-attacks it at a slightly smaller eps, whose float
output lies inside the ball, and counts it robust only when no valid example was found.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lawbench.base.modes import eval_mode

from .errors import AttackError
from .randomized import Randomized, majority_misclassified

NORMS = ("Linf", "L2")

# radius shrink for L2 projection so that rounding never pushes a norm above eps
L2_SHRINK = 1.0 - 2.0 ** -20
# relative eps shrinks of the successive re-attacks (the first one already clears float32 rounding at any eps)
REATTACK_SHRINKS = (2.0 ** -12, 2.0 ** -8, 2.0 ** -5)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise AttackError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def _round_down(value: float, dtype: torch.dtype) -> torch.Tensor:
    """Largest number representable in ``dtype`` that is <= value (as a 0-d tensor)."""
    t = torch.tensor(value, dtype=dtype)
    if float(t) > value:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return t


def box_bounds(x0: torch.Tensor, eps: float, norm: str):
    """Per-coordinate [lo, hi] in x0's dtype with every x in it inside the exact ball and [0, 1].

    For Linf the bounds are nudged inwards until the float64 distance to x0 is at most eps; for L2 the box is [0,1].
    """
    if norm == "L2":
        return torch.zeros_like(x0), torch.ones_like(x0)
    e = _round_down(eps, x0.dtype).to(x0.device)
    lo = torch.clamp(x0 - e, min=0.0)
    hi = torch.clamp(x0 + e, max=1.0)
    x64 = x0.double()
    for _ in range(8):
        bad = (x64 - lo.double()) > eps
        if not bool(bad.any()):
            break
        lo = torch.where(bad, torch.nextafter(lo, x0), lo)
    for _ in range(8):
        bad = (hi.double() - x64) > eps
        if not bool(bad.any()):
            break
        hi = torch.where(bad, torch.nextafter(hi, x0), hi)
    return lo, hi


def project_l2(x0: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
    """Fast L2 projection (rows of flat tensors) with a small radius shrink; used inside attack loops."""
    d = x - x0
    n = d.norm(dim=1, keepdim=True)
    factor = torch.clamp((eps * L2_SHRINK) / n.clamp_min(1e-30), max=1.0)
    return torch.clamp(x0 + d * factor, 0.0, 1.0)


def distance(x0: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row distance in float64 (rows flattened)."""
    d = x.detach().reshape(x.shape[0], -1).double() - x0.detach().reshape(x0.shape[0], -1).double()
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


def inside(x0: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Bool (N,): the row lies in the exact eps ball around x0 and in [0, 1]."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    xf = x.detach().reshape(x.shape[0], -1)
    in_box = (xf >= 0).all(1) & (xf <= 1).all(1)
    return in_box & (distance(x0, x, norm) <= float(eps))


def project(x0: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Nearest-enough point of the exact ball (and [0,1]) in x0's dtype; rows already inside are left unchanged."""
    N = x0.shape[0]
    shape = x0.shape
    a = x0.detach().reshape(N, -1)
    b = x.detach().reshape(N, -1).to(a.dtype)
    b = torch.where(torch.isfinite(b), b, a)  # a NaN or infinite coordinate is no perturbation: the clean one
    ok = inside(a, b, eps, norm)
    if bool(ok.all()):
        return b.reshape(shape).clone()
    if norm == "Linf":
        lo, hi = box_bounds(a, float(eps), norm)
        out = torch.clamp(b, lo, hi)
    else:
        out = torch.clamp(b, 0.0, 1.0)
        shrink = L2_SHRINK
        for _ in range(8):
            bad = ~inside(a, out, eps, norm)
            if not bool(bad.any()):
                break
            d = (out[bad] - a[bad]).double()
            n = d.norm(dim=1, keepdim=True).clamp_min(1e-300)
            fac = torch.clamp(float(eps) * shrink / n, max=1.0)
            out[bad] = torch.clamp(a[bad].double() + d * fac, 0.0, 1.0).to(a.dtype)
            shrink *= 1.0 - 2.0 ** -16
    out = torch.where(ok[:, None], b, out)
    return out.reshape(shape)


def input_grad(obj: torch.Tensor, x: torch.Tensor, **kw) -> torch.Tensor:
    """d obj / d x, zero where the model's output does not depend differentiably on x (a non-differentiable step,
    a quantizer with a detached path): such a model gets zero gradients, never a crash."""
    if not obj.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(obj, x, allow_unused=True, **kw)
    return torch.zeros_like(x) if g is None else g


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Argmax predictions in batches of at most ``batch`` rows (a randomized model: its most frequent prediction
    over its vote draws)."""
    n = x.shape[0]
    b = n if not batch else max(1, int(batch))
    scores = model.vote_counts if isinstance(model, Randomized) else model
    out = [scores(x[s:s + b]).argmax(1) for s in range(0, n, b)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def misclassified(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Bool (N,): argmax of the model in eval mode differs from y (the model's mode is restored). A randomized model
    (attacks.randomized.Randomized) misclassifies a point when most of its vote draws do (a tie is no majority)."""
    with eval_mode(model):
        if isinstance(model, Randomized):
            n = x.shape[0]
            b = n if not batch else max(1, int(batch))
            parts = [majority_misclassified(model, x[s:s + b], y[s:s + b]) for s in range(0, n, b)]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=x.device)
        pred = predict(model, x, batch)
    return pred != y.to(pred.device)


@dataclass
class Checked:
    """x_adv: every row inside the exact ball and [0,1]; broken: Bool (N,), misclassified at x_adv in eval mode.
    info: claimed (the attack's raw output misclassified), lost (claimed, not valid after projection), reattacked,
    recovered (re-attack found a valid example), unresolved (claimed, yet no valid example found), eps_tried."""

    x_adv: torch.Tensor
    broken: torch.Tensor
    info: dict = field(default_factory=dict)


def validate(model, x, y, x_raw, eps: float, norm: str, batch: int | None = None):
    """(x_adv projected into the exact ball, broken mask, claimed mask) for one attack's raw output. A row with a
    non-finite value claims nothing (a model's argmax of NaN logits is class 0, not an error); its projection, the
    clean value in every non-finite coordinate, is judged like any other."""
    x_raw = x_raw.detach().reshape(x.shape).to(x.dtype)
    finite = torch.isfinite(x_raw.reshape(x.shape[0], -1)).all(1)
    claimed = misclassified(model, torch.where(finite.view(-1, *[1] * (x.dim() - 1)), x_raw, x), y, batch) & finite
    out = ~inside(x.reshape(x.shape[0], -1), x_raw, eps, norm)
    x_adv = project(x, x_raw, eps, norm)
    broken = claimed.clone()
    if bool(out.any()):  # rows inside the ball are unchanged by the projection: judged once
        broken[out] = misclassified(model, x_adv[out], y[out], batch)
    return x_adv, broken, claimed


def check_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_raw: torch.Tensor, eps: float,
                 norm: str, rerun: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None, *,
                 batch: int | None = None, log: Callable[[str], None] | None = None) -> Checked:
    """The one validation path of every attack's output.

    x_raw: the attack's examples (like x). A point is broken when its example, projected into the exact ball, is
    misclassified by the model in eval mode. A point whose raw example was misclassified but whose projection is
    not ("lost") is re-attacked: ``rerun(idx, eps_k, k)`` returns raw examples for x[idx] at the slightly smaller
    eps_k (shrinks REATTACK_SHRINKS; k = 1, 2, ... lets the attack vary its seed), which are validated against the
    original ball in turn. Points still without a valid example go on to the next, smaller eps.
    """
    check_norm(norm)
    x_adv, broken, claimed = validate(model, x, y, x_raw, eps, norm, batch)
    lost = claimed & ~broken
    info = {"claimed": int(claimed.sum()), "lost": int(lost.sum()), "reattacked": int(lost.sum()), "recovered": 0,
            "unresolved": 0, "eps_tried": []}
    todo = lost.nonzero().flatten()
    for k, shrink in enumerate(REATTACK_SHRINKS if rerun is not None else (), start=1):
        if todo.numel() == 0:
            break
        e_k = float(eps) * (1.0 - shrink)
        info["eps_tried"].append(e_k)
        if log:
            log(f"check: {todo.numel()} example(s) left the exact {norm} ball of eps {eps:g} or stopped being "
                f"adversarial after projection; re-attacking at eps {e_k:.8g}")
        xr = rerun(todo, e_k, k)
        xa_k, br_k, cl_k = validate(model, x[todo], y[todo], xr, eps, norm, batch)
        got = todo[br_k]
        broken[got] = True
        x_adv[got] = xa_k[br_k]
        info["recovered"] += int(br_k.sum())
        todo = todo[~br_k]  # no valid example yet: a smaller eps and another seed
    info["unresolved"] = int(lost.sum()) - info["recovered"]
    return Checked(x_adv=x_adv, broken=broken, info=info)

def check_record(own, fresh: dict) -> dict:
    """The record of one attack's check at one eps: ``fresh`` (this check's), with the re-attack counts of the
    attack's ``own`` check (a built-in attack validates its examples as it runs: its re-attacks happened there) where
    ``own`` is a well-formed record. A record only; no verdict is read from it."""
    if not isinstance(own, dict):
        return fresh
    counts = {k: own[k] for k in ("reattacked", "recovered", "unresolved")
              if type(own.get(k)) is int and own[k] >= 0}
    return {**fresh, **{k: fresh[k] + v for k, v in counts.items()}}


# ----------------------------------------------------------------------------------------------------------------
# the ascent's pieces: the loss it maximises, its start and its step rule (every PGD-style loop uses these)

LOSSES = ("ce", "margin", "dlr")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise AttackError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def default_step_size(eps: float, steps: int, norm: str = "Linf") -> float:
    """Madry's fixed step, 2.5 * eps / steps: adversarial training's default (pgd_perturb)."""
    return 2.5 * float(eps) / max(int(steps), 1)


# The evaluation default: a large step decayed in stages (fractions of eps per quarter of the steps). A fixed small
# step creeps towards one corner and stalls there; large early steps jump between corners of the box, and as the
# early exit keeps any misclassified iterate, the exploration costs nothing; the small late steps then refine.
DECAY_FRACTIONS = (0.5, 0.25, 0.125, 0.0625)


def step_schedule(eps: float, steps: int) -> tuple:
    """Per-step sizes of the default evaluation rule (DECAY_FRACTIONS of eps over equal stages)."""
    n = max(int(steps), 1)
    k = len(DECAY_FRACTIONS)
    return tuple(float(eps) * DECAY_FRACTIONS[min(k - 1, t * k // n)] for t in range(n))


def describe_step(alpha):
    """A step rule for the record: the float, or the schedule's distinct sizes in order."""
    if not isinstance(alpha, tuple):
        return alpha
    return {"decay": list(dict.fromkeys(alpha))}


def alpha_at(alpha, t: int) -> float:
    """Step size at step t: a fixed float, or a per-step schedule (tuple)."""
    return alpha[min(t, len(alpha) - 1)] if isinstance(alpha, tuple) else alpha


def _other_max(z: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """max_{j != cls} z_j."""
    return z.scatter(1, cls[:, None], float("-inf")).amax(1)


def ce_saturated(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bool (A,): the softmax is saturated at the label (p_y == 1 in z's precision), where the cross-entropy gradient
    p - e_y loses its label term and, on scaled logits, vanishes altogether (logits x 1e4 give exact zeros)."""
    return torch.softmax(z.detach(), 1).gather(1, y[:, None])[:, 0] >= 1.0


def attack_loss(z: torch.Tensor, y: torch.Tensor, loss: str, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row objective to *maximise*.

    ce:     CE(z, y) untargeted, -CE(z, t) targeted. Rows whose softmax is saturated (:func:`ce_saturated`) take
            the CW margin instead: cross-entropy has no gradient left there, the margin is scale-invariant.
    margin: CW margin max_{j!=y} z_j - z_y untargeted, z_t - max_{j!=t} z_j targeted.
    dlr:    Croce & Hein's DLR loss (untargeted and targeted forms; needs >= 3 / >= 4 classes).
    """
    zy = z.gather(1, y[:, None])[:, 0]
    if loss == "ce":
        if target is not None:  # -CE(z, t) keeps the gradient e_t - softmax(z): it never vanishes
            return -F.cross_entropy(z, target, reduction="none")
        ce = F.cross_entropy(z, y, reduction="none")
        sat = ce_saturated(z, y)
        return torch.where(sat, _other_max(z, y) - zy, ce) if bool(sat.any()) else ce
    if loss == "margin":
        if target is None:
            return _other_max(z, y) - zy
        zt = z.gather(1, target[:, None])[:, 0]
        return zt - _other_max(z, target)
    if loss == "dlr":
        zs, _ = z.sort(1, descending=True)
        if target is None:
            denom = zs[:, 0] - zs[:, min(2, z.shape[1] - 1)] + 1e-12
            return (_other_max(z, y) - zy) / denom
        zt = z.gather(1, target[:, None])[:, 0]
        k3, k4 = min(2, z.shape[1] - 1), min(3, z.shape[1] - 1)
        denom = zs[:, 0] - 0.5 * (zs[:, k3] + zs[:, k4]) + 1e-12
        return (zt - zy) / denom
    raise AttackError(f"loss must be one of {LOSSES}, got {loss!r}")


def random_start(x0, lo, hi, eps, norm, gen):
    """Random start inside the ball (Linf: uniform; L2: uniform direction, radius U(0,1)*eps), clipped to box."""
    if norm == "Linf":
        u = torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        x = x0 + (2.0 * u - 1.0) * eps
        return torch.clamp(x, lo, hi)
    g = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    r = torch.rand((x0.shape[0], 1), generator=gen, device=x0.device, dtype=x0.dtype)
    g = g * (r * eps / g.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return project_l2(x0, x0 + g, eps)


def start_point(x0, lo, hi, eps, norm, gen, random: bool = True, x_init=None):
    """Where an ascent starts: x_init brought into the ball (a warm start), else a random point, else x0."""
    if x_init is not None:
        return torch.clamp(x_init, lo, hi) if norm == "Linf" else project_l2(x0, x_init, eps)
    return random_start(x0, lo, hi, eps, norm, gen) if random else x0.clone()


def ascent_step(x, g, x0, lo, hi, alpha, eps, norm):
    """One projected ascent step on flat rows (A, d): the signed gradient (Linf) or the normalised gradient (L2),
    then back into the ball. alpha: one float, or (A, 1) per row. Returns the new detached x (g is consumed)."""
    if norm == "Linf":
        x = x.detach()
        x = x.add_(g.sign_(), alpha=alpha) if not torch.is_tensor(alpha) else x.addcmul_(g.sign_(), alpha)
        return torch.clamp(x, lo, hi, out=x)
    gn = g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x.detach() + g * (alpha / gn)
    return project_l2(x0, x, eps)


def eps_and_step_sizes(eps, step_size, steps: int, norm: str) -> tuple[list[float], list]:
    """The eps list (one eps or several) and one step rule per eps, validated: a fixed float where step_size is
    given, else the decayed schedule of :func:`step_schedule` (a tuple of per-step sizes)."""
    eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not eps_list:
        raise AttackError("eps list is empty")
    if any(e < 0 or not math.isfinite(e) for e in eps_list):
        raise AttackError(f"eps must be finite and >= 0, got {eps_list}")
    if step_size is None:
        return eps_list, [step_schedule(e, steps) for e in eps_list]
    if isinstance(step_size, (int, float)):
        return eps_list, [float(step_size)] * len(eps_list)
    alphas = [tuple(float(v) for v in a) if isinstance(a, (tuple, list)) else float(a) for a in step_size]
    if any((min(a) if isinstance(a, tuple) else a) < 0 for a in alphas):
        raise AttackError(f"step sizes must be >= 0, got {step_size}")
    if len(alphas) != len(eps_list):
        raise AttackError("step_size list must have one entry per eps")
    return eps_list, alphas
