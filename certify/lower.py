"""Empirical (always valid) lower bounds on the global L2 Lipschitz constant of the logit map.

Every number that can become the reported value is a *secant* ||f(a) - f(b)||_2 / ||a - b||_2 evaluated on a float64
copy of the model, which is <= Lip(f) by definition, for any a != b. Jacobian information is only used to choose
good pairs:

1. screening: the input gradient of the top-2 logit margin f_y - f_j at every given point (float32, one backward per
   batch); ||grad (f_y - f_j)|| / sqrt(2) <= ||J(x)||_2 because ||e_y - e_j|| = sqrt(2);
2. local power iteration on J(x)^T J(x) (jvp / vjp, float64) at the best-screened points, started from the margin
   gradient direction: ||J v|| with ||v|| = 1 never exceeds ||J(x)||_2 and increases monotonically; each
   final direction v is then turned into a verified secant (x - t v, x + t v) with a small step t;
3. the given pairs (x, x_adv): their secants;
4. an optimised pair search: gradient ascent (Adam) on log ||f(a) - f(b)|| - log ||a - b|| from the best local
   pairs and the best given pairs, keeping every evaluated secant, with both endpoints projected on the data domain;
   a final power iteration at the search's end points adds their local norms (again verified as secants).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

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


class _TrainModeGuard:
    """Put a model in eval mode for the duration and restore each submodule's training flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


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


def lipschitz_lower(model: nn.Module, points: Sequence[torch.Tensor] | torch.Tensor,
                    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] = (), *,
                    power_points: int = 32, power_iters: int = 30, search_starts: int = 8, search_steps: int = 30,
                    search_radii: Sequence[float] = (0.1, 1.0), search_lr: float = 0.01,
                    domain: tuple[float, float] | None = (0.0, 1.0), fd_step: float = 1e-4,
                    batch_size: int = 256, seed: int = 0) -> LowerBound:
    """Empirical lower bound on the global L2 Lipschitz constant of the logit map (see the module docstring).

    points: tensors of inputs (N, *in_shape) (training points, test points, attack iterates...).
    pairs:  (x, x') tensor pairs of equal shape, e.g. (clean, adversarial); their secants count.
    domain: box onto which the pair search projects its iterates (None: unconstrained).
    The returned value is always a verified secant, hence <= the true constant (and <= lipschitz_upper).
    """
    t0 = time.perf_counter()
    batches = _as_batches(points)
    pair_list = [(a, b) for a, b in (pairs or ()) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                 and a.numel() > 0]
    if not batches and not pair_list:
        raise CertifyError("lipschitz_lower needs at least one point or one pair")
    for a, b in pair_list:
        if a.shape != b.shape:
            raise CertifyError(f"pair shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    dev = _device_of(model)
    details: dict = {}
    candidates: dict[str, float] = {}

    # 1. screening (float32, the caller's model in eval mode)
    X = torch.cat([p.detach().to(dev) for p in batches], 0) if batches else \
        torch.cat([a.detach().to(dev) for a, _ in pair_list], 0)
    grads = torch.empty_like(X, dtype=torch.float32)
    screen = torch.empty(len(X), dtype=torch.float32)
    with _TrainModeGuard(model), torch.enable_grad():
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        for s in range(0, len(X), batch_size):
            xb = X[s:s + batch_size].to(dtype).clone().requires_grad_(True)
            out = model(xb)
            if out.dim() != 2 or out.shape[1] < 2:
                raise CertifyError(f"model must return logits (N, C>=2), got shape {tuple(out.shape)}")
            top2 = out.topk(2, dim=1).indices
            margin = out.gather(1, top2[:, :1]) - out.gather(1, top2[:, 1:2])
            (g,) = torch.autograd.grad(margin.sum(), xb)
            grads[s:s + batch_size] = g.detach().float()
            screen[s:s + batch_size] = g.detach().reshape(len(xb), -1).norm(dim=1).float().cpu() / math.sqrt(2)
    details["margin_grad_screen"] = float(screen.max()) if len(screen) else 0.0
    details["n_points"] = int(len(X))

    m64 = float64_copy(model, dev)
    for p in m64.parameters():
        p.requires_grad_(False)
    X64 = X.to(torch.float64)

    def fd_verify(x, v):
        t = fd_step
        return _secants(m64, x + t * v, x - t * v)

    # 2. local power iteration at the best-screened points, verified as secants
    k = min(power_points, len(X64))
    top = torch.topk(screen, k).indices.to(dev) if k > 0 else torch.empty(0, dtype=torch.long, device=dev)
    local_x = X64[top]
    local_vals = torch.zeros(0, dtype=torch.float64)
    local_v = None
    if k > 0:
        v0 = grads[top].to(torch.float64)
        zero = v0.reshape(k, -1).norm(dim=1) == 0
        if bool(zero.any()):
            gen = torch.Generator(device="cpu").manual_seed(seed)
            v0[zero] = torch.randn(v0[zero].shape, generator=gen, dtype=torch.float64).to(dev)
        jac, local_v = _power(m64, local_x, v0, power_iters)
        details["jacobian_power"] = float(jac.max())
        local_vals = fd_verify(local_x, local_v)
        candidates["local-jacobian-power"] = float(local_vals.max())

    # 3. given pairs
    pair_a, pair_b, pair_vals = [], [], []
    for a, b in pair_list:
        a64, b64 = a.detach().to(dev, torch.float64), b.detach().to(dev, torch.float64)
        for s in range(0, len(a64), batch_size):
            pa, pb = a64[s:s + batch_size], b64[s:s + batch_size]
            pair_a.append(pa)
            pair_b.append(pb)
            pair_vals.append(_secants(m64, pa, pb, min_dist=1e-6))
    if pair_vals:
        pv = torch.cat(pair_vals)
        candidates["pair-secant"] = float(pv.max())
        details["n_pairs"] = int(len(pv))

    # 4. optimised pair search
    starts_a, starts_b = [], []
    if k > 0 and search_starts > 0:
        order = torch.argsort(local_vals, descending=True)[:search_starts]
        for r in search_radii:
            a = local_x[order]
            b = a + r * local_v[order]
            if domain is not None:
                b = b.clamp(*domain)
            starts_a.append(a)
            starts_b.append(b)
    if pair_vals and search_starts > 0:
        pa, pb = torch.cat(pair_a), torch.cat(pair_b)
        order = torch.argsort(pv, descending=True)[:search_starts]
        starts_a.append(pa[order])
        starts_b.append(pb[order])
    if starts_a and search_steps > 0:
        A = torch.cat(starts_a).clone()
        B = torch.cat(starts_b).clone()
        keep = (A - B).reshape(len(A), -1).norm(dim=1) > 1e-6
        A, B = A[keep], B[keep]
        best = torch.zeros(0, dtype=torch.float64)
        if len(A):
            A.requires_grad_(True)
            B.requires_grad_(True)
            opt = torch.optim.Adam([A, B], lr=search_lr)
            best_val = torch.zeros(len(A), dtype=torch.float64, device=dev)
            best_a, best_b = A.detach().clone(), B.detach().clone()
            for _ in range(search_steps + 1):
                fa, fb = m64(A), m64(B)
                num = (fa - fb).reshape(len(A), -1).norm(dim=1)
                den = (A - B).reshape(len(A), -1).norm(dim=1)
                with torch.no_grad():
                    val = torch.where(den > 1e-6, num / den.clamp_min(1e-300), torch.zeros_like(num))
                    better = val > best_val
                    best_val = torch.where(better, val, best_val)
                    best_a[better] = A.detach()[better]
                    best_b[better] = B.detach()[better]
                obj = -(torch.log(num.clamp_min(1e-300)) - torch.log(den.clamp_min(1e-300))).sum()
                opt.zero_grad()
                obj.backward()
                opt.step()
                if domain is not None:
                    with torch.no_grad():
                        A.clamp_(*domain)
                        B.clamp_(*domain)
            # re-verify the best pairs from scratch (no autograd state) and refine locally at their end points
            best = _secants(m64, best_a, best_b, min_dist=1e-6)
            candidates["pair-search"] = float(best.max())
            ends = torch.cat([best_a, best_b])
            gen = torch.Generator(device="cpu").manual_seed(seed + 1)
            jac2, v2 = _power(m64, ends, (ends - torch.cat([best_b, best_a])).detach()
                              + 1e-3 * torch.randn(ends.shape, generator=gen, dtype=torch.float64).to(dev),
                              power_iters)
            candidates["search-endpoint-jacobian"] = float(fd_verify(ends, v2).max())
            details["search_steps"] = search_steps
            details["n_search_starts"] = int(len(A))

    details.update({f"verified:{k_}": v for k_, v in candidates.items()})
    if not candidates:
        raise CertifyError("lipschitz_lower found no valid pair (all pairs coincide)")
    name = max(candidates, key=candidates.get)
    value = candidates[name]
    settings = (f"{k} pts x {power_iters} it power, {details.get('n_pairs', 0)} pairs, "
                f"{details.get('n_search_starts', 0)} starts x {search_steps} steps search; float64 secants")
    return LowerBound(value=float(value), method=f"{name} ({settings})", seconds=time.perf_counter() - t0,
                      details=details)
