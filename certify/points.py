"""Each test point's certificate: the best of the global Lipschitz certificate (certified.py) and the local ones
(local.py: IBP and CROWN) at every eps of a sweep, and its certified radius.

A point counts as certified at eps when any method proves every margin positive over its ball of radius eps. Its
certified radius is the largest radius at which a method proved it: the global certificate's own radius, or a
bisection over eps with the local methods (8 halvings of the bracket between the largest sweep eps they certified
and the next one, or twice the largest eps). Any radius a method certified is sound on its own, so the bisection
needs no monotonicity. Radii are summarised as quartiles over every test point (a misclassified point has radius 0;
beyond the search's top, a quartile is null).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ._walk import CertifyError
from .certified import certified_radii, parse_norm
from .local import METHODS, local_certify, program

__all__ = ["PointCertificates", "certify_points", "radius_quartiles", "BISECTIONS"]

BISECTIONS = 8


@dataclass
class PointCertificates:
    """certified: {eps: (N,) bool}; by_method: {eps: {method: count}}; radii: (N,) float64 (inf: beyond ``top``);
    local_refused: why the local methods could not run (the global certificate still counts)."""
    certified: dict
    by_method: dict
    radii: torch.Tensor
    top: float
    local_refused: str | None = None
    seconds: dict = field(default_factory=dict)

    def accuracy(self) -> dict:
        n = len(self.radii)
        return {e: (float(c.sum()) / n if n else 0.0) for e, c in self.certified.items()}


def radius_quartiles(radii: torch.Tensor, top: float | None = None) -> dict:
    """{"q1", "median", "q3"} of per-point radii (inf or above ``top``: beyond the search, given as null)."""
    if len(radii) == 0:
        return {"q1": None, "median": None, "q3": None}
    r = radii.to(torch.float64).sort().values
    out = {}
    for name, q in (("q1", 0.25), ("median", 0.5), ("q3", 0.75)):
        v = float(r[min(len(r) - 1, int(q * (len(r) - 1) + 0.5))])  # a point's own radius, no interpolation
        out[name] = None if v == float("inf") or (top is not None and v >= top) else v
    return out


def certify_points(model, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], norm, *, upper=None,
                   methods=METHODS, radius: bool = True) -> PointCertificates:
    """Every point at every eps by every method, and (``radius``) each point's certified radius."""
    import time
    nm = parse_norm(norm)
    eps = sorted(float(e) for e in eps)
    x, y = x.detach().to("cpu"), y.detach().to("cpu").long()
    n = len(y)
    t0 = time.perf_counter()
    glob = (certified_radii(model, x, y, upper, nm) if upper is not None
            else torch.zeros(n, dtype=torch.float64))
    seconds = {"lipschitz": time.perf_counter() - t0}
    by_method = {e: {"lipschitz": int((glob > e).sum())} for e in eps}
    certified = {e: glob > e for e in eps}
    refused = None
    t0 = time.perf_counter()
    try:
        prog = program(model, tuple(x.shape[1:]))
        local = {e: local_certify(model, x, y, e, nm, methods=methods, prog=prog) for e in eps}
    except CertifyError as exc:
        refused, local = str(exc), {}
    for e, got in local.items():
        for m, ok in got.items():
            by_method[e][m] = int(ok.sum())
            certified[e] = certified[e] | ok
    seconds["local"] = time.perf_counter() - t0
    top = 2 * max(eps) if eps else 0.0
    radii = glob.clone()
    if radius and local and eps:
        t0 = time.perf_counter()
        radii = torch.maximum(radii, _bisect(model, x, y, nm, methods, prog, eps, certified, top))
        seconds["radius"] = time.perf_counter() - t0
    return PointCertificates(certified, by_method, radii, top, refused, seconds)


def _correct(prog, x, y) -> torch.Tensor:
    """The points the walked (float64) model classifies correctly: the only ones a bisection can certify."""
    from .local import ibp
    with torch.no_grad():
        xs = x.to(torch.float64)
        return ibp(prog, xs, xs)[0].argmax(1) == y


def _bisect(model, x, y, nm, methods, prog, eps, certified, top) -> torch.Tensor:
    """Per point, the largest radius the local methods certify, searched between the largest sweep eps certified
    (else 0) and the next sweep eps (else ``top``); inf where even ``top`` is certified."""
    n = len(y)
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), top, dtype=torch.float64)
    for e in eps:  # brackets from the sweep: certified at e raises lo, the first uncertified above lo caps hi
        ok = certified[e]
        lo = torch.where(ok, torch.full_like(lo, e), lo)
    for e in reversed(eps):
        hi = torch.where(~certified[e] & (e > lo), torch.full_like(hi, e), hi)

    def proved(idx, r):
        got = local_certify(model, x[idx], y[idx], r, nm, methods=methods, prog=prog)
        return torch.stack(list(got.values())).any(0)

    at_top = (hi == top) & (lo < top)
    if bool(at_top.any()):  # certified at the top: beyond the search
        idx = at_top.nonzero()[:, 0]
        beyond = proved(idx, torch.full((len(idx),), top, dtype=torch.float64))
        lo[idx[beyond]] = float("inf")
    todo = torch.isfinite(lo) & (hi > lo) & _correct(prog, x, y)
    for _ in range(BISECTIONS):
        idx = todo.nonzero()[:, 0]
        if len(idx) == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        ok = proved(idx, mid)
        lo[idx] = torch.where(ok, mid, lo[idx])
        hi[idx] = torch.where(ok, hi[idx], mid)
    return lo
