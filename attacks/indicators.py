"""Indicators of attack failure, per eps, from what the suite's attacks recorded and a few cheap probes.

Pintor et al. (NeurIPS 2022, "Indicators of attack failure") name six ways a gradient attack fails silently; Carlini
et al. (2019, "On evaluating adversarial robustness") list sanity checks every evaluation should pass. Each is one
:class:`Indicator` below (declared once: name, source, threshold, meaning), measured on the points still robust after
the suite (at most ``points`` of them) and stored as ``{"value", "threshold", "fired"}`` (value None: not
applicable here). The probes use the model's exact gradients and the scale-invariant margin loss; their examples
go through the one validation path like any attack's, so what a probe breaks is broken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .randomized import Randomized
from .threat import box_bounds, check_attack, input_grad, project_l2

PROBE_POINTS = 64      # survivors probed per eps
PROBE_STEPS = 200      # the long probe: twice the suite's PGD steps, another seed
UNBOUNDED_STEPS = 50   # the probe at an unbounded radius
JITTER_DRAWS = 8       # repeated evaluations for the stability probe
PROBE_EOT = 4          # gradient draws per probe step on a randomized model (the probes are cheap by design)


@dataclass(frozen=True)
class Indicator:
    name: str
    source: str
    threshold: float   # fires when value > threshold
    meaning: str


INDICATORS = (
    Indicator("silent_success", "Pintor 2022", 0.0,
              "share of points whose raw example an attack claimed misclassified, yet no valid example came of it"),
    Indicator("incomplete_optimization", "Pintor 2022", 0.1,
              "median share of the probe's margin gain made in its last fifth of steps (still climbing)"),
    Indicator("transfer_failure", "Pintor 2022", 0.5,
              "share of examples fooling the smooth surrogate that do not fool the model (null: no surrogate)"),
    Indicator("unavailable_gradients", "Pintor 2022", 0.0,
              "share of points whose margin gradient is zero or not finite"),
    Indicator("unstable_predictions", "Pintor 2022", 0.1,
              "median relative spread of the margin over repeated evaluations in a ball of eps/64"),
    Indicator("unconstrained_failure", "Pintor 2022 / Carlini 2019", 0.0,
              "share of points a gradient attack with an unbounded radius leaves correctly classified"),
    Indicator("non_monotone", "Carlini 2019", 0.0,
              "share of points broken at eps yet not at an unbounded radius"),
    Indicator("more_steps", "Carlini 2019", 0.02,
              "share of points a longer PGD from a fresh start breaks after the whole suite"),
    Indicator("blackbox_beats_whitebox", "Carlini 2019", 0.002,
              "share of the evaluation set that black-box Square broke after the white-box attacks"),
)
BY_NAME = {i.name: i for i in INDICATORS}


def entry(name: str, value) -> dict:
    """The stored form of one indicator."""
    ind = BY_NAME[name]
    v = None if value is None or not math.isfinite(float(value)) else round(float(value), 6)
    return {"value": v, "threshold": ind.threshold, "fired": v is not None and v > ind.threshold}


def fired(indicators: dict) -> list:
    return sorted(k for k, v in indicators.items() if v.get("fired"))


# -- from the suite's own records --------------------------------------------------------------------------------------

def from_records(evidence: dict) -> dict:
    """The indicators read from what earlier attacks recorded at this eps (their checks, their breaks)."""
    n_total = max(1, int(evidence.get("n_total") or 1))
    checks = evidence.get("checks") or {}
    unresolved = sum(int(c.get("unresolved", 0)) for c in checks.values() if isinstance(c, dict))
    square = int(evidence.get("square_after_whitebox") or 0)
    return {"silent_success": entry("silent_success", unresolved / n_total),
            "blackbox_beats_whitebox": entry("blackbox_beats_whitebox", square / n_total)}


# -- the probes --------------------------------------------------------------------------------------------------------

def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y: positive where misclassified; scale-invariant in sign and direction."""
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - z.gather(1, y[:, None])[:, 0]


def margin_grad(net, x: torch.Tensor, y: torch.Tensor, draws: int = 1):
    """(margin (N,), its input gradient averaged over ``draws`` forward draws (N, d))."""
    g = torch.zeros_like(x)
    m = None
    for _ in range(draws):
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            mv = margin(net(xr), y)
            g += input_grad(mv.sum(), xr)
        m = mv.detach() if m is None else m + mv.detach()
    return m / draws, g / draws


@dataclass
class Trajectory:
    """A fixed-length ascent of the margin (no early exit): best margin per step (steps + 1, N), the best iterate and
    the first iterate the ascended network misclassified (else the best one)."""
    best: torch.Tensor
    x_best: torch.Tensor
    x_hit: torch.Tensor


def ascend_margin(net, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int, gen: torch.Generator,
                  draws: int = 1, judge=None) -> Trajectory:
    """Sign (Linf) or normalised (L2) ascent of the margin of ``net`` from a random start, step eps/2 decayed in four
    stages to eps/16 (the suite's rule), every iterate kept inside the exact ball and [0, 1]. ``judge``: another model
    whose margin at every iterate decides the best and the first misclassified iterate (a transfer judged on the real
    model at every step); else net's own."""
    n, shape = x.shape[0], x.shape[1:]
    x0 = x.detach().reshape(n, -1)
    lo, hi = box_bounds(x0, eps, norm)
    if norm == "Linf":
        xa = torch.clamp(x0 + (2 * torch.rand(x0.shape, generator=gen, device=x.device, dtype=x0.dtype) - 1) * eps,
                         lo, hi)
    else:
        d = torch.randn(x0.shape, generator=gen, device=x.device, dtype=x0.dtype)
        xa = project_l2(x0, x0 + 0.5 * eps * d / d.norm(dim=1, keepdim=True).clamp_min(1e-12), eps)
    best = torch.full((steps + 1, n), -math.inf, device=x.device)
    x_best, x_hit = xa.clone(), xa.clone()
    hit = torch.zeros(n, dtype=torch.bool, device=x.device)
    top = torch.full((n,), -math.inf, device=x.device)
    fwd = lambda v: net(v.view(-1, *shape))  # noqa: E731
    for t in range(steps + 1):
        m, g = margin_grad(fwd, xa, y, draws)
        if judge is not None:
            with torch.no_grad():
                m = margin(judge(xa.view(-1, *shape)), y)
        better = m > top
        top = torch.where(better, m, top)
        x_best[better] = xa[better]
        new = (m > 0) & ~hit
        x_hit[new], hit = xa[new], hit | new
        best[t] = top
        if t == steps:
            break
        a = eps * (0.5, 0.25, 0.125, 0.0625)[min(3, 4 * t // max(steps, 1))]
        if norm == "Linf":
            xa = torch.clamp(xa + a * g.sign(), lo, hi)
        else:
            xa = project_l2(x0, xa + a * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12), eps)
    x_hit[~hit] = x_best[~hit]
    return Trajectory(best, x_best.view(n, *shape), x_hit.view(n, *shape))


def unbounded_radius(x: torch.Tensor, norm: str) -> float:
    """A radius that contains all of [0, 1]^d around any point: 1 (Linf) or sqrt(d) (L2)."""
    return 1.0 if norm == "Linf" else math.sqrt(x[0].numel())


def _broken(model, x, y, examples, eps, norm) -> tuple[torch.Tensor, torch.Tensor]:
    ck = check_attack(model, x, y, examples, eps, norm)
    return ck.broken, ck.x_adv


def probe(model, x, y, eps: float, norm: str, *, seed: int, surrogate=None, points: int = PROBE_POINTS):
    """(indicators measured by probing the points x (survivors), probe's broken mask (N,), its examples).

    model: as the suite attacks it (a Randomized wrapper for majority verdicts). surrogate: the model's smooth
    surrogate (attacks.surrogate.Through(soft=True)) where it has operations to smooth, else None."""
    n = x.shape[0]
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    x_adv = x.detach().clone()
    if n == 0:
        return {}, broken, x_adv
    gen = torch.Generator(device=x.device).manual_seed(int(seed) + 7919)
    pick = torch.randperm(n, generator=gen, device=x.device)[:points]
    xs, ys = x[pick], y[pick]
    net = model.model if isinstance(model, Randomized) else model
    draws = PROBE_EOT if isinstance(model, Randomized) else 1
    out = {}
    # unavailable gradients
    _, g0 = margin_grad(net, xs, ys)
    g0 = g0.reshape(g0.shape[0], -1)
    dead = (g0.abs().sum(1) == 0) | ~torch.isfinite(g0).all(1)
    out["unavailable_gradients"] = entry("unavailable_gradients", float(dead.float().mean()))
    # unstable predictions: the margin over repeated evaluations at tiny random offsets
    out["unstable_predictions"] = entry("unstable_predictions", _instability(net, xs, ys, eps, norm, gen))
    # the long probe at eps: more steps, incomplete optimization
    tr = ascend_margin(net, xs, ys, eps, norm, PROBE_STEPS, gen, draws)
    got, ex = _broken(model, xs, ys, tr.x_hit, eps, norm)
    broken[pick[got]] = True
    x_adv[pick[got]] = ex[got]
    out["more_steps"] = entry("more_steps", float(got.float().mean()))
    out["incomplete_optimization"] = entry("incomplete_optimization", _late_gain(tr.best))
    # the unbounded probe: unconstrained failure, monotonicity
    big = unbounded_radius(xs, norm)
    tu = ascend_margin(net, xs, ys, big, norm, UNBOUNDED_STEPS, gen, draws)
    got_u, _ = _broken(model, xs, ys, tu.x_hit, big, norm)
    out["unconstrained_failure"] = entry("unconstrained_failure", float((~got_u).float().mean()))
    out["non_monotone"] = entry("non_monotone", float((got & ~got_u).float().mean()))
    # transfer from the smooth surrogate
    out["transfer_failure"] = entry("transfer_failure", None)
    if surrogate is not None:
        ts = ascend_margin(surrogate, xs, ys, eps, norm, UNBOUNDED_STEPS, gen, draws)
        with torch.no_grad():
            fooled = margin(surrogate(ts.x_best), ys) > 0
        if bool(fooled.any()):
            real, ex_t = _broken(model, xs[fooled], ys[fooled], ts.x_best[fooled], eps, norm)
            out["transfer_failure"] = entry("transfer_failure", float((~real).float().mean()))
            idx = pick[fooled][real & ~broken[pick[fooled]]]
            if idx.numel():
                keep = real & ~broken[pick[fooled]]
                broken[idx] = True
                x_adv[idx] = ex_t[keep]
    return out, broken, x_adv


def _late_gain(best: torch.Tensor) -> float:
    """Median over points of the share of the margin's total gain made in the last fifth of the steps (points whose
    margin never rose count 0: nothing was climbing)."""
    steps = best.shape[0] - 1
    cut = steps - max(1, steps // 5)
    total = best[-1] - best[0]
    late = best[-1] - best[cut]
    share = torch.where(total > 0, late / total.clamp_min(1e-30), torch.zeros_like(total))
    share = share[torch.isfinite(share)]
    return float(share.median()) if share.numel() else 0.0


@torch.no_grad()
def _instability(net, x, y, eps, norm, gen) -> float:
    """Median over points of std/|mean| of the margin at JITTER_DRAWS points drawn in the ball of eps/64 (and the
    same point again: a randomized model varies there too)."""
    r = eps / 64.0
    n = x.shape[0]
    ms = []
    for k in range(JITTER_DRAWS):
        if k == 0:
            xk = x
        elif norm == "Linf":
            xk = torch.clamp(x + r * (2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1),
                             0, 1)
        else:
            d = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype).reshape(n, -1)
            xk = torch.clamp(x + (r * d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x), 0, 1)
        ms.append(margin(net(xk), y))
    m = torch.stack(ms)
    rel = m.std(0) / m.mean(0).abs().clamp_min(1e-12)
    rel = rel[torch.isfinite(rel)]
    return float(rel.median()) if rel.numel() else 0.0
