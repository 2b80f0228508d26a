"""The law of robustness' quantities for one row: ratios, the sqrt(n d / p) scale and Bubeck & Sellke's Theorem 3.

Theorem 3 of Bubeck & Sellke, "A Universal Law of Robustness via Isoperimetry" (arXiv 2105.12806):
let F = {f_w : w in W} with W a subset of R^p of diameter <= W, and ||f_w1 - f_w2||_inf <= J ||w1 - w2||; let the
covariates follow a mixture mu = sum_{l=1..k} alpha_l mu_l of k distributions that each satisfy c-isoperimetry
(P(|g(x) - E g| >= t) <= 2 exp(-d t^2 / (2 c L^2)) for every bounded L-Lipschitz g); let outputs lie in [-1, 1] with
expected conditional variance sigma^2 = E[Var(y | x)] > 0. Fix eps, delta in (0, 1). Then with probability >= 1 - delta
over the n samples, every f in F with (1/n) sum (f(x_i) - y_i)^2 <= sigma^2 - eps has

    Lip(f) >= eps / (2^9 sqrt(c)) * sqrt( n d / (p log(60 W J / eps) + log(4 / delta)) ),

under the sample-size condition n >= 8^4 k log(8k/delta) / eps^2 (below it the statement is vacuous).
"""
from __future__ import annotations

import math

from ._walk import CertifyError

__all__ = ["law_quantities", "law_bound", "isoperimetry_constant_gaussian"]


def isoperimetry_constant_gaussian(std: float, d: int) -> float:
    """c for N(m, std^2 I_d) in the paper's normalisation: Gaussian concentration gives exp(-t^2 / (2 std^2 L^2)),
    i.e. c = d std^2 (c = 1 for N(0, I_d / d)). Pushing forward by a 1-Lipschitz map (e.g. clipping to [0,1]^d,
    or x -> 0.5 + s x) keeps c, scaled by the map's Lipschitz constant squared."""
    return float(d) * float(std) ** 2


def _pos(name, v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise CertifyError(f"law_quantities: {name} must be a number, got {v!r}") from None
    if not (v > 0) or math.isinf(v):
        raise CertifyError(f"law_quantities: {name} must be positive and finite, got {v!r}")
    return v


def law_bound(p, n, d, *, eps, delta, c, W, J) -> float:
    """eps / (2^9 sqrt(c)) * sqrt(n d / (p log(60 W J / eps) + log(4 / delta))) (Theorem 3's right-hand side)."""
    denom = p * math.log(60.0 * W * J / eps) + math.log(4.0 / delta)
    if denom <= 0:
        return float("inf")
    return eps / (2 ** 9 * math.sqrt(c)) * math.sqrt(n * d / denom)


def law_quantities(p, n, d, d_eff=None, *, eps=None, delta: float = 0.01, c: float = 1.0, W=None, J=None, k=None,
                   num_classes=None, label_noise=None) -> dict:
    """The law's quantities for a model with p parameters fitted on n points of ambient dimension d.

    Returned keys (all JSON-friendly):
      ratio = p / (n d); ratio_eff = p / (n d_eff) (None without d_eff); law_scale = sqrt(n d / p);
      law_scale_eff = sqrt(n d_eff / p); law_bound = Theorem 3's explicit lower bound on Lip(f) with d (law_bound_eff:
      with d_eff in place of d, an heuristic); law_applicable = whether n eps^2 >= 8^4 k log(8k/delta);
      law_flag = "" when applicable, else a one-line reason starting with "law-bound-vacuous:";
      law_params = the constants used.

    Symbols and defaults (documented choices; pass measured values to override):
      eps:   the loss gap: the model fits below the noise level, train MSE <= sigma^2 - eps, with y in [-1, 1].
             Default: with ``label_noise`` = eta given, eps = sigma^2 = 4 eta (1 - eta), the conditional variance of
             a +-1 label flipped with probability eta, i.e. the gap of an interpolating model (train MSE 0); with
             eta = 0 there is no noise to fit and the theorem says nothing (flagged). Without label_noise: 0.1.
      delta: failure probability of the theorem (default 0.01).
      c:     isoperimetry constant of each mixture component (default 1: N(0, I_d / d) or the uniform measure on
             the sphere of radius 1, the paper's normalisation; for pixel-space Gaussian data pass
             isoperimetry_constant_gaussian(pixel std, d)).
      W:     diameter of the parameter set (default 2 sqrt(p): weights in the ball of radius sqrt(p), i.e. each
             weight of order 1 -- the "polynomially bounded weights" regime).
      J:     Lipschitz constant of the parametrisation w -> f_w in sup norm (default p, a polynomial stand-in).
             W and J enter only through log(60 W J / eps), so a factor 10 in either moves the bound by a few percent.
      k:     number of isoperimetric mixture components of the covariate distribution (default: num_classes if
             given -- one component per class -- else 1).
    """
    p = _pos("p", p)
    n = _pos("n", n)
    d = _pos("d", d)
    d_eff = None if d_eff is None else _pos("d_eff", d_eff)
    delta = _pos("delta", delta)
    if delta >= 1:
        raise CertifyError(f"law_quantities: delta must be in (0, 1), got {delta}")
    c = _pos("c", c)
    if k is None:
        k = num_classes if num_classes is not None else 1
    k = int(_pos("k", k))
    W = 2.0 * math.sqrt(p) if W is None else _pos("W", W)
    J = float(p) if J is None else _pos("J", J)
    flag = ""
    if eps is None:
        if label_noise is not None:
            eta = float(label_noise)
            if not 0 <= eta <= 1:
                raise CertifyError(f"law_quantities: label_noise must be in [0, 1], got {label_noise!r}")
            eps = 4 * eta * (1 - eta)
            if eps <= 0:
                flag = "law-bound-vacuous: no label noise (sigma^2 = 0), nothing to fit below the noise level"
        else:
            eps = 0.1
    eps = float(eps)
    if flag == "" and not 0 < eps < 1:
        if eps >= 1 and eps <= 1 + 1e-12:
            eps = 1 - 1e-12
        else:
            raise CertifyError(f"law_quantities: eps must be in (0, 1), got {eps!r}")
    out = {
        "ratio": p / (n * d),
        "ratio_eff": (p / (n * d_eff)) if d_eff else None,
        "law_scale": math.sqrt(n * d / p),
        "law_scale_eff": math.sqrt(n * d_eff / p) if d_eff else None,
        "law_bound": None, "law_bound_eff": None,
        "law_applicable": False, "law_flag": flag,
        "law_params": {"eps": eps, "delta": delta, "c": c, "W": W, "J": J, "k": k},
    }
    if flag:
        return out
    out["law_bound"] = law_bound(p, n, d, eps=eps, delta=delta, c=c, W=W, J=J)
    if d_eff:
        out["law_bound_eff"] = law_bound(p, n, d_eff, eps=eps, delta=delta, c=c, W=W, J=J)
    need = 8 ** 4 * k * math.log(8 * k / delta)
    have = n * eps ** 2
    out["law_applicable"] = bool(have >= need)
    if not out["law_applicable"]:
        out["law_flag"] = (f"law-bound-vacuous: n*eps^2 = {have:.4g} < 8^4 k log(8k/delta) = {need:.4g} "
                           f"(needs n >= {math.ceil(need / eps ** 2)})")
    return out
