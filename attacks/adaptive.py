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

Its attacks are APGD-DLR and APGD-T (our engine, attacks.apgd) and PGD on the margin loss through the surrogate,
then the transfer. Every example goes through the one validation path (the exact ball, [0, 1], misclassified by the
real model in eval mode, by most draws where randomized).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .apgd import APGDConfig, apgd, rank_by_logit
from .indicators import fired, from_records, margin_grad, probe
from .pgd import pgd_sweep
from .randomized import EOT_DRAWS, Randomized
from .surrogate import Through, swapped_ops
from .threat import check_attack

MODES = ("auto", "always")
# flags of earlier attacks that send the stage in wherever points remain (attacks.autoattack.FLAG_DOC)
MASKING_FLAGS = ("zero_gradients", "square_beats_whitebox", "randomized", "softmax_saturated", "softmax_output",
                 "dynamic")


@dataclass(frozen=True)
class AdaptiveConfig:
    steps: int = 200         # PGD steps through the surrogate (a randomized model: rand_steps)
    rand_steps: int = 100
    apgd_iter: int = 100
    targets: int = 3         # APGD-T targets (deterministic models)
    eot_cos: float = 0.9     # the EOT gradient is stable when two independent estimates agree this well
    eot_max: int = 160
    transfer_steps: int = 100


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
    eot, cos = _stable_eot(model, through, x[robust], y[robust], cfg) if isinstance(model, Randomized) else (1, None)
    net = _randomized_like(model, through, eot)
    info.update(ran=True, eot=eot if isinstance(model, Randomized) else None, eot_cos=cos, flags=["adaptive"])
    with torch.no_grad():
        classes = int(base(x[:1]).shape[1])
    for name, attack in _stages(net, soft, norm, seed, cfg, isinstance(model, Randomized), classes):
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


def _stable_eot(model, net, x, y, cfg: AdaptiveConfig, points: int = 16) -> tuple[int, float]:
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


def _stages(net, soft, norm, seed, cfg: AdaptiveConfig, rand: bool, classes: int):
    """(name, attack(x, y, eps) -> raw examples) in order: APGD-DLR, APGD-T, PGD on the margin through the surrogate,
    the transfer from the smooth surrogate."""
    def apgd_dlr(x, y, eps):
        return apgd(net, x, y, eps, norm, APGDConfig(loss="dlr", n_iter=cfg.apgd_iter), seed=seed).x_adv

    def apgd_t(x, y, eps):
        k = max(1, min(cfg.targets, classes - 1))
        t = rank_by_logit(net, x, y, k)
        return apgd(net, x, y, eps, norm, APGDConfig(loss="dlr-targeted", n_iter=cfg.apgd_iter), seed=seed + 1,
                    targets=t).x_adv

    def pgd(x, y, eps):
        steps = cfg.rand_steps if rand else cfg.steps
        return pgd_sweep(net, x, y, [eps], norm=norm, steps=steps, restarts=1, loss="margin", seed=seed + 2).x_adv[0]

    def transfer(x, y, eps):
        return pgd_sweep(soft, x, y, [eps], norm=norm, steps=cfg.transfer_steps, restarts=1, loss="margin",
                         seed=seed + 3).x_adv[0]

    out = [("apgd-dlr", apgd_dlr)] if classes >= 3 else []  # the DLR losses need 3 classes, the targeted one 4
    if not rand and classes >= 4:
        out.append(("apgd-t", apgd_t))
    out.append(("pgd-margin", pgd))
    if soft is not None:
        out.append(("transfer", transfer))
    return out


__all__ = ["AdaptiveConfig", "MODES", "MASKING_FLAGS", "run_adaptive"]
