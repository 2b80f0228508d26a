"""Certified accuracy from a Lipschitz upper bound: per-point certified radii in L2 and Linf."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

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


def certified_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, upper, norm="L2", *,
                    batch_size: int = 512, fp_margin: float = 1e-5) -> torch.Tensor:
    """Per-point certified radius (float64, CPU; 0 where the point is misclassified).

    L2: max( margin / (sqrt(2) L)  [Tsuzuku et al. 2018],  min_{j != y} (f_y - f_j) / K_yj  [GloRo] ).
      Proof: ||f(x+d) - f(x)|| <= L ||d|| and |(f_y - f_j)(x+d) - (f_y - f_j)(x)| <= sqrt(2) L ||d||, resp.
      <= K_yj ||d||, so no f_j can overtake f_y within the radius.
    Linf: max( margin / (2 linf), min_j (f_y - f_j) / K^inf_yj, r_2 / sqrt(d) ) since ||d||_2 <= sqrt(d) ||d||_inf
      and every |f_i(x+d) - f_i(x)| <= linf ||d||_inf.
    Logits are computed on a float64 copy of the model; each margin is reduced by fp_margin * (1 + max |f|) so that
    float32 evaluation error of the deployed model cannot turn a certified point into a broken one.
    """
    nm = parse_norm(norm)
    if len(x) != len(y):
        raise CertifyError(f"x has {len(x)} points but y has {len(y)} labels")
    dev = _device_of(model)
    m64 = float64_copy(model, dev)
    logits = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            logits.append(m64(x[s:s + batch_size].to(dev, torch.float64)).cpu())
    f = torch.cat(logits, 0) if logits else torch.zeros(0, 2, dtype=torch.float64)
    y = y.to("cpu").long()
    n, C = f.shape
    d = int(x[0].numel()) if len(x) else 1
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
    if pair is not None and pair.shape == (C, C):
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
    if lp is not None and lp.shape == (C, C):
        K = lp.to(torch.float64).cpu()[y]
        rp = torch.where(K > 0, gaps / K, torch.full_like(gaps, float("inf")))
        rp[torch.arange(n), y] = float("inf")
        rinf = torch.where(ok, torch.maximum(rinf, rp.min(dim=1).values), rinf)
    return rinf


def certified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, upper, eps: Sequence[float], norm="L2",
                       *, return_radii: bool = False, batch_size: int = 512):
    """Fraction of points that are correctly classified with a certified radius > eps, for each eps.

    Returns {eps: accuracy} (keys are the given eps values), or ({eps: accuracy}, radii) with return_radii=True.
    """
    if isinstance(eps, (int, float)):
        eps = [eps]
    radii = certified_radii(model, x, y, upper, norm, batch_size=batch_size)
    n = len(radii)
    acc = {e: (float((radii > float(e)).sum()) / n if n else 0.0) for e in eps}
    return (acc, radii) if return_radii else acc
