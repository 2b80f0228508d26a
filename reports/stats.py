"""Statistics for the reports, in plain Python/numpy (no scipy): Student-t quantiles, mean ± t-interval over seeds, and
the log-log slope of a Lipschitz bound against p/(n·d) with its confidence interval.
"""
from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import numpy as np

from .values import interpolates, is_ok, num, row_ratio


# ------------------------------------------------------------------------------------------------------- Student t

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(lbeta)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=1024)
def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (e.g. q=0.975 for a two-sided 95% interval), by bisection on t_cdf (remembered:
    a report asks the same few levels and degrees of freedom thousands of times)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """(mean, half-width of the two-sided Student-t interval) over the non-null values; half-width None below 2 values."""
    given = [v for v in values if v is not None]
    xs = [v for v in given if type(v) is float and v == v]  # the usual case, read without a call per value
    if len(xs) < len(given):
        xs = [v for v in map(num, given) if v is not None]
    if not xs:
        return None, None
    if not all(math.isfinite(v) for v in xs):  # an infinite bound in any seed: the mean is that infinity
        return float(sum(v for v in xs if not math.isfinite(v))), None
    mean = float(np.mean(xs))
    if len(xs) < 2:
        return mean, None
    sd = float(np.std(xs, ddof=1))
    return mean, t_quantile(0.5 + confidence / 2.0, len(xs) - 1) * sd / math.sqrt(len(xs))


# -------------------------------------------------------------------------------------------------- log-log slope

def ols(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float | None]:
    """OLS of ys on xs: (slope, intercept, standard error of the slope or None with fewer than 3 points)."""
    xm, ym = xs.mean(), ys.mean()
    sxx = float(((xs - xm) ** 2).sum())
    slope = float(((xs - xm) * (ys - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    if len(xs) < 3:
        return slope, intercept, None
    resid = ys - (intercept + slope * xs)
    se = math.sqrt(float((resid ** 2).sum()) / (len(xs) - 2) / sxx)
    return slope, intercept, se


def _positive_points(rows, y: str):
    """(row, p/(n·d), y) for every ok row with both values finite and positive: what a log-log axis can show."""
    for row in rows:
        if not isinstance(row, dict) or not is_ok(row):
            continue
        xv, yv = row_ratio(row), num(row.get(y))
        if xv is None or yv is None or not (math.isfinite(xv) and math.isfinite(yv)) or xv <= 0 or yv <= 0:
            continue
        yield row, xv, yv


def loglog_points(rows, y: str = "lip_lower") -> dict:
    """{seed: sorted list of distinct (p/(n·d), y) pairs} over ok rows with both values finite and positive."""
    by_seed: dict = defaultdict(set)
    for row, xv, yv in _positive_points(rows, y):
        seed = row.get("seed")
        try:
            hash(seed)
        except TypeError:
            seed = repr(seed)
        by_seed[seed].add((xv, yv))
    return {s: sorted(pts) for s, pts in by_seed.items()}


def loglog_slope(rows, y: str = "lip_lower", confidence: float = 0.95, interpolating_only: bool = True) -> dict:
    """Slope of log(y) against log(p/(n·d)) with a `confidence` interval, over the rows that interpolate their
    training labels (`interpolates` true; the law speaks of no other model) unless interpolating_only is False.

    The fit runs per seed (each seed needs two distinct ratios); with several fitted seeds the result is the mean
    slope ± a Student-t interval over seeds; with one, the regression's own standard-error interval (needs three
    points; with two the interval is None). The law of robustness predicts a slope near -1/2 for lip_lower when the
    models interpolate noisy data.

    Returns dict(slope, ci_low, ci_high, n_seeds, n_points, method, confidence, intercept, n_interpolating: the ok
    rows with a value that entered, n_excluded: those left out because they do not interpolate) with None where
    undefined.
    """
    rows = [r for r in rows if isinstance(r, dict)]
    kept = [r for r in rows if not interpolating_only or interpolates(r)]
    used = sum(1 for _ in _positive_points(kept, y))
    excluded = sum(1 for _ in _positive_points(rows, y)) - used
    rows = kept
    per_seed = []
    for seed, pts in loglog_points(rows, y).items():
        xs = np.log(np.array([p[0] for p in pts]))
        ys = np.log(np.array([p[1] for p in pts]))
        if len(np.unique(xs)) < 2:
            continue
        slope, intercept, se = ols(xs, ys)
        per_seed.append((seed, slope, intercept, se, len(pts)))
    out = dict(slope=None, ci_low=None, ci_high=None, n_seeds=len(per_seed),
               n_points=sum(p[4] for p in per_seed), method="none", confidence=confidence, intercept=None, y=y,
               n_interpolating=used, n_excluded=excluded)
    if not per_seed:
        return out
    if len(per_seed) >= 2:
        slope, half = mean_ci([p[1] for p in per_seed], confidence)
        out.update(slope=slope, intercept=float(np.mean([p[2] for p in per_seed])), method="seeds")
    else:
        _, slope, intercept, se, npts = per_seed[0]
        half = None if se is None else t_quantile(0.5 + confidence / 2.0, npts - 2) * se
        out.update(slope=slope, intercept=intercept, method="regression")
    if half is not None:
        out.update(ci_low=out["slope"] - half, ci_high=out["slope"] + half)
    return out


def law_envelope(rows, y: str = "lip_lower") -> dict:
    """The law's scale as a lower envelope: the largest C with y >= C·sqrt(n·d/p) at every interpolating ok row,
    i.e. min of y·sqrt(p/(n·d)) over them. The law bounds models that fit their training labels, so rows that do not
    say they interpolate are left out (a fit through all points would cross the data and read as a violation).
    Returns {"c": C or None, "interpolating": rows used, "rows": ok rows with y}."""
    used = total = 0
    c = None
    for row, xv, yv in _positive_points(rows, y):
        total += 1
        if interpolates(row):
            used += 1
            k = yv * math.sqrt(xv)
            c = k if c is None else min(c, k)
    return {"c": c, "interpolating": used, "rows": total}
