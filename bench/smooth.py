"""The `smooth` recipe: per width, the interpolator with the smallest Lipschitz constant a penalty search finds.

The law bounds the *smoothest* model that fits the noisy training set, not whichever one ERM lands on. The search:

* starts from ERM's interpolator (trained, or the cached ERM checkpoint of the same cell), so every stage begins
  from a model that fits every training label, noisy ones included;
* fine-tunes it with a hinge on the logit margin, mean(relu(margin_target - margin)), plus lambda times the sum of
  log operator norms of the linear layers (Linear, Conv2d), lambda growing geometrically stage by stage (annealing);
  a stage is accepted while the model still interpolates, the first that does not ends the growth, and bisection
  in log lambda between the last accepted and the first refused value refines it;
* keeps the accepted stage with the smallest ratio of the product of operator norms to the smallest training
  margin, then scales the output layer so that margin is exactly the target: every smooth model fits its training
  set with the same output scale, and its Lipschitz constant is measured there.

Why these choices:
* The product of the layers' operator norms is (an upper bound of) the certified global bound a row reports as
  lip_upper, and the law speaks of the global constant. A penalty on input gradients at sampled points lowers the
  local slopes only where it samples and leaves the certificate where it was.
* A margin: a classifier's logits can be scaled down without changing one prediction, so "the smallest Lipschitz
  constant that fits" has no minimum without one (a search on interpolation alone drifts to margins near 0). The
  law's f(x_i) = y_i fixes the output scale; a logit margin (default 1) is its classification analogue, and
  Lipschitz constant over smallest margin is the scale-free quantity the search minimises. Rows of every recipe
  record their smallest training margin.
* Operator norms by power iteration with vectors kept across steps (as spectral normalisation does): one iteration
  per step costs two layer applications, and the estimate converges as the weights move slowly.

Every random choice (batch order per stage) flows from the config's seed; the search is deterministic on CPU.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lawbench.attacks import attack_loss

POWER_ITERS_EVAL = 30  # iterations when the trace records the product of norms


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - max_{j != y} f_j per point: positive where the point is classified as labelled (the attack engine's
    margin loss, negated)."""
    return -attack_loss(logits, y, "margin")


@torch.no_grad()
def train_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Every point's margin in eval mode, in batches."""
    model.eval()
    return torch.cat([margins(model(x[i:i + batch]), y[i:i + batch]) for i in range(0, len(x), batch)])


class OperatorNorms:
    """Differentiable estimates of the L2 operator norm of every Linear and Conv2d layer (bias excluded), by power
    iteration with one persistent vector per layer. Conv layers learn their input shape from one forward pass."""

    def __init__(self, model: nn.Module, x_example: torch.Tensor, seed: int):
        self.layers = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        shapes = {}

        def record(mod, inp):
            shapes.setdefault(mod, tuple(inp[0].shape[1:]))  # returns None: the input passes unchanged

        hooks = [m.register_forward_pre_hook(record) for m in self.layers]
        try:
            with torch.no_grad():
                model(x_example[:1])
        finally:
            for h in hooks:
                h.remove()
        gen = torch.Generator().manual_seed(seed)
        self.vectors = []
        for m in self.layers:
            shape = (m.in_features,) if isinstance(m, nn.Linear) else shapes[m]
            u = torch.randn((1, *shape), generator=gen).to(m.weight.device, m.weight.dtype)
            self.vectors.append(u / u.norm())

    @staticmethod
    def _apply(m: nn.Module, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.Linear):
            return F.linear(u, weight)
        return m._conv_forward(u, weight, None)

    @torch.no_grad()
    def iterate(self, steps: int = 1) -> None:
        for i, m in enumerate(self.layers):
            u = self.vectors[i]
            for _ in range(steps):
                _, adjoint = torch.func.vjp(lambda z: self._apply(m, z, m.weight), u)
                v = self._apply(m, u, m.weight)
                (u,) = adjoint(v / v.norm().clamp_min(1e-30))
                u = u / u.norm().clamp_min(1e-30)
            self.vectors[i] = u

    def log_norms(self) -> torch.Tensor:
        """Sum of log ||W_l|| at the current vectors, differentiable in the weights."""
        return sum(torch.log(self._apply(m, u, m.weight).norm().clamp_min(1e-30))
                   for m, u in zip(self.layers, self.vectors))

    def product(self) -> float:
        self.iterate(POWER_ITERS_EVAL)
        with torch.no_grad():
            return float(torch.exp(self.log_norms()))


@dataclass
class SmoothResult:
    penalty: float               # the chosen lambda (0: no stage kept the fit, the ERM weights stand)
    trace: list = field(default_factory=list)
    seconds: float = 0.0
    searched: bool = True        # False when the ERM start did not interpolate (nothing to search from)
    output_scale: float | None = None  # the factor that set the smallest margin to the target (None: not applied)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float, float]:
    """(interpolates, train accuracy, smallest margin) in eval mode."""
    m = train_margins(model, x, y)
    return bool((m > 0).all()), float((m > 0).float().mean()), float(m.min())


def _stage(model, x, y, cfg, lam: float, stage: int, norms: OperatorNorms) -> bool:
    """Fine-tune in place for cfg.smooth_epochs epochs at penalty lam; the model ends at the last epoch that still
    interpolates (a fresh optimizer's first steps can knock a point over that later epochs win back). Returns
    whether any epoch did."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.smooth_lr or cfg.lr / 10)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7 + stage)
    kept = None
    for _ in range(cfg.smooth_epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        model.train()
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            norms.iterate(1)
            hinge = F.relu(cfg.smooth_margin - margins(model(x[idx]), y[idx])).mean()
            loss = hinge + lam * norms.log_norms()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"smooth search diverged at lambda {lam:g}; lower lr")
        if _fit(model, x, y)[0]:
            kept = copy.deepcopy(model.state_dict())
    if kept is not None:
        model.load_state_dict(kept)
    return kept is not None


def search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, device="cpu", progress=None) -> SmoothResult:
    """Anneal the Lipschitz penalty from the interpolating `model` (modified in place to the chosen stage)."""
    start = time.perf_counter()
    device = torch.device(device)
    model.to(device)
    x, y = x.to(device), y.to(device)
    norms = OperatorNorms(model, x, cfg.seed)
    ok, acc, margin = _fit(model, x, y)
    trace = [{"lambda": 0.0, "interpolates": ok, "train_acc": acc, "min_margin": margin,
              "lip_product": norms.product(), "accepted": ok, "start": "erm"}]
    if not ok:
        model.eval()
        return SmoothResult(0.0, trace, time.perf_counter() - start, searched=False)
    best = [trace[0]["lip_product"] / margin, 0.0, copy.deepcopy(model.state_dict())]

    def attempt(lam: float, stage: int, refine: bool) -> bool:
        kept = copy.deepcopy(model.state_dict())
        t0 = time.perf_counter()
        _stage(model, x, y, cfg, lam, stage, norms)
        ok, acc, margin = _fit(model, x, y)  # at the stage's last interpolating epoch, if it had one
        lip = norms.product()
        trace.append({"lambda": lam, "interpolates": ok, "train_acc": acc, "min_margin": margin, "lip_product": lip,
                      "accepted": ok, "refine": refine, "seconds": round(time.perf_counter() - t0, 3)})
        if progress is not None:
            progress(len(trace) - 1, lam, ok, lip)
        if not ok:
            model.load_state_dict(kept)  # the next stage starts from the last model that fits
        elif lip / margin < best[0]:
            best[:] = [lip / margin, lam, copy.deepcopy(model.state_dict())]
        return ok

    good, bad, lam = 0.0, None, cfg.smooth_lambda
    for stage in range(cfg.smooth_stages):  # anneal: lambda grows while the model still interpolates
        if not attempt(lam, stage, False):
            bad = lam
            break
        good, lam = lam, lam * cfg.smooth_growth
    for r in range(cfg.smooth_refine if bad is not None else 0):  # bisect in log lambda: last kept .. first refused
        mid = math.sqrt(good * bad) if good > 0 else bad / cfg.smooth_growth
        if attempt(mid, cfg.smooth_stages + r, True):
            good = mid
        else:
            bad = mid
    model.load_state_dict(best[2])
    scaled = _scale_output(model, x, y, cfg.smooth_margin)
    model.eval()
    return SmoothResult(best[1], trace, time.perf_counter() - start, output_scale=scaled)


def _scale_output(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: float) -> float | None:
    """Scale the last linear layer (weight and bias) so the smallest training margin is `target`: all logits scale
    by one factor, predictions do not change. Returns the factor, or None (the model left as it was) when the last
    Linear/Conv2d module is not where the logits come from."""
    last = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)][-1]
    margin = _fit(model, x, y)[2]
    factor = target / margin
    kept = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)
    if not math.isclose(_fit(model, x, y)[2], target, rel_tol=1e-3):
        model.load_state_dict(kept)
        return None
    return factor
