"""The `smooth` recipe: per width, the interpolator with the smallest certified Lipschitz bound that several searches find.

The law bounds the *smoothest* model that fits the noisy training set, not whichever one ERM lands on. One search
(an *attempt*):

* starts from an interpolator: ERM's (trained, or the cached ERM checkpoint of the same cell), or, for the
  `scratch` attempt, a fresh initialisation trained with the hinge and the first penalty until it fits every label
  (a start that owes nothing to ERM's basin);
* fine-tunes it with a hinge on the logit margin, mean(relu(margin_target - margin)), plus lambda times the sum of
  log operator norms of the linear layers (Linear, Conv2d), lambda growing geometrically stage by stage (annealing);
  a stage is accepted while the model still interpolates, the first that does not ends the growth, and bisection
  in log lambda between the last accepted and the first refused value refines it;
* keeps its accepted stage with the smallest ratio of the product of operator norms to the smallest training margin.

The recipe runs 1 + smooth_restarts attempts from ERM (each restart starts half a growth step lower, with its own
batch order) and, with smooth_scratch, one from scratch. Each attempt's result is measured by the certified bound a
row reports (lawbench.certify.lipschitz_upper, L2) over its smallest training margin, the same quantity for every
attempt and for ERM's interpolator; the lowest wins, and the output layer is scaled so the smallest margin is exactly
the target. A search whose attempts all end at or above ERM's interpolator has failed: it is retried once from ERM
(a lower first penalty, twice the epochs per stage); if that fails too the row keeps ERM's interpolator (it is the
smoothest interpolator found) and says so (`no_gain`; the runner flags the row `smooth-no-gain`).

Why these choices:
* The product of the layers' operator norms is (an upper bound of) the certified global bound a row reports as
  lip_upper, and the law speaks of the global constant. A penalty on input gradients at sampled points lowers the
  local slopes only where it samples and leaves the certificate where it was. Within an attempt the product ranks the
  stages (it costs nothing); between attempts the certificate itself decides, because the row reports it and a
  product can rank two models in the other order than their certificates.
* A margin: a classifier's logits can be scaled down without changing one prediction, so "the smallest Lipschitz
  constant that fits" has no minimum without one (a search on interpolation alone drifts to margins near 0). The
  law's f(x_i) = y_i fixes the output scale; a logit margin (default 1) is its classification analogue, and
  Lipschitz constant over smallest margin is the scale-free quantity the search minimises. Rows of every recipe
  record their smallest training margin.
* Several attempts: one annealing path is chaotic (an accept or a refuse flips with the float sums), so one attempt's
  end point moved by 30% between runs; the minimum over attempts moves far less, and the spread of the attempts is
  recorded so a reader sees how far the search is from settled.
* Operator norms by power iteration with vectors kept across steps (as spectral normalisation does): one iteration
  per step costs two layer applications, and the estimate converges as the weights move slowly.

Every random choice (initialisation of the scratch attempt, batch order per stage) flows from the config's seed; the
search is deterministic on CPU for a given thread count (bench.threads chooses it by rule).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench import optim
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

    @staticmethod
    def _adjoint(m: nn.Module, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """W^T v: a Linear layer's by one product (torch.func.vjp cost a third of a search step on small MLPs), a
        convolution's by the transposed convolution at u's shape."""
        if isinstance(m, nn.Linear):
            return v @ m.weight
        _, adjoint = torch.func.vjp(lambda z: OperatorNorms._apply(m, z, m.weight), u)
        return adjoint(v)[0]

    @torch.no_grad()
    def iterate(self, steps: int = 1) -> None:
        for i, m in enumerate(self.layers):
            u = self.vectors[i]
            for _ in range(steps):
                v = self._apply(m, u, m.weight)
                u = self._adjoint(m, u, v / v.norm().clamp_min(1e-30))
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


@dataclass(frozen=True)
class Start:
    """Where one attempt starts: `erm` (ERM's interpolator) or `scratch` (a fresh initialisation), its first penalty,
    the seed of its batch order (and of the scratch initialisation) and its epochs per stage."""
    method: str
    penalty: float
    seed: int
    epochs: int
    retry: bool = False


def starts(cfg) -> list[Start]:
    """The attempts a search runs (the retry is added only when these all fail): from ERM at smooth_lambda; then each
    restart r from ERM at smooth_lambda * growth^(-r/2), so the restarts' penalties fall between and below the first
    attempt's; then one from scratch."""
    base = cfg.seed * 1000 + 7
    out = [Start("erm", cfg.smooth_lambda * cfg.smooth_growth ** (-r / 2), base + 100 * r, cfg.smooth_epochs)
           for r in range(1 + cfg.smooth_restarts)]
    if cfg.smooth_scratch:
        out.append(Start("scratch", cfg.smooth_lambda, base + 100 * len(out), cfg.smooth_epochs))
    return out


def retry_start(cfg, attempts: int) -> Start:
    """The one retry of a search whose attempts all failed: from ERM, the first penalty one growth step below the
    lowest the restarts tried, twice the epochs per stage."""
    lowest = cfg.smooth_lambda * cfg.smooth_growth ** (-cfg.smooth_restarts / 2)
    return Start("erm", lowest / cfg.smooth_growth, cfg.seed * 1000 + 7 + 100 * attempts, 2 * cfg.smooth_epochs,
                 retry=True)


@dataclass
class SmoothResult:
    penalty: float               # the winner's lambda (0: no attempt beat ERM's interpolator, which stands)
    trace: list = field(default_factory=list)     # every stage of every attempt ("attempt": its index)
    seconds: float = 0.0
    searched: bool = True        # False when the ERM start did not interpolate (nothing to search from)
    output_scale: float | None = None  # the factor that set the smallest margin to the target (None: not applied)
    attempts: list = field(default_factory=list)  # one record per attempt (see _record)
    winner: int | None = None    # index of the winning attempt; None: ERM's interpolator stands
    erm_bound: float | None = None  # ERM's interpolator: certified bound over its smallest margin
    bound_method: str = "certified"  # "certified" (lipschitz_upper), or "product" where certify refuses the model

    @property
    def no_gain(self) -> bool:
        """The search found no interpolator below ERM's (retry included)."""
        return self.searched and self.winner is None


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float, float]:
    """(interpolates, train accuracy, smallest margin) in eval mode."""
    m = train_margins(model, x, y)
    return bool((m > 0).all()), float((m > 0).float().mean()), float(m.min())


def _epochs(model, x, y, cfg, lam: float, norms: OperatorNorms, gen: torch.Generator, epochs: int, lr: float,
            stop_margin: float | None = None) -> bool:
    """Train in place with the hinge plus lam times the log norms and end at the last epoch that interpolates (a
    fresh optimizer's first steps can knock a point over that later epochs win back), or earlier, at the first epoch
    whose smallest margin reaches stop_margin. Returns whether any epoch interpolated."""
    opt = optim.build(torch.optim.Adam, [p for p in model.parameters() if p.requires_grad], lr=lr)
    kept = None
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        model.train()
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            norms.iterate(1)
            hinge = F.relu(cfg.smooth_margin - margins(model(x[idx]), y[idx])).mean()
            loss = hinge + lam * norms.log_norms()
            optim.zero_grad(opt)
            loss.backward()
            optim.step(opt)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"smooth search diverged at lambda {lam:g}; lower lr")
        fits, _, margin = _fit(model, x, y)
        if fits:
            kept = copy.deepcopy(model.state_dict())
            if stop_margin is not None and margin >= stop_margin:
                break
    if kept is not None:
        model.load_state_dict(kept)
    return kept is not None


def _reinit(model: nn.Module, seed: int) -> None:
    """Every module's own initialisation, drawn from `seed` (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def certified_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norms: OperatorNorms) -> tuple[float, str]:
    """(bound over the smallest training margin, how the bound was taken): the certified L2 bound a row reports,
    or the product of operator norms where certify refuses the model."""
    from lawbench import certify
    margin = _fit(model, x, y)[2]
    try:
        return certify.lipschitz_upper(model, tuple(x.shape[1:]), pairs=False).value / margin, "certified"
    except certify.CertifyError:
        return norms.product() / margin, "product"


class _Attempt:
    """One anneal from one start; `best` is its accepted stage with the smallest product per unit margin."""

    def __init__(self, model, x, y, cfg, start: Start, index: int, progress):
        self.model, self.x, self.y, self.cfg, self.start, self.index = model, x, y, cfg, start, index
        self.progress, self.trace, self.best = progress, [], None
        self.norms = OperatorNorms(model, x, start.seed)
        self.gen = torch.Generator().manual_seed(start.seed)

    def stage(self, lam: float, refine: bool) -> bool:
        kept = copy.deepcopy(self.model.state_dict())
        t0 = time.perf_counter()
        _epochs(self.model, self.x, self.y, self.cfg, lam, self.norms, self.gen, self.start.epochs,
                self.cfg.smooth_lr or self.cfg.lr / 10)
        self.note(lam, refine, time.perf_counter() - t0)
        ok = self.trace[-1]["interpolates"]
        if not ok:
            self.model.load_state_dict(kept)  # the next stage starts from the last model that fits
        return ok

    def note(self, lam: float, refine: bool, seconds: float, **extra) -> None:
        ok, acc, margin = _fit(self.model, self.x, self.y)  # at the stage's last interpolating epoch, if it had one
        lip = self.norms.product()
        self.trace.append({"attempt": self.index, "lambda": lam, "interpolates": ok, "train_acc": acc,
                           "min_margin": margin, "lip_product": lip, "accepted": ok, "refine": refine,
                           "seconds": round(seconds, 3), **extra})
        if self.progress is not None:
            self.progress(self.index, len(self.trace) - 1, lam, ok, lip)
        if ok and lam > 0 and (self.best is None or lip / margin < self.best[0]):
            self.best = (lip / margin, lam, copy.deepcopy(self.model.state_dict()))

    def run(self) -> None:
        cfg, lam = self.cfg, self.start.penalty
        good, bad = 0.0, None
        for stage in range(cfg.smooth_stages):  # anneal: lambda grows while the model still interpolates
            if not self.stage(lam, False):
                bad = lam
                break
            good, lam = lam, lam * cfg.smooth_growth
        for _ in range(cfg.smooth_refine if bad is not None else 0):  # bisect in log lambda: last kept .. refused
            mid = math.sqrt(good * bad) if good > 0 else bad / cfg.smooth_growth
            if self.stage(mid, True):
                good = mid
            else:
                bad = mid


def _from_scratch(model, x, y, cfg, start: Start) -> tuple[bool, float]:
    """A fresh initialisation trained with the hinge and the first penalty until every training margin reaches the
    target (at most cfg.epochs epochs at the training rate; else its last epoch that fits): the scratch attempt's
    start. Returns (fits, seconds)."""
    t0 = time.perf_counter()
    _reinit(model, start.seed)
    norms = OperatorNorms(model, x, start.seed)
    gen = torch.Generator().manual_seed(start.seed + 1)
    fits = _epochs(model, x, y, cfg, start.penalty, norms, gen, cfg.epochs, cfg.lr, stop_margin=cfg.smooth_margin)
    return fits, time.perf_counter() - t0


def _run_attempt(model, x, y, cfg, start: Start, index: int, erm_state: dict, progress) -> _Attempt:
    """One attempt from its start; the model ends at the attempt's best stage (unchanged start if none)."""
    model.load_state_dict(erm_state)
    fits, seconds = True, 0.0
    if start.method == "scratch":
        fits, seconds = _from_scratch(model, x, y, cfg, start)
    att = _Attempt(model, x, y, cfg, start, index, progress)
    att.note(0.0 if start.method == "erm" else start.penalty, False, seconds, start=start.method)
    if fits:
        att.run()
    if att.best is not None:
        model.load_state_dict(att.best[2])
    return att


def _record(att: _Attempt, bound: float | None, seconds: float) -> dict:
    s = att.start
    return {"method": s.method, "first_penalty": s.penalty, "seed": s.seed, "epochs_per_stage": s.epochs,
            "retry": s.retry, "start_fits": att.trace[0]["interpolates"], "stages": len(att.trace) - 1,
            "penalty": None if att.best is None else att.best[1], "bound_unit_margin": bound,
            "won": False, "seconds": round(seconds, 3)}


def search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, device="cpu", progress=None) -> SmoothResult:
    """Every attempt from the interpolating `model` (ERM's; modified in place to the winner, output scaled).
    progress(attempt, stage, lambda, fits, product) after every stage."""
    start_time = time.perf_counter()
    device = torch.device(device)
    model.to(device)
    x, y = x.to(device), y.to(device)
    norms = OperatorNorms(model, x, cfg.seed)
    ok, acc, margin = _fit(model, x, y)
    trace = [{"attempt": None, "lambda": 0.0, "interpolates": ok, "train_acc": acc, "min_margin": margin,
              "lip_product": norms.product(), "accepted": ok, "start": "erm"}]
    if not ok:
        model.eval()
        return SmoothResult(0.0, trace, time.perf_counter() - start_time, searched=False)
    erm_bound, method = certified_ratio(model, x, y, norms)
    erm_state = copy.deepcopy(model.state_dict())
    found: list[tuple[_Attempt, float | None, dict]] = []

    def attempt(start: Start) -> None:
        t0 = time.perf_counter()
        att = _run_attempt(model, x, y, cfg, start, len(found), erm_state, progress)
        bound = None
        if att.best is not None:
            bound, how = certified_ratio(model, x, y, att.norms)
            bound = bound if how == method else None  # one measure for ERM and every attempt
        found.append((att, bound, _record(att, bound, time.perf_counter() - t0)))
        trace.extend(att.trace)

    gains = lambda: [i for i, (_, b, _) in enumerate(found) if b is not None and b < erm_bound]  # noqa: E731
    for st in starts(cfg):
        attempt(st)
    if not gains():
        attempt(retry_start(cfg, len(found)))
    wins = gains()
    winner = min(wins, key=lambda i: (found[i][1], i)) if wins else None
    records = [rec for _, _, rec in found]
    if winner is None:
        model.load_state_dict(erm_state)
    else:
        model.load_state_dict(found[winner][0].best[2])
        records[winner]["won"] = True
    scaled = _scale_output(model, x, y, cfg.smooth_margin)
    model.eval()
    penalty = 0.0 if winner is None else found[winner][0].best[1]
    return SmoothResult(penalty, trace, time.perf_counter() - start_time, output_scale=scaled, attempts=records,
                        winner=winner, erm_bound=erm_bound, bound_method=method)


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
