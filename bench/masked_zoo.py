"""A masked zoo: MNIST models built to fool adversarial evaluations (gradient masking), each with a hand-written
adaptive reference attack that knows the model's architecture.

The models (all on MNIST-5k; most are the zoo's undefended MLP of bench.attacks_perf behind a masking front or back
end, sharing its cache entry):

* ``quant{4,16,256}-linf``, ``quant{16,256}-l2``: input rounded to 4 / 16 / 256 grey levels (zero gradient a.e.);
* ``step-linf``: input binarized at 0.5 (no gradient path at all);
* ``thermo-linf``: thermometer encoding with 16 levels (Buckman et al. 2018), an MLP trained on the encoding;
* ``saturate-linf``: an MLP with hidden activation tanh(k·h), trained at k = 1, evaluated at a large k;
* ``scaled-quant16-linf``: the 16-level quantizer in front, logits ×1e4 behind;
* ``noise-linf``, ``resize-linf``, ``noise-quant-linf``: randomized (Gaussian input noise; random resize and pad,
  Xie et al. 2018; noise then the 16-level quantizer).

Each model's reference attack (``ZooModel.reference(x, y, eps, seed)``) is written for that model, the way
Athalye et al. (2018) and Tramèr et al. (2020) break such defences:

* quantizers, step and thermometer under Linf: the attack works in the front end's *level space*. Every pixel can
  reach a contiguous range of levels inside the eps box; PGD runs on the network behind the front end over the
  relaxed range (a linear interpolation between levels: identity for a quantizer or the step, a piecewise-linear
  "ramp" thermometer for the encoding -- LS-PGA's relaxation without the temperature), every iterate is rounded to
  levels, mapped back to a pixel value inside the box that the real front end sends to those levels, and judged by
  the real model; then a greedy coordinate search on the exact margin changes single pixels' levels;
* quantizers under L2: BPDA (real forward, identity backward through the rounding) with normalised steps, and a
  "snap" that moves every pixel to the point of its quantization cell nearest the clean pixel (the model sees the
  same input, the perturbation shrinks): the projection is made on the snapped cost, so the budget is spent only on
  pixels that change level;
* saturating tanh(k·h): BPDA with the k = 1 (and a moderate k) activation in the backward pass, the real k forward;
* randomized models: EOT. Noise (with or without the quantizer) is exact and cheap through the first layer's
  linearity: W(x + σn) = Wx + σWn, so hundreds of draws per step cost a hidden layer each; the quantizer's rounding
  error after σ = 0.1 noise is close to uniform and independent of x, and is folded into the noise. Random resizing
  runs many draws through the real module. Candidates whose EOT draws' plurality is wrong are judged by
  ``misclassified(Randomized(model), ...)`` (the majority of 25 draws).

Every loss is the CW margin max_{j≠y} z_j − z_y (scale invariant). Every example counts only if it lies inside the
exact ball and [0, 1] (``attacks.threat.inside``, float64) and the real model misclassifies it in eval mode; per point
any valid example found at any iterate or restart is kept (per-point early exit).
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LINF_SWEEP = (0.05, 0.1, 0.2, 0.3)
L2_SWEEP = (0.5, 1.0, 1.5, 2.0)
L2_RADIUS = 1.0 - 2.0 ** -20  # L2 projections aim slightly inside the ball
SAT_K = 1000.0  # the saturating model's evaluation k: clean accuracy 92.7% (k=1: 92.2%, mnist5k test)


# ---------------------------------------------------------------------------------------------------------------
# masking modules


class Quantize(nn.Module):
    """Input rounded to `levels` grey levels: zero gradient almost everywhere."""

    def __init__(self, levels: int = 16):
        super().__init__()
        self.levels = int(levels)

    def forward(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class Scale(nn.Module):
    """Logits multiplied by a constant: the prediction is unchanged, cross-entropy saturates."""

    def __init__(self, factor: float = 1e4):
        super().__init__()
        self.factor = float(factor)

    def forward(self, z):
        return z * self.factor


class Noise(nn.Module):
    """Gaussian input noise of std `sigma` at every forward pass, eval mode too (randomized)."""

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, x):
        return x + self.sigma * torch.randn_like(x)


class Step(nn.Module):
    """Input binarized, (x > threshold): a step with no gradient path at all."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x):
        return (x > self.threshold).to(x.dtype)


class Thermometer(nn.Module):
    """Thermometer encoding (Buckman et al. 2018): channel k is (x > k/levels), output (N, levels·d), k-major."""

    def __init__(self, levels: int = 16):
        super().__init__()
        self.levels = int(levels)

    def forward(self, x):
        t = torch.arange(self.levels, device=x.device, dtype=x.dtype) / self.levels
        return (x.flatten(1)[:, None, :] > t[None, :, None]).to(x.dtype).flatten(1)


class SatTanh(nn.Module):
    """Hidden activation tanh(k·h): trained at k = 1, evaluated at a large k where gradients vanish numerically."""

    def __init__(self, k: float = 1.0):
        super().__init__()
        self.k = float(k)

    def forward(self, h):
        return torch.tanh(self.k * h)


class RandomResizePad(nn.Module):
    """Per image, resize to a random s in [smin, smax] (bilinear) and zero-pad at a random offset (Xie et al. 2018)."""

    def __init__(self, smin: int = 22, smax: int = 28):
        super().__init__()
        self.smin, self.smax = int(smin), int(smax)

    def forward(self, x):
        n, c, H, W = x.shape
        sizes = torch.randint(self.smin, self.smax + 1, (n,), device=x.device)
        parts, order = [], []
        for s in sizes.unique().tolist():
            idx = (sizes == s).nonzero().flatten()
            m = idx.numel()
            r = F.interpolate(x[idx], size=(s, s), mode="bilinear", align_corners=False)
            r = F.pad(r, (0, W - s, 0, H - s))  # the image at the top left, zeros elsewhere
            oy = (torch.rand(m, device=x.device) * (H - s + 1)).long().clamp(max=H - s)
            ox = (torch.rand(m, device=x.device) * (W - s + 1)).long().clamp(max=W - s)
            rows = (torch.arange(H, device=x.device)[None] - oy[:, None]) % H  # circular shift: wraps only zeros
            cols = (torch.arange(W, device=x.device)[None] - ox[:, None]) % W
            ar = torch.arange(m, device=x.device)
            shifted = r.permute(0, 2, 3, 1)[ar[:, None, None], rows[:, :, None], cols[:, None, :]]
            parts.append(shifted.permute(0, 3, 1, 2))
            order.append(idx)
        out = torch.cat(parts)
        return out[torch.argsort(torch.cat(order))]


# ---------------------------------------------------------------------------------------------------------------
# the zoo


@dataclass
class ZooModel:
    name: str
    model: nn.Module          # eval mode, (N,1,28,28) in [0,1] -> logits
    norm: str                 # "Linf" | "L2"
    eps: tuple                # its sweep
    masking: str              # what masks the gradient
    randomized: bool
    reference: Callable       # reference(x, y, eps, seed) -> Bool (N,): True = robust after the hand-written attack


NAMES = ("quant4-linf", "quant16-linf", "quant256-linf", "quant16-l2", "quant256-l2", "step-linf", "thermo-linf",
         "saturate-linf", "scaled-quant16-linf", "noise-linf", "resize-linf", "noise-quant-linf")


def masked_zoo(cache: Path, log, pattern: str = "*", quick: bool = False):
    """(models whose names match the comma-separated fnmatch `pattern` -- only those are built and trained --,
    x_test, y_test of mnist5k). Trained and cached as bench.attacks_perf's zoo (same undefended MLP cache entry)."""
    from lawbench.datasets import load_dataset
    from lawbench.models import get_model

    from bench.train import TrainConfig, train
    from bench.zoo import trained as _trained

    split = load_dataset("mnist5k", n_train=400 if quick else None, seed=0)
    xtr, ytr = split.x_train, split.y_train
    in_shape = tuple(split.meta.in_shape)
    d = int(math.prod(in_shape))
    tag = f"{'q' if quick else 'f'}{len(xtr)}"
    width = 32 if quick else 512
    erm = TrainConfig(recipe="erm", epochs=2 if quick else 30, seed=0)
    fit = lambda m: train(m, xtr, ytr, erm, torch.device("cpu"))  # noqa: E731
    budget = 0.25 if quick else 1.0

    def mlp():
        torch.manual_seed(0)
        return get_model("mlp", in_shape=in_shape, num_classes=10, width=width)

    def base():
        return _trained(f"mlp{width}-erm-{tag}", mlp, fit, cache, log)[0]

    def thermo():
        def build():
            torch.manual_seed(0)
            return nn.Sequential(Thermometer(16), nn.Linear(16 * d, width), nn.ReLU(), nn.Linear(width, 10))
        return _trained(f"thermo16-mlp{width}-erm-{tag}", build, fit, cache, log)[0]

    def saturate():
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Flatten(), nn.Linear(d, width), SatTanh(1.0), nn.Linear(width, 10))
        net = _trained(f"mlp{width}-tanh-erm-{tag}", build, fit, cache, log)[0]
        net[2].k = SAT_K
        return net

    seq = lambda *mods: nn.Sequential(*mods).eval()  # noqa: E731
    specs = {
        "quant4-linf": (lambda: seq(Quantize(4), base()), "Linf", "input rounded to 4 levels: zero gradient a.e."),
        "quant16-linf": (lambda: seq(Quantize(16), base()), "Linf", "input rounded to 16 levels: zero gradient a.e."),
        "quant256-linf": (lambda: seq(Quantize(256), base()), "Linf",
                          "input rounded to 256 levels: zero gradient a.e."),
        "quant16-l2": (lambda: seq(Quantize(16), base()), "L2", "input rounded to 16 levels: zero gradient a.e."),
        "quant256-l2": (lambda: seq(Quantize(256), base()), "L2", "input rounded to 256 levels: zero gradient a.e."),
        "step-linf": (lambda: seq(Step(0.5), base()), "Linf", "input binarized at 0.5: no gradient path at all"),
        "thermo-linf": (thermo, "Linf", "16-level thermometer encoding (comparisons): no gradient path at all"),
        "saturate-linf": (saturate, "Linf",
                          f"hidden tanh(k·h) trained at k=1, evaluated at k={SAT_K:g}: gradients vanish numerically"),
        "scaled-quant16-linf": (lambda: seq(Quantize(16), base(), Scale(1e4)), "Linf",
                                "16-level quantizer in front and logits ×1e4 behind: zero gradient, saturated CE"),
        "noise-linf": (lambda: seq(Noise(0.1), base()), "Linf", "Gaussian input noise σ=0.1 at every forward"),
        "resize-linf": (lambda: seq(RandomResizePad(22, 28), base()), "Linf",
                        "random resize to 22..28 px and zero-pad at a random offset at every forward"),
        "noise-quant-linf": (lambda: seq(Noise(0.1), Quantize(16), base()), "Linf",
                             "Gaussian noise σ=0.1 then a 16-level quantizer: random and zero gradient a.e."),
    }
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    out = {}
    for name, (make, norm, masking) in specs.items():
        if not any(fnmatch.fnmatch(name, p) for p in pats):
            continue
        model = make().eval()
        rand = name in ("noise-linf", "resize-linf", "noise-quant-linf")
        out[name] = ZooModel(name=name, model=model, norm=norm, eps=LINF_SWEEP if norm == "Linf" else L2_SWEEP,
                             masking=masking, randomized=rand, reference=_reference_for(name, model, norm, budget))
    return out, split.x_test, split.y_test


# ---------------------------------------------------------------------------------------------------------------
# reference attacks: shared pieces


def _margin(z, y):
    """CW margin max_{j≠y} z_j − z_y per row (> 0: misclassified)."""
    zy = z.gather(1, y[:, None])[:, 0]
    return z.scatter(1, y[:, None], float("-inf")).amax(1) - zy


class _Record:
    """Per point: broken yet, and the valid adversarial example found (inside the exact ball and [0,1], misclassified
    by the real model in eval mode; a randomized model by the majority verdict of Randomized's vote draws)."""

    def __init__(self, model, x, y, eps, norm, randomized):
        from lawbench.attacks.randomized import Randomized
        self.judge = Randomized(model) if randomized else model
        self.shape = tuple(x.shape[1:])
        self.x0 = x.detach().reshape(x.shape[0], -1)
        self.y, self.eps, self.norm = y, float(eps), norm
        self.broken = torch.zeros(x.shape[0], dtype=torch.bool)
        self.x_adv = self.x0.clone()
        self.offer(torch.arange(x.shape[0]), self.x0)  # a misclassified clean point is broken at distance 0

    def offer(self, idx, xa) -> torch.Tensor:
        """Judge candidates xa (rows of idx); record the valid ones. Returns Bool (len idx): valid."""
        from lawbench.attacks.threat import inside, misclassified
        xa = xa.detach()
        ok = inside(self.x0[idx], xa, self.eps, self.norm)
        sel = ok.nonzero().flatten()
        if sel.numel():
            ok[sel] = misclassified(self.judge, xa[sel].reshape(-1, *self.shape), self.y[idx[sel]])
        new = ok & ~self.broken[idx]
        self.x_adv[idx[new]] = xa[new]
        self.broken[idx[new]] = True
        return ok

    def todo(self, idx=None):
        idx = torch.arange(self.x0.shape[0]) if idx is None else idx
        return idx[~self.broken[idx]]


def _ascent(rec, obj, offer, start, project, step, *, steps, restarts, f0=0.5, f1=0.01):
    """Restarts of a projected gradient ascent on the points `rec` has not broken, with per-point early exit.

    obj(u, idx) -> (loss (A,) to maximise, differentiable in u; cand: Bool (A,) rows worth judging, or None: all);
    offer(u, idx) -> Bool (A,) judged broken (recorded in rec); start(r, idx) -> u; project(u, idx) -> u;
    step(u, g, frac, idx) -> u. The step fraction decays geometrically from f0 to f1 over the steps."""
    for r in range(restarts):
        act = rec.todo()
        if act.numel() == 0:
            return
        with torch.no_grad():
            u = project(start(r, act), act)
        for t in range(steps + 1):
            u = u.detach().requires_grad_(t < steps)
            if t < steps:
                loss, cand = obj(u, act)
                (g,) = torch.autograd.grad(loss.sum(), u)
            else:
                with torch.no_grad():
                    _, cand = obj(u, act)
            u = u.detach()
            with torch.no_grad():
                hit = torch.zeros(act.numel(), dtype=torch.bool)
                c = torch.arange(act.numel()) if cand is None else cand.nonzero().flatten()
                if c.numel():
                    hit[c] = offer(u[c], act[c])
                if t == steps:
                    break
                keep = ~hit & ~rec.broken[act]
                act, u, g = act[keep], u[keep], g[keep]
                if act.numel() == 0:
                    break
                frac = f0 * (f1 / f0) ** (t / max(steps - 1, 1))
                u = project(step(u, g, frac, act), act)


def _sign_step(width):
    """Linf: the signed gradient times frac of each coordinate's box width."""
    return lambda u, g, frac, idx: u + frac * width[idx] * g.sign()


def _l2_step(eps):
    """L2: the normalised gradient times frac·eps."""
    return lambda u, g, frac, idx: u + (frac * eps) * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _clamp_box(lo, hi):
    return lambda u, idx: torch.max(torch.min(u, hi[idx]), lo[idx])


def _l2_ball(x0, eps):
    """Projection on the L2 ball of radius eps·L2_RADIUS around x0, then [0, 1] (what ascent iterates need)."""
    r = eps * L2_RADIUS

    def project(x, idx):
        d = x - x0[idx]
        n = d.norm(dim=1, keepdim=True)
        return torch.clamp(x0[idx] + d * torch.clamp(r / n.clamp_min(1e-30), max=1.0), 0.0, 1.0)
    return project


def _uniform(gen, lo, hi):
    return lo + (hi - lo) * torch.rand(lo.shape, generator=gen)


def _l2_random(gen, x0, eps):
    """A random point of the L2 ball (uniform direction, radius U(0,1)·eps)."""
    g = torch.randn(x0.shape, generator=gen)
    r = torch.rand((x0.shape[0], 1), generator=gen)
    return x0 + g * (r * eps / g.norm(dim=1, keepdim=True))


def _run(model, x, y, eps, norm, seed, randomized, attack):
    """The shared frame of every reference: seeds (the model's own draws from torch's global generator, ours from
    a local one), the record, the attack, the robust mask."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        rec = _Record(model, x, y, eps, norm, randomized)
        if float(eps) > 0:
            attack(rec, gen)
    return ~rec.broken


# ---------------------------------------------------------------------------------------------------------------
# Linf attacks in level space (quantizers, step, thermometer)


def _level_fns(front):
    """(level(v), enc(u), val(m)) of a discrete front end: pixel value -> level (float), relaxed levels -> the
    network's input, level -> a pixel value the front end sends to it (when it lies in the box)."""
    if isinstance(front, Quantize):
        q = front.levels - 1
        return (lambda v: torch.round(v * q)), (lambda u: u / q), (lambda m: m / q)
    if isinstance(front, Step):
        thr = front.threshold
        return (lambda v: (v > thr).to(v.dtype)), (lambda u: u), (lambda m: m)
    if isinstance(front, Thermometer):
        L = front.levels
        t = torch.arange(L, dtype=torch.float32) / L
        k = torch.arange(L, dtype=torch.float32)
        return ((lambda v: (v[..., None] > t).sum(-1).to(v.dtype)),
                (lambda u: torch.clamp(u[:, None, :] - k[None, :, None], 0.0, 1.0).flatten(1)),
                (lambda m: m / L))
    raise TypeError(f"no level space for {type(front).__name__}")


def _level_attack(rec, gen, front, net, *, steps, restarts, greedy):
    """PGD over the relaxed reachable levels of every pixel, each iterate rounded, mapped back into the box and
    judged by the real model; then a greedy search over single-pixel level changes on the exact margin."""
    from lawbench.attacks.threat import box_bounds
    level, enc, val = _level_fns(front)
    x0, y = rec.x0, rec.y
    lo, hi = box_bounds(x0, rec.eps, "Linf")
    a, b, m0 = level(lo), level(hi), level(x0)

    def decode(u, idx):
        m = torch.minimum(torch.maximum(torch.round(u), a[idx]), b[idx])
        return torch.where(m == m0[idx], x0[idx], torch.minimum(torch.maximum(val(m), lo[idx]), hi[idx]))

    def obj(u, idx):
        return _margin(net(enc(u)), y[idx]), None

    best_m = torch.full((x0.shape[0],), -math.inf)
    best_u = m0.clone()

    def offer(u, idx):
        xa = decode(u, idx)
        with torch.no_grad():  # the exact margin, for the greedy stage's start
            z = net(enc(level(xa)))
        marg = _margin(z, y[idx])
        better = marg > best_m[idx]
        best_m[idx[better]] = marg[better]
        best_u[idx[better]] = torch.round(u[better]).clamp(a[idx[better]], b[idx[better]])
        return rec.offer(idx, xa)

    def start(r, idx):
        if r == 0:
            return m0[idx].clone()
        if r % 2 == 1:
            return _uniform(gen, a[idx], b[idx])
        return torch.where(torch.rand(a[idx].shape, generator=gen) < 0.5, a[idx], b[idx])  # a random corner

    _ascent(rec, obj, offer, start, _clamp_box(a, b), _sign_step(b - a), steps=steps, restarts=restarts,
            f0=0.5, f1=0.02)
    if greedy:
        _greedy_levels(rec, net, enc, a, b, m0, best_u, decode, greedy)


def _greedy_levels(rec, net, enc, a, b, m0, start_u, decode, rounds, top=48):
    """Coordinate ascent on the exact margin in level space: per round, the `top` single-pixel moves (to a pixel's
    lowest or highest reachable level, or one level up or down) a first-order estimate ranks best are evaluated
    exactly, and the best is taken while it raises the margin."""
    y = rec.y
    act = rec.todo()
    if act.numel() == 0:
        return
    u = start_u[act].clone()
    for _ in range(rounds):
        if act.numel() == 0:
            return
        A, d = u.shape
        uu = u.clone().requires_grad_(True)
        cur = _margin(net(enc(uu)), y[act])
        (g,) = torch.autograd.grad(cur.sum(), uu)
        cur = cur.detach()
        aa, bb = a[act], b[act]
        moves = torch.stack([aa, bb, (u + 1).clamp(max=bb), (u - 1).clamp(min=aa)], 1)  # (A, 4, d)
        delta = moves - u[:, None, :]
        est = (g[:, None, :] * delta).masked_fill(delta == 0, -math.inf).flatten(1)  # (A, 4d)
        k = min(top, est.shape[1])
        cand = est.topk(k, dim=1).indices  # (A, k)
        pix = cand % d
        newv = moves.flatten(1).gather(1, cand)
        trial = u[:, None, :].repeat(1, k, 1)
        trial.scatter_(2, pix[:, :, None], newv[:, :, None])
        with torch.no_grad():
            z = net(enc(trial.reshape(A * k, d)))
            mt = _margin(z, y[act].repeat_interleave(k)).view(A, k)
            mt = mt.masked_fill(torch.isinf(est.gather(1, cand)), -math.inf)
        bestm, j = mt.max(1)
        improve = bestm > cur
        u = torch.where(improve[:, None], trial[torch.arange(A), j], u)
        hit = torch.zeros(A, dtype=torch.bool)
        h = (improve & (bestm > 0)).nonzero().flatten()
        if h.numel():
            hit[h] = rec.offer(act[h], decode(u[h], act[h]))
        keep = improve & ~hit
        act, u = act[keep], u[keep]


# ---------------------------------------------------------------------------------------------------------------
# per-model references


def _ref_level(model, budget):
    """Quantizer / step / thermometer under Linf: level-space PGD and greedy search (see the module docstring)."""
    front, net = model[0], model[1:]
    if isinstance(front, Quantize) and front.levels > 32:
        steps, restarts, greedy = 100, 4, 0
    else:
        steps, restarts, greedy = 100, 10, 60

    def attack(rec, gen):
        _level_attack(rec, gen, front, net, steps=max(1, int(steps * budget)),
                      restarts=max(2, int(restarts * budget)), greedy=int(greedy * budget))

    return lambda x, y, eps, seed: _run(model, x, y, eps, "Linf", seed, False, attack)


def _quant_snap(levels):
    """snap(x, x0): every pixel moved to the point of its quantization cell nearest x0 (x0 itself when the level is
    unchanged): the quantizer's output is unchanged, the perturbation is the smallest that gives it."""
    q = levels - 1

    def cell_edge(m, up):
        # the smallest (up) / largest (down) float32 value that rounds to level m
        t = ((m - 0.5) / q) if up else ((m + 0.5) / q)
        t = t.to(torch.float32)
        toward = torch.full_like(t, math.inf if up else -math.inf)
        for _ in range(4):
            bad = torch.round(t * q) != m
            if not bool(bad.any()):
                break
            t = torch.where(bad, torch.nextafter(t, toward), t)
        back = torch.full_like(t, -math.inf if up else math.inf)
        for _ in range(4):  # step back towards x0 while still in the cell
            tt = torch.nextafter(t, back)
            ok = torch.round(tt * q) == m
            if not bool(ok.any()):
                break
            t = torch.where(ok, tt, t)
        return t

    def snap(x, x0):
        m, m0 = torch.round(x * q), torch.round(x0 * q)
        up = torch.clamp(cell_edge(m, True), 0.0, 1.0)
        down = torch.clamp(cell_edge(m, False), 0.0, 1.0)
        return torch.where(m > m0, up, torch.where(m < m0, down, x0))

    def cost(x, x0):
        """Float64 L2 norm of snap(x) − x0 (cheap approximation: the cell edge (m ∓ 0.5)/q)."""
        m, m0 = torch.round(x * q), torch.round(x0 * q)
        x0d = x0.double()
        e = torch.where(m > m0, (m.double() - 0.5) / q - x0d, torch.where(m < m0, x0d - (m.double() + 0.5) / q,
                                                                           torch.zeros_like(x0d)))
        return e.clamp_min(0).norm(dim=1)

    return snap, cost


def _ref_quant_l2(model, budget):
    """Quantizer under L2: BPDA (identity backward through the rounding), normalised steps, margin loss; restarts
    alternate a plain L2 projection with one on the snapped cost (budget spent only on pixels that change level)."""
    front, mlp = model[0], model[1:]
    snap, cost = _quant_snap(front.levels)
    steps, restarts = max(1, int(100 * budget)), max(2, int(8 * budget))

    def attack(rec, gen):
        x0, y, eps = rec.x0, rec.y, rec.eps
        plain = _l2_ball(x0, eps)
        r_eps = eps * L2_RADIUS

        def snapped(x, idx):
            x = torch.clamp(x, 0.0, 1.0)
            d = x - x0[idx]
            c_lo = torch.zeros(x.shape[0], 1)
            c_hi = torch.ones(x.shape[0], 1)
            full = cost(x, x0[idx]) <= r_eps * (1 - 1e-6)
            for _ in range(16):
                c = (c_lo + c_hi) / 2
                ok = cost(torch.clamp(x0[idx] + c * d, 0, 1), x0[idx]) <= r_eps * (1 - 1e-6)
                c_lo = torch.where(ok[:, None], c, c_lo)
                c_hi = torch.where(ok[:, None], c_hi, c)
            c = torch.where(full[:, None], torch.ones_like(c_lo), c_lo)
            return torch.clamp(x0[idx] + c * d, 0.0, 1.0)

        def obj(x, idx):
            xs = x + (front(x) - x).detach()
            m = _margin(mlp(xs.reshape(-1, *rec.shape)), y[idx])
            return m, m.detach() > 0

        def offer(x, idx):
            xa = snap(x, x0[idx])
            ok = rec.offer(idx, xa)
            bad = ~ok
            if bool(bad.any()):  # the snapped point is outside by rounding: the plain projection of it
                b = bad.nonzero().flatten()
                xp = plain(xa[b], idx[b])
                ok[b] = rec.offer(idx[b], xp)
            return ok

        def start(r, idx):
            return x0[idx].clone() if r == 0 else _l2_random(gen, x0[idx], eps)

        half = max(1, restarts // 2)
        _ascent(rec, obj, offer, start, snapped, _l2_step(eps), steps=steps, restarts=half, f0=0.5, f1=0.02)
        _ascent(rec, obj, offer, start, plain, _l2_step(eps), steps=steps, restarts=restarts - half, f0=0.5, f1=0.02)

    return lambda x, y, eps, seed: _run(model, x, y, eps, "L2", seed, False, attack)


def _ref_saturate(model, budget):
    """tanh(k·h) with a large k: BPDA with a small surrogate k in the backward pass, the real k forward."""
    flat, lin1, act, lin2 = model[0], model[1], model[2], model[3]
    steps = max(1, int(100 * budget))
    plan = (1.0, 1.0, 10.0, 1.0, 3.0, 1.0, 30.0, 1.0)  # surrogate k per restart
    plan = plan[:max(2, int(len(plan) * budget))]

    def attack(rec, gen):
        from lawbench.attacks.threat import box_bounds
        x0, y = rec.x0, rec.y
        lo, hi = box_bounds(x0, rec.eps, "Linf")
        for r, ks in enumerate(plan):
            def obj(x, idx, ks=ks):
                h = lin1(x)
                s = torch.tanh(ks * h)
                z = lin2(s + (act(h) - s).detach())
                m = _margin(z, y[idx])
                return m, m.detach() > 0

            def start(_, idx, r=r):
                return x0[idx].clone() if r == 0 else _uniform(gen, lo[idx], hi[idx])

            _ascent(rec, obj, lambda x, idx: rec.offer(idx, x), start, _clamp_box(lo, hi), _sign_step(hi - lo),
                    steps=steps, restarts=1, f0=0.5, f1=0.02)

    return lambda x, y, eps, seed: _run(model, x, y, eps, "Linf", seed, False, attack)


def _plurality_wrong(z, y):
    """Bool (A,): over the draws z (A, D, C), the label is not the strictly most frequent prediction."""
    counts = F.one_hot(z.argmax(2), z.shape[2]).sum(1)
    own = counts.gather(1, y[:, None])[:, 0]
    return own < counts.amax(1)


def _ref_noise(model, budget, quant_levels=None):
    """Gaussian noise (optionally then a quantizer) in front of the MLP: EOT through the first layer's linearity,
    W(x + σn) + b = Wx + b + σWn, with fresh draws every step; a quantizer's rounding error is folded into the noise
    as an independent uniform error of its cell width. Judged by the majority verdict."""
    noise, mlp = model[0], model[-1]
    lin1, lin2 = mlp[1], mlp[3]
    sigma = noise.sigma
    if quant_levels:
        sigma = math.sqrt(sigma ** 2 + (1.0 / (quant_levels - 1)) ** 2 / 12.0)
    draws = 256
    steps, restarts = max(1, int(100 * budget)), max(2, int(6 * budget))

    def attack(rec, gen):
        from lawbench.attacks.threat import box_bounds
        x0, y = rec.x0, rec.y
        lo, hi = box_bounds(x0, rec.eps, "Linf")
        W, b = lin1.weight.detach(), lin1.bias.detach()

        def obj(x, idx):
            with torch.no_grad():
                xi = (sigma * torch.randn(draws, W.shape[1], generator=gen)) @ W.T  # (D, hidden)
            h = x @ W.T + b
            z = lin2(torch.relu(h[:, None, :] + xi[None]))  # (A, D, C)
            A, D, C = z.shape
            m = _margin(z.reshape(A * D, C), y[idx].repeat_interleave(D)).view(A, D)
            return m.mean(1), _plurality_wrong(z.detach(), y[idx])

        def start(r, idx):
            return x0[idx].clone() if r == 0 else _uniform(gen, lo[idx], hi[idx])

        _ascent(rec, obj, lambda x, idx: rec.offer(idx, x), start, _clamp_box(lo, hi), _sign_step(hi - lo),
                steps=steps, restarts=restarts, f0=0.5, f1=0.02)

    return lambda x, y, eps, seed: _run(model, x, y, eps, "Linf", seed, True, attack)


def _ref_resize(model, budget):
    """Random resize and pad: EOT through the real module (a fresh transform per row and draw), margin averaged
    over the draws; judged by the majority verdict."""
    draws = 32
    steps, restarts = max(1, int(60 * budget)), max(2, int(3 * budget))

    def attack(rec, gen):
        from lawbench.attacks.threat import box_bounds
        x0, y = rec.x0, rec.y
        lo, hi = box_bounds(x0, rec.eps, "Linf")

        def obj(x, idx):
            A = x.shape[0]
            z = model(x.reshape(A, *rec.shape).repeat(draws, *([1] * len(rec.shape))))
            z = z.view(draws, A, -1).transpose(0, 1)  # (A, D, C)
            m = _margin(z.reshape(A * draws, -1), y[idx].repeat_interleave(draws)).view(A, draws)
            return m.mean(1), _plurality_wrong(z.detach(), y[idx])

        def start(r, idx):
            return x0[idx].clone() if r == 0 else _uniform(gen, lo[idx], hi[idx])

        _ascent(rec, obj, lambda x, idx: rec.offer(idx, x), start, _clamp_box(lo, hi), _sign_step(hi - lo),
                steps=steps, restarts=restarts, f0=0.5, f1=0.02)

    return lambda x, y, eps, seed: _run(model, x, y, eps, "Linf", seed, True, attack)


def _reference_for(name, model, norm, budget):
    if name in ("quant16-l2", "quant256-l2"):
        return _ref_quant_l2(model, budget)
    if name == "scaled-quant16-linf" or name.startswith("quant") or name in ("step-linf", "thermo-linf"):
        return _ref_level(model, budget)
    if name == "saturate-linf":
        return _ref_saturate(model, budget)
    if name == "noise-linf":
        return _ref_noise(model, budget)
    if name == "noise-quant-linf":
        return _ref_noise(model, budget, quant_levels=model[1].levels)
    if name == "resize-linf":
        return _ref_resize(model, budget)
    raise KeyError(name)
