"""Empirical (always valid) lower bounds on the global L2 Lipschitz constant of the logit map.

Every number that can become the reported value is a *secant* ||f(a) - f(b)||_2 / ||a - b||_2 evaluated on a float64
copy of the model, which is <= Lip(f) by definition, for any a != b. Everything else only *chooses* good pairs and
runs in the model's own precision (float32):

1. screening: the input gradient of the top-2 logit margin f_y - f_j at every given point (one backward per batch);
   ||grad (f_y - f_j)|| / sqrt(2) <= ||J(x)||_2 because ||e_y - e_j|| = sqrt(2);
2. exact local Jacobians at the best-screened points (C vector-Jacobian products; top singular pair from the C x C
   Gram; power iteration on J^T J via jvp/vjp when C > 64); the top right singular vector v of J(x) becomes the
   secant (x - t v, x + t v) with a small step t, whose value is ||J(x)||_2 up to O(t) inside a linear region;
3. the given pairs (x, x_adv): their secants (logits reused when the pair ends are among the given points);
4. an optimised pair search: Adam ascent on log ||f(a) - f(b)|| - log ||a - b|| from the best local directions and
   the best given pairs, both endpoints projected on the data domain, keeping the best pair per start; the exact
   local Jacobians at the best end points are added as in 2.
5. verification: every candidate of 2-4 is recomputed as a float64 secant; the reported value is the largest.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from lawbench.base.modes import eval_mode
from lawbench.base.timing import Timer

from ._linalg import lapack_threads
from ._walk import CertifyError, float64_copy

__all__ = ["LowerBound", "lipschitz_lower", "local_lipschitz"]


@dataclass
class LowerBound:
    """An empirical lower bound on the global L2 Lipschitz constant of the logit map.

    value: the largest verified secant found; method: which component produced it (and the settings);
    seconds: wall-clock time; details: every component's best value (``margin_grad_screen`` and ``jacobian_power``
    are informative float32/Jacobian numbers, the others are verified secants)."""
    value: float
    method: str
    seconds: float
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value, "method": self.method, "seconds": self.seconds, "details": self.details}


def _input_grad(obj: torch.Tensor, x: torch.Tensor, **kw) -> torch.Tensor:
    """d obj / d x; zero where the output does not depend differentiably on x (a non-differentiable step)."""
    if not obj.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(obj, x, allow_unused=True, **kw)
    return torch.zeros_like(x) if g is None else g


def _device_of(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _as_batches(points) -> list[torch.Tensor]:
    if points is None:
        return []
    if isinstance(points, torch.Tensor):
        return [points]
    return [p for p in points if isinstance(p, torch.Tensor) and p.numel() > 0]


def _secants(f, a: torch.Tensor, b: torch.Tensor, min_dist: float = 1e-9) -> torch.Tensor:
    """Per-row secant ||f(a) - f(b)|| / ||a - b|| (float64); rows with ||a - b|| <= min_dist * (1 + ||a||) give 0."""
    with torch.no_grad():
        fa, fb = f(a), f(b)
    num = (fa - fb).reshape(len(a), -1).norm(dim=1)
    den = (a - b).reshape(len(a), -1).norm(dim=1)
    ok = den > min_dist * (1 + a.reshape(len(a), -1).norm(dim=1))
    out = torch.zeros(len(a), dtype=torch.float64, device=a.device)
    out[ok] = num[ok] / den[ok]
    return out


def _power(f, x: torch.Tensor, v: torch.Tensor, iters: int, tol: float = 1e-9):
    """Batched power iteration on J(x)^T J(x); returns (||J v|| per row, unit v per row)."""
    n = len(x)
    flat = lambda t: t.reshape(n, -1)  # noqa: E731
    v = v / flat(v).norm(dim=1).clamp_min(1e-300).view(n, *([1] * (x.dim() - 1)))
    _, vjp_fn = torch.func.vjp(f, x)
    prev = None
    s = torch.zeros(n, dtype=x.dtype, device=x.device)
    for _ in range(max(1, iters)):
        _, u = torch.func.jvp(f, (x,), (v,))
        s = flat(u).norm(dim=1)
        (w,) = vjp_fn(u)
        wn = flat(w).norm(dim=1)
        good = wn > 0
        v = torch.where(good.view(n, *([1] * (x.dim() - 1))),
                        w / wn.clamp_min(1e-300).view(n, *([1] * (x.dim() - 1))), v)
        if prev is not None and bool(((s - prev).abs() <= tol * s.clamp_min(1e-300)).all()):
            break
        prev = s
    _, u = torch.func.jvp(f, (x,), (v,))
    return flat(u).norm(dim=1).detach(), v.detach()


def local_lipschitz(model: nn.Module, x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Power-iteration estimate (from below) of ||J(x)||_2 per row of x, on a float64 eval copy of the model."""
    dev = _device_of(model)
    m64 = float64_copy(model, dev)
    for p in m64.parameters():
        p.requires_grad_(False)
    x = x.to(dev, torch.float64)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dev)
    s, _ = _power(m64, x, v, iters)
    return s


def _local_jacobian(model, x: torch.Tensor, power_iters: int, max_exact_classes: int = 64):
    """Per point: (||J(x)||_2 estimate from below, unit top right singular vector) in the model's dtype.

    Few classes: the Jacobian is built exactly from C vector-Jacobian products and its top singular pair comes from
    the C x C Gram (exact up to rounding). Many classes: power iteration on J^T J."""
    n = len(x)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        C = out.shape[1]
        if C > max_exact_classes:
            gen = torch.Generator(device="cpu").manual_seed(0)
            v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            s, v = _power(model, x.detach(), v, power_iters)
            return s, v
        rows = []
        for c in range(C):
            g = _input_grad(out[:, c].sum(), x, retain_graph=c + 1 < C)
            rows.append(g.reshape(n, -1))
    J = torch.stack(rows, 1).double()                                  # (n, C, d)
    G = J @ J.transpose(1, 2)
    with torch.no_grad():
        evals, evecs = torch.linalg.eigh(G)
    u = evecs[:, :, -1]                                                # (n, C)
    v = (J.transpose(1, 2) @ u[:, :, None])[:, :, 0]
    vn = v.norm(dim=1, keepdim=True)
    v = torch.where(vn > 0, v / vn.clamp_min(1e-300), v)
    sigma = (J @ v[:, :, None])[:, :, 0].norm(dim=1)
    return sigma, v.reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class LowerConfig:
    """How hard lipschitz_lower looks (see its docstring)."""
    local_points: int = 16
    power_iters: int = 30
    search_starts: int = 8
    search_steps: int = 25
    search_radii: tuple = (0.5,)
    search_lr: float = 0.01
    verify_pairs: int = 32
    domain: tuple | None = (0.0, 1.0)
    fd_step: float = 1e-4
    batch_size: int = 256
    seed: int = 0


def lipschitz_lower(model: nn.Module, points: Sequence[torch.Tensor] | torch.Tensor,
                    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] = (), *,
                    local_points: int = 16, power_iters: int = 30, search_starts: int = 8, search_steps: int = 25,
                    search_radii: Sequence[float] = (0.5,), search_lr: float = 0.01, verify_pairs: int = 32,
                    domain: tuple[float, float] | None = (0.0, 1.0), fd_step: float = 1e-4,
                    batch_size: int = 256, seed: int = 0, power_points: int | None = None,
                    threads: int | None = 1) -> LowerBound:
    """Empirical lower bound on the global L2 Lipschitz constant of the logit map (see the module docstring).

    points: tensors of inputs (N, *in_shape) (training points, test points, attack iterates...).
    pairs:  (x, x') tensor pairs of equal shape, e.g. (clean, adversarial); their secants count.
    local_points: how many of the best-screened points get their exact local Jacobian norm (power_points: its
    older name).
    domain: box onto which the pair search projects its iterates (None: unconstrained).
    Screening, local Jacobians and the pair search run in the model's own precision; every candidate that can
    become the reported value is then re-evaluated as a secant on a float64 copy of the model, so the value is
    always <= the true constant (and <= lipschitz_upper).
    threads: torch CPU threads meanwhile (default 1; None leaves the setting alone). On a shared 2-core machine
    OpenMP spin-waiting makes 2 threads up to 10x slower than 1; the previous setting is restored afterwards.
    """
    cfg = LowerConfig(local_points=local_points if power_points is None else power_points, power_iters=power_iters,
                      search_starts=search_starts, search_steps=search_steps, search_radii=tuple(search_radii),
                      search_lr=search_lr, verify_pairs=verify_pairs,
                      domain=None if domain is None else tuple(domain), fd_step=fd_step, batch_size=batch_size,
                      seed=seed)
    if threads is None or _device_of(model).type != "cpu":
        return _lower(model, points, pairs, cfg)
    with lapack_threads(threads):
        return _lower(model, points, pairs, cfg)


@dataclass
class _Evidence:
    """What the steps find, in the model's precision: the points and their logits, screening values, the local
    Jacobians' points, norms and directions, the given pairs' ends and secants, the search's best pairs."""
    X: torch.Tensor
    logits: torch.Tensor | None = None
    screen: torch.Tensor | None = None
    local_x: torch.Tensor | None = None
    local_v: torch.Tensor | None = None
    jac: torch.Tensor | None = None
    pairs: tuple | None = None       # (PA, PB, PV) or None
    search: tuple | None = None      # (best a, best b, end points, their directions) or None
    details: dict = field(default_factory=dict)


def _lower(model, points, pairs, cfg: LowerConfig) -> LowerBound:
    t0 = time.perf_counter()
    batches, pair_list = _inputs(points, pairs)
    dev = _device_of(model)
    timer = Timer()
    with eval_mode(model):
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        X = torch.cat([p.detach().to(dev, dtype) for p in batches], 0) if batches else \
            torch.cat([a.detach().to(dev, dtype) for a, _ in pair_list], 0)
        ev = _Evidence(X)
        with timer("screen"):
            _screen(model, ev, cfg)
        with timer("local"):
            _local(model, ev, cfg)
        with timer("pairs"):
            _given_pairs(model, ev, batches, pair_list, cfg)
        with timer("search"):
            _pair_search(model, ev, cfg)
    with timer("verify"):
        candidates = _verify(model, ev, cfg, dev)
    details = {**ev.details, "timings": timer.rounded(4)}
    details.update({f"verified:{k}": v for k, v in candidates.items()})
    name = max(candidates, key=candidates.get)
    settings = (f"{details['n_points']} pts screened, {len(ev.local_x)} exact local Jacobians, "
                f"{details.get('n_pairs', 0)} pairs, {details.get('n_search_starts', 0)} starts x "
                f"{cfg.search_steps} steps search; float64 secants")
    return LowerBound(value=float(candidates[name]), method=f"{name} ({settings})", seconds=time.perf_counter() - t0,
                      details=details)


def _inputs(points, pairs) -> tuple[list, list]:
    """The point batches and the usable (a, b) pairs; CertifyError without any, or for ends of unequal shapes."""
    batches = _as_batches(points)
    pair_list = [(a, b) for a, b in (pairs or ()) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                 and a.numel() > 0]
    if not batches and not pair_list:
        raise CertifyError("lipschitz_lower needs at least one point or one pair")
    for a, b in pair_list:
        if a.shape != b.shape:
            raise CertifyError(f"pair shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return batches, pair_list


def _screen(model, ev: _Evidence, cfg: LowerConfig) -> None:
    """1. margin-gradient norms / sqrt(2) at every point (and every point's logits, kept for the pairs)."""
    X, bs = ev.X, cfg.batch_size
    screen = torch.empty(len(X), dtype=torch.float64)
    logits = []
    with torch.enable_grad():
        for s in range(0, len(X), bs):
            xb = X[s:s + bs].clone().requires_grad_(True)
            out = model(xb)
            logits.append(out.detach())
            if out.dim() != 2 or out.shape[1] < 2:
                raise CertifyError(f"model must return logits (N, C>=2), got shape {tuple(out.shape)}")
            top2 = out.topk(2, dim=1).indices
            margin = out.gather(1, top2[:, :1]) - out.gather(1, top2[:, 1:2])
            g = _input_grad(margin.sum(), xb)
            screen[s:s + bs] = g.detach().reshape(len(xb), -1).norm(dim=1).double().cpu() / math.sqrt(2)
    ev.screen, ev.logits = screen, torch.cat(logits, 0)
    ev.details.update(margin_grad_screen=float(screen.max()), n_points=int(len(X)))


def _local(model, ev: _Evidence, cfg: LowerConfig) -> None:
    """2. exact local Jacobian norms at the best-screened points."""
    k = min(cfg.local_points, len(ev.X))
    top = torch.topk(ev.screen, k).indices.to(ev.X.device)
    ev.local_x = ev.X[top]
    ev.jac, ev.local_v = _local_jacobian(model, ev.local_x, cfg.power_iters)
    ev.details["local_jacobian"] = float(ev.jac.max())


def _given_pairs(model, ev: _Evidence, batches, pair_list, cfg: LowerConfig) -> None:
    """3. the given pairs' secants in the model's precision (logits reused where a pair end is a given batch)."""
    dev, dtype, bs = ev.X.device, ev.X.dtype, cfg.batch_size
    offsets = [0]
    for p in batches:
        offsets.append(offsets[-1] + len(p))

    def known_logits(t):
        # the runner passes the same inputs as points and as pair ends: no second forward pass
        for i, p in enumerate(batches):
            if p.shape == t.shape and torch.equal(p.detach().to(dev, dtype), t):
                return ev.logits[offsets[i]:offsets[i + 1]]
        return None

    pa_all, pb_all, pv_all = [], [], []
    with torch.no_grad():
        for a, b in pair_list:
            a, b = a.detach().to(dev, dtype), b.detach().to(dev, dtype)
            fa_all, fb_all = (known_logits(a), known_logits(b)) if batches else (None, None)
            for s in range(0, len(a), bs):
                pa, pb = a[s:s + bs], b[s:s + bs]
                fa = fa_all[s:s + bs] if fa_all is not None else model(pa)
                fb = fb_all[s:s + bs] if fb_all is not None else model(pb)
                den = (pa - pb).reshape(len(pa), -1).norm(dim=1)
                num = (fa - fb).reshape(len(pa), -1).norm(dim=1)
                pa_all.append(pa)
                pb_all.append(pb)
                pv_all.append(torch.where(den > 1e-5, num / den.clamp_min(1e-30), torch.zeros_like(num)))
    if pv_all:
        ev.pairs = (torch.cat(pa_all), torch.cat(pb_all), torch.cat(pv_all))
        ev.details["n_pairs"] = int(len(ev.pairs[2]))


def _search_starts(ev: _Evidence, cfg: LowerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The search's starting pairs: along the top local directions at each radius, and the best given pairs."""
    starts_a, starts_b = [], []
    order = torch.argsort(ev.jac, descending=True)[:cfg.search_starts]
    for r in cfg.search_radii:
        a = ev.local_x[order]
        b = a + r * ev.local_v[order]
        starts_a.append(a)
        starts_b.append(b.clamp(*cfg.domain) if cfg.domain is not None else b)
    if ev.pairs is not None:
        PA, PB, PV = ev.pairs
        order = torch.argsort(PV, descending=True)[:cfg.search_starts]
        starts_a.append(PA[order])
        starts_b.append(PB[order])
    A, B = torch.cat(starts_a).clone(), torch.cat(starts_b).clone()
    keep = (A - B).reshape(len(A), -1).norm(dim=1) > 1e-5
    return A[keep], B[keep]


def _pair_search(model, ev: _Evidence, cfg: LowerConfig) -> None:
    """4. Adam ascent on log ||f(a) - f(b)|| - log ||a - b||, both ends in the domain, the best pair per start kept;
    the exact local Jacobians at the best end points join the candidates."""
    A, B = _search_starts(ev, cfg)
    if not len(A) or cfg.search_steps <= 0:
        return
    best_val = torch.zeros(len(A), dtype=torch.float64, device=A.device)
    best_a, best_b = A.clone(), B.clone()
    A.requires_grad_(True)
    B.requires_grad_(True)
    moments = [[torch.zeros_like(A), torch.zeros_like(A)], [torch.zeros_like(B), torch.zeros_like(B)]]
    with torch.enable_grad():
        for step_no in range(1, cfg.search_steps + 2):
            num = (model(A) - model(B)).reshape(len(A), -1).norm(dim=1)
            den = (A - B).reshape(len(A), -1).norm(dim=1)
            with torch.no_grad():
                val = torch.where(den > 1e-5, num / den.clamp_min(1e-30), torch.zeros_like(num)).double()
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                best_a[better] = A.detach()[better]
                best_b[better] = B.detach()[better]
            obj = -(torch.log(num.clamp_min(1e-30)) - torch.log(den.clamp_min(1e-30))).sum()
            grads = (torch.zeros_like(P) if g is None else g for g, P in
                     zip(torch.autograd.grad(obj, (A, B), allow_unused=True), (A, B)))
            _adam_step(((A, next(grads), moments[0]), (B, next(grads), moments[1])), step_no, cfg)
    top = torch.argsort(best_val, descending=True)[:cfg.search_starts]
    ends = torch.cat([best_a[top], best_b[top]])
    jac2, v2 = _local_jacobian(model, ends, cfg.power_iters)
    ev.search = (best_a, best_b, ends, v2)
    ev.details.update(search_steps=cfg.search_steps, n_search_starts=int(len(A)),
                      search_endpoint_jacobian=float(jac2.max()))


@torch.no_grad()
def _adam_step(params, step_no: int, cfg: LowerConfig) -> None:
    """Plain Adam steps (no optimiser import), then the projection onto the domain."""
    for P, g, (m1, m2) in params:
        m1.mul_(0.9).add_(g, alpha=0.1)
        m2.mul_(0.999).addcmul_(g, g, value=0.001)
        mh = m1 / (1 - 0.9 ** step_no)
        vh = m2 / (1 - 0.999 ** step_no)
        P.sub_(cfg.search_lr * mh / (vh.sqrt() + 1e-8))
    if cfg.domain is not None:
        for P, _, _ in params:
            P.clamp_(*cfg.domain)


def _verify(model, ev: _Evidence, cfg: LowerConfig, dev) -> dict[str, float]:
    """5. every candidate as a float64 secant: the only numbers that may be reported."""
    m64 = float64_copy(model, dev)
    for p in m64.parameters():
        p.requires_grad_(False)

    def fd(x, v):
        x, v = x.to(torch.float64), v.to(torch.float64)
        return _secants(m64, x + cfg.fd_step * v, x - cfg.fd_step * v)

    candidates = {"local-jacobian": float(fd(ev.local_x, ev.local_v).max())}
    if ev.pairs is not None:
        PA, PB, PV = ev.pairs
        order = torch.argsort(PV, descending=True)[:cfg.verify_pairs]
        candidates["pair-secant"] = float(_secants(m64, PA[order].double(), PB[order].double(), 1e-6).max())
    if ev.search is not None:
        best_a, best_b, ends, v2 = ev.search
        candidates["pair-search"] = float(_secants(m64, best_a.double(), best_b.double(), 1e-6).max())
        candidates["search-endpoint-jacobian"] = float(fd(ends, v2).max())
    return candidates
