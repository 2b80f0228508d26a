"""The adaptive stage: where an evaluation was fooled, attack the defense itself.

It runs after the suite's other attacks, at every eps, on the points still robust. First the indicators of attack
failure (attacks.indicators) are measured; where one fires, or an earlier attack raised a masking flag, the stage
attacks with gradients the model hides from the suite:

* straight-through / BPDA gradients through the non-differentiable operations of the forward pass and smoothed
  derivatives of saturated functions, found at run time by a torch function mode (attacks.surrogate), on any model;
* the scale-invariant DLR and margin losses (scaled logits saturate cross-entropy, never these);
* on a randomized model, EOT with as many draws as the gradient needs to be stable (two independent estimates agree
  to a cosine of ``eot_cos``), starting from AutoAttack rand's 20; verdicts by the majority of fresh draws;
* a transfer attack from the smooth surrogate (forward values smoothed too), judged on the real model.

Its attacks are APGD-DLR and APGD-T (our engine, attacks.apgd), PGD on the margin through the surrogate (at several
surrogate temperatures), the transfer, then (deterministic models) examples found at larger radii pulled back into
the ball (and, under L2, shrunk into it). Every example goes through the one validation path (the exact ball,
[0, 1], misclassified by the real model in eval mode, by most draws where randomized).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .apgd import APGDConfig, apgd, rank_by_logit
from .indicators import ascend_margin, fired, from_records, margin, margin_grad, probe
from .pgd import pgd_sweep
from .randomized import EOT_DRAWS, Randomized
from .surrogate import Through, swapped_ops
from .threat import check_attack, distance

MODES = ("auto", "always")
# flags of earlier attacks that send the stage in wherever points remain (attacks.autoattack.FLAG_DOC)
MASKING_FLAGS = ("zero_gradients", "square_beats_whitebox", "randomized", "softmax_saturated", "softmax_output",
                 "dynamic")


@dataclass(frozen=True)
class AdaptiveConfig:
    steps: int = 100         # PGD steps through the surrogate at each temperature (a randomized model: rand_steps)
    rand_steps: int = 100
    # the surrogates' temperatures, one PGD run each where the surrogate swapped operations: which one a masking
    # needs depends on its scale (a tanh(1000 h) layer was broken best at 0.015, a step at 0.25)
    temperatures: tuple = (0.25, 0.06, 0.015, 1.0)
    apgd_iter: int = 100
    targets: int = 3         # APGD-T targets (deterministic models)
    eot_cos: float = 0.9     # the EOT gradient is stable when two independent estimates agree this well
    eot_max: int = 160
    transfer_steps: int = 100
    transfer_restarts: int = 2
    # pull-back: examples found at these multiples of eps, each coordinate then pulled back towards the clean point
    # while the logits stay the same (a front end that rounds or thresholds maps an interval to one output)
    pullback_radii: tuple = (1.5, 2.5, 4.0)
    pullback_coords: int = 256   # the largest coordinates of a perturbation bisected one by one; the rest at once
    pullback_rounds: int = 8
    # under L2, also Linf-shaped examples at these multiples of eps/sqrt(d): a front end that rounds each pixel makes
    # a small step on every pixel the cheapest change (each pixel pulled back to its cell's edge), and shrinking
    # then reverts the least useful of them until the example fits the ball
    pullback_linf: tuple = (1.0, 2.0, 4.0)
    shrink_rounds: int = 24


def run_adaptive(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, *, seed: int = 0,
                 evidence: dict | None = None, mode: str = "auto", cfg: AdaptiveConfig = AdaptiveConfig(),
                 log=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(still robust (N,), examples like x, info) on the points x (the suite's survivors at eps).

    evidence: what the suite knows at this eps (flags raised so far, each attack's check record, Square's breaks
    after the white-box attacks, the size of the evaluation set); mode "auto" attacks where an indicator fires or a
    masking flag was raised, "always" everywhere."""
    t0 = time.perf_counter()
    evidence = evidence or {}
    base = model.model if isinstance(model, Randomized) else model
    ops, failed = swapped_ops(base, x[:8])
    soft = _randomized_like(model, Through(base, soft=True), EOT_DRAWS) if ops and failed is None else None
    indicators = from_records(evidence)
    measured, robust, x_adv = probe(model, x, y, eps, norm, seed=seed, surrogate=soft)
    indicators.update(measured)
    robust = ~robust
    flags = sorted(set(evidence.get("flags", ())) & set(MASKING_FLAGS))
    why = fired(indicators) + [f"flag {f}" for f in flags]
    info = {"indicators": indicators, "ran": False, "why": why, "ops": ops, "surrogate_failed": failed,
            "broke": {"probe": int((~robust).sum())}, "flags": []}
    if mode == "auto" and not why or not bool(robust.any()):
        info["seconds"] = round(time.perf_counter() - t0, 4)
        return robust, x_adv, info
    if log:
        log(f"adaptive: {', '.join(why) or 'mode always'} at eps {eps:g}; attacking {int(robust.sum())} points"
            + (f" through {ops}" if ops else ""))
    through = Through(base)
    eot, cos = _stable_eot(through, x[robust], y[robust], cfg) if isinstance(model, Randomized) else (1, None)
    net = _randomized_like(model, through, eot)
    info.update(ran=True, eot=eot if isinstance(model, Randomized) else None, eot_cos=cos, flags=["adaptive"])
    with torch.no_grad():
        classes = int(base(x[:1]).shape[1])
    plan = _Plan(net, through, soft, base, norm, seed, cfg, isinstance(model, Randomized), classes)
    for name, attack in plan.stages():
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        raw = attack(x[idx], y[idx], eps)
        ck = check_attack(model, x[idx], y[idx], raw, eps, norm)
        got = idx[ck.broken]
        robust[got] = False
        x_adv[got] = ck.x_adv[ck.broken]
        info["broke"][name] = int(got.numel())
    info["ops"] = dict(through.swapped) or ops
    if through.failed:
        info["surrogate_failed"] = through.failed
    info["seconds"] = round(time.perf_counter() - t0, 4)
    return robust, x_adv, info


def _randomized_like(model, net, eot: int):
    """``net`` wrapped as ``model`` is: Randomized (with ``eot`` gradient draws) where model is, else as it is."""
    return Randomized(net, eot=eot, votes=model.votes) if isinstance(model, Randomized) else net


def _stable_eot(net, x, y, cfg: AdaptiveConfig, points: int = 16) -> tuple[int, float]:
    """(draws, cosine): the fewest draws from EOT_DRAWS up (doubling, at most eot_max) at which two independent EOT
    estimates of the margin gradient agree to a median cosine of cfg.eot_cos on a few points."""
    xs, ys = x[:points], y[:points]
    k, cos = EOT_DRAWS, 0.0
    while True:
        _, g1 = margin_grad(net, xs, ys, k)
        _, g2 = margin_grad(net, xs, ys, k)
        g1, g2 = g1.reshape(g1.shape[0], -1), g2.reshape(g2.shape[0], -1)
        c = torch.nn.functional.cosine_similarity(g1, g2, dim=1)
        cos = float(c.median()) if c.numel() else 1.0
        if cos >= cfg.eot_cos or k >= cfg.eot_max:
            return k, round(cos, 4)
        k = min(2 * k, cfg.eot_max)


class _Plan:
    """The stage's attacks, in order: APGD-DLR, APGD-T (deterministic models), PGD on the margin through the
    surrogate (at each of the temperatures where it swapped operations), then the transfer from the smooth surrogate
    judged on the real model at every step, and (deterministic models) examples found at larger radii pulled back
    into the ball."""

    def __init__(self, net, through, soft, base, norm, seed, cfg: AdaptiveConfig, rand: bool, classes: int):
        self.net, self.through, self.soft, self.base, self.norm, self.seed = net, through, soft, base, norm, seed
        self.ops = soft is not None
        self.cfg, self.rand, self.classes = cfg, rand, classes

    def stages(self):
        out = [("apgd-dlr", self.apgd_dlr)] if self.classes >= 3 else []  # DLR needs 3 classes, targeted DLR 4
        if not self.rand and self.classes >= 4:
            out.append(("apgd-t", self.apgd_t))
        if self.ops and not self.rand:
            out += [(f"pgd-margin@{t:g}", self._pgd_at(t)) for t in self.cfg.temperatures]
        else:
            out.append(("pgd-margin", self.pgd))
        if self.soft is not None:
            out.append(("transfer", self.transfer))
            if not self.rand:
                out.append(("pullback", self.pullback))
        return out

    def apgd_dlr(self, x, y, eps):
        return apgd(self.net, x, y, eps, self.norm, APGDConfig(loss="dlr", n_iter=self.cfg.apgd_iter),
                    seed=self.seed).x_adv

    def apgd_t(self, x, y, eps):
        k = max(1, min(self.cfg.targets, self.classes - 1))
        t = rank_by_logit(self.net, x, y, k)
        return apgd(self.net, x, y, eps, self.norm, APGDConfig(loss="dlr-targeted", n_iter=self.cfg.apgd_iter),
                    seed=self.seed + 1, targets=t).x_adv

    def pgd(self, x, y, eps, net=None):
        steps = self.cfg.rand_steps if self.rand else self.cfg.steps
        return pgd_sweep(net or self.net, x, y, [eps], norm=self.norm, steps=steps, restarts=1, loss="margin",
                         seed=self.seed + 2).x_adv[0]

    def _pgd_at(self, temperature):
        """PGD through the surrogate at ``temperature`` (a deterministic model's swapped operations)."""
        def run(x, y, eps):
            net = Through(self.base, temperature=temperature)
            out = self.pgd(x, y, eps, net)
            self.through.swapped.update(net.swapped)
            return out
        return run

    def transfer(self, x, y, eps):
        """Ascent of the smooth surrogate's margin, every iterate judged by the real model (one draw where
        randomized); per point the first misclassified iterate, else the best one, over the restarts."""
        gen = torch.Generator(device=x.device).manual_seed(int(self.seed) + 4)
        soft = self.soft.model if isinstance(self.soft, Randomized) else self.soft
        draws = self.soft.eot if isinstance(self.soft, Randomized) else 1
        out, top = x.detach().clone(), torch.full((x.shape[0],), -float("inf"), device=x.device)
        for _ in range(1 if self.rand else self.cfg.transfer_restarts):  # EOT draws make a restart dear
            tr = ascend_margin(soft, x, y, eps, self.norm, self.cfg.transfer_steps, gen, draws, judge=self.base)
            better = tr.best[-1] > top
            out[better], top = tr.x_hit[better], torch.maximum(top, tr.best[-1])
        return out

    def pullback(self, x, y, eps):
        """Examples at larger radii (PGD through the surrogate), pulled back (see pull_back) and, under L2, shrunk
        into the ball (see shrink); per point the smallest perturbation that lands in the ball."""
        best = x.detach().clone()
        best_d = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=torch.float64)
        radii = [(self.norm, eps * r) for r in self.cfg.pullback_radii]
        if self.norm == "L2":
            radii += [("Linf", eps * r / math.sqrt(x[0].numel())) for r in self.cfg.pullback_linf]
        for k, (norm, radius) in enumerate(radii):
            far = pgd_sweep(self.net, x, y, [radius], norm=norm, steps=self.cfg.steps, restarts=1,
                            loss="margin", seed=self.seed + 10 + k)
            hit = ~far.robust[0]
            if not bool(hit.any()):
                continue
            pb = pull_back(self.base, x[hit], far.x_adv[0][hit], self.cfg.pullback_coords, self.cfg.pullback_rounds)
            if self.norm == "L2":
                pb = shrink(self.base, self.through, x[hit], y[hit], pb, eps, self.cfg.shrink_rounds)
            dist = distance(x[hit], pb, self.norm)
            idx = hit.nonzero().flatten()
            better = dist < best_d[idx]
            best[idx[better]], best_d[idx[better]] = pb[better], dist[better]
        return best


def pull_back(model, x: torch.Tensor, x_adv: torch.Tensor, coords: int = 256, rounds: int = 8) -> torch.Tensor:
    """Each example's perturbation pulled back towards its clean point, coordinate by coordinate, as far as the
    model's logits stay exactly what they are at the example. A front end that rounds, thresholds or encodes each input
    maps an interval of values to one output: an example found at a larger radius may lie in the ball once pulled
    back, and it is misclassified as it was. The ``coords`` largest coordinates of each perturbation are bisected
    (``rounds`` halvings, all of them in one batch, each with the others held), the rest set to the clean value at
    once where that keeps the logits; the joint result is kept only where the logits are still the same."""
    n, shape = x.shape[0], x.shape[1:]
    x0, xa = x.detach().reshape(n, -1), x_adv.detach().reshape(n, -1).clone()
    with torch.no_grad():
        z_ref = model(xa.view(n, *shape))
        same = lambda v, rows: (model(v.view(-1, *shape)) == z_ref[rows]).all(1)  # noqa: E731
        delta = xa - x0
        k = min(int(coords), delta.shape[1])
        top = delta.abs().topk(k, dim=1).indices                                   # (n, k)
        rest = torch.ones_like(delta, dtype=torch.bool).scatter_(1, top, False)
        trial = torch.where(rest, x0, xa)
        keep = same(trial, torch.arange(n, device=x.device))
        xa[keep] = trial[keep]
        lo = torch.zeros(n, k, device=x.device, dtype=xa.dtype)                   # pulled-back share: t in [lo, hi]
        hi = torch.ones_like(lo)
        d_top = delta.gather(1, top)
        x0_top = x0.gather(1, top)
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        for _ in range(int(rounds)):
            mid = (lo + hi) / 2
            cand = xa.repeat_interleave(k, 0)
            col = top.reshape(-1)
            cand[torch.arange(n * k, device=x.device), col] = (x0_top + (1 - mid) * d_top).reshape(-1)
            ok = same(cand, rows).view(n, k)
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid)
        pulled = xa.clone()
        pulled.scatter_(1, top, x0_top + (1 - lo) * d_top)
        keep = same(pulled, torch.arange(n, device=x.device))
        xa[keep] = pulled[keep]
    return xa.view(n, *shape)


def shrink(model, grad_net, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, eps: float,
           rounds: int = 24) -> torch.Tensor:
    """L2: examples outside the ball brought into it by reverting coordinates of their perturbation to the clean
    values, the least useful first (the first-order margin each keeps, through ``grad_net``'s gradients, per unit
    of squared norm it costs), while ``model`` still misclassifies the example. Each round first tries to shed the
    whole excess at once, else a share of it (halved on each failure, doubled on each success). An example that
    cannot be brought in comes back nearer, still misclassified; one ``model`` classifies correctly, as it is."""
    n = x.shape[0]
    x0, cur = x.detach().reshape(n, -1), x_adv.detach().reshape(n, -1).clone()
    budget = float(eps) ** 2 * (1 - 1e-6)
    share = torch.full((n,), 0.25, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        wrong = margin(model(cur.view_as(x)), y) > 0
    for _ in range(int(rounds)):
        d = cur - x0
        excess = (d.double() ** 2).sum(1) - budget
        act = (wrong & (excess > 0)).nonzero().flatten()
        if act.numel() == 0:
            break
        _, g = margin_grad(grad_net, cur[act].view(-1, *x.shape[1:]), y[act])
        da = d[act]
        c2 = da.double() ** 2
        keep = (g.reshape(act.numel(), -1).double() * da.double()) / c2.clamp_min(1e-30)
        order = torch.where(da != 0, keep, torch.full_like(keep, float("inf"))).argsort(1)
        shed = c2.gather(1, order).cumsum(1)                                  # cost shed by reverting a prefix
        ok_any = torch.zeros(act.numel(), dtype=torch.bool, device=x.device)
        for frac in (torch.ones_like(share[act]), share[act]):                # the whole excess, else a share
            todo = ~ok_any
            if not bool(todo.any()):
                break
            need = (excess[act] * frac)[:, None]
            k = (shed < need).sum(1) + 1                                      # the shortest prefix shedding it
            cut = torch.arange(order.shape[1], device=x.device)[None, :] < k[:, None]
            revert = torch.zeros_like(cut).scatter_(1, order, cut)
            trial = torch.where(revert, x0[act], cur[act])
            with torch.no_grad():
                good = (margin(model(trial.view(-1, *x.shape[1:])), y[act]) > 0) & todo
            cur[act[good]] = trial[good]
            ok_any |= good
        share[act] = torch.where(ok_any, (share[act] * 2).clamp_max(1.0), share[act] / 2)
    return cur.view_as(x_adv)


__all__ = ["AdaptiveConfig", "pull_back", "shrink", "MODES", "MASKING_FLAGS", "run_adaptive"]
