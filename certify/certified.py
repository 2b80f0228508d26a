"""Certified accuracy from a Lipschitz upper bound: per-point certified radii in L2 and Linf."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn

from lawbench.base.modes import eval_mode

from ._linalg import lapack_threads
from ._walk import CertifyError, float64_copy

__all__ = ["certified_radii", "certified_accuracy", "parse_norm"]


def parse_norm(norm) -> str:
    """'L2' or 'Linf' from the usual spellings ('L2', 'l2', 2, 'Linf', 'linf', 'inf', float('inf'))."""
    s = str(norm).strip().lower()
    if s in ("l2", "2", "2.0"):
        return "L2"
    if s in ("linf", "inf", "l_inf", "linfty"):
        return "Linf"
    raise CertifyError(f"norm must be 'L2' or 'Linf', got {norm!r}")


def _device_of(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _check_bound_fits(upper, x: torch.Tensor) -> None:
    """A bound holds for the input shape it was computed on only (a convolution's norm depends on the image size,
    a Flatten + Linear on the layout), so data of any other shape is refused rather than certified."""
    want = tuple(getattr(upper, "in_shape", ()) or ())
    got = tuple(x.shape[1:])
    if not want:
        raise CertifyError("certify: the bound carries no in_shape; compute it with lipschitz_upper(model, in_shape)")
    if want != got:
        raise CertifyError(f"certify: the bound was computed for inputs of shape {want}, but x has shape {got} "
                           f"per point; recompute it with lipschitz_upper(model, {got})")


def _check_classes(upper, f: torch.Tensor) -> None:
    C = int(getattr(upper, "num_classes", 0) or 0)
    if C and f.shape[1] != C:
        raise CertifyError(f"certify: the bound was computed for {C} classes, but the model returns {f.shape[1]} "
                           f"logits; recompute it with lipschitz_upper")


def _radii_from_logits(f: torch.Tensor, y: torch.Tensor, upper, nm: str, d: int, fp_margin: float) -> torch.Tensor:
    _check_classes(upper, f)
    n, C = f.shape
    fy = f.gather(1, y[:, None])                                  # (N, 1)
    gaps = fy - f                                                 # f_y - f_j, (N, C)
    gaps = gaps - fp_margin * (1 + f.abs().max(dim=1, keepdim=True).values)
    gaps[torch.arange(n), y] = float("inf")
    margin = gaps.min(dim=1).values                               # (N,)
    ok = margin > 0
    L = float(upper.value)
    r2 = torch.where(ok, margin / (math.sqrt(2) * L) if L > 0 else torch.full_like(margin, float("inf")),
                     torch.zeros_like(margin))
    pair = getattr(upper, "pair", None)
    if pair is not None and tuple(pair.shape) == (C, C):
        K = pair.to(torch.float64).cpu()[y]                       # (N, C): K[y_i, j]
        rp = torch.where(K > 0, gaps / K, torch.full_like(gaps, float("inf")))
        rp[torch.arange(n), y] = float("inf")
        rp = rp.min(dim=1).values
        r2 = torch.where(ok, torch.maximum(r2, rp), r2)
    if nm == "L2":
        return r2
    rinf = r2 / math.sqrt(d)
    linf = getattr(upper, "linf", None)
    if linf is not None and linf > 0:
        rinf = torch.where(ok, torch.maximum(rinf, margin / (2 * float(linf))), rinf)
    lp = getattr(upper, "linf_pair", None)
    if lp is not None and tuple(lp.shape) == (C, C):
        K = lp.to(torch.float64).cpu()[y]
        rp = torch.where(K > 0, gaps / K, torch.full_like(gaps, float("inf")))
        rp[torch.arange(n), y] = float("inf")
        rinf = torch.where(ok, torch.maximum(rinf, rp.min(dim=1).values), rinf)
    return rinf


def _logits(model, x, dev, dtype, batch_size):
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(model(x[s:s + batch_size].to(dev, dtype)).to("cpu", torch.float64))
    return torch.cat(out, 0)


def certified_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, upper, norm="L2", *,
                    batch_size: int = 512, fp_margin: float = 1e-5, skip_below: float = 0.0,
                    threads: int | None = 1) -> torch.Tensor:
    """Per-point certified radius (float64, CPU; 0 where the point is misclassified).

    L2: max( margin / (sqrt(2) L)  [Tsuzuku et al. 2018],  min_{j != y} (f_y - f_j) / K_yj  [GloRo] ).
      Proof: ||f(x+d) - f(x)|| <= L ||d|| and |(f_y - f_j)(x+d) - (f_y - f_j)(x)| <= sqrt(2) L ||d||, resp.
      <= K_yj ||d||, so no f_j can overtake f_y within the radius.
    Linf: max( margin / (2 linf), min_j (f_y - f_j) / K^inf_yj, r_2 / sqrt(d) ) since ||d||_2 <= sqrt(d) ||d||_inf
      and every |f_i(x+d) - f_i(x)| <= linf ||d||_inf.
    Logits come from a float64 copy of the model; each margin is reduced by fp_margin * (1 + max |f|) so that
    float32 evaluation error of the deployed model cannot turn a certified point into a broken one.
    upper must come from lipschitz_upper for inputs of x's shape (x.shape[1:] == upper.in_shape), else CertifyError.
    skip_below > 0: points whose radius computed from the model's own-precision logits is below skip_below are not
    re-evaluated in float64 (their radius stays that estimate); used by certified_accuracy with half the smallest
    eps, where such points cannot count anyway.
    threads: torch CPU threads meanwhile (default 1, restored afterwards; None leaves the setting alone).
    """
    nm = parse_norm(norm)
    if len(x) != len(y):
        raise CertifyError(f"x has {len(x)} points but y has {len(y)} labels")
    _check_bound_fits(upper, x)
    dev = _device_of(model)
    ctx = lapack_threads(threads) if threads is not None and dev.type == "cpu" else contextlib.nullcontext()
    with ctx:
        y = y.to("cpu").long()
        d = int(x[0].numel()) if len(x) else 1
        todo = torch.ones(len(x), dtype=torch.bool)
        radii = torch.zeros(len(x), dtype=torch.float64)
        if skip_below > 0:
            with eval_mode(model):
                dtype = next((p.dtype for p in model.parameters()), torch.float32)
                f = _logits(model, x, dev, dtype, batch_size)
            radii = _radii_from_logits(f, y, upper, nm, d, fp_margin)
            todo = radii >= skip_below
        if bool(todo.any()):
            m64 = float64_copy(model, dev)
            idx = todo.nonzero()[:, 0]
            f = _logits(m64, x[idx.to(x.device)], dev, torch.float64, batch_size)
            radii[idx] = _radii_from_logits(f, y[idx], upper, nm, d, fp_margin)
    return radii


def certified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, upper, eps: Sequence[float], norm="L2",
                       *, return_radii: bool = False, batch_size: int = 512, threads: int | None = 1):
    """Fraction of points that are correctly classified with a certified radius > eps, for each eps.

    Returns {eps: accuracy} (keys are the given eps values), or ({eps: accuracy}, radii) with return_radii=True
    (then every radius is computed in float64).
    """
    if isinstance(eps, (int, float)):
        eps = [eps]
    eps = list(eps)
    skip = 0.0 if (return_radii or not eps or min(eps) <= 0) else 0.5 * min(float(e) for e in eps)
    radii = certified_radii(model, x, y, upper, norm, batch_size=batch_size, skip_below=skip, threads=threads)
    n = len(radii)
    acc = {e: (float((radii > float(e)).sum()) / n if n else 0.0) for e in eps}
    return (acc, radii) if return_radii else acc
