"""The law's analyses over result rows: the ERM-versus-smooth frontier per width, the law's lower envelope, and the
exponents of log Lip = a·log p + b·log n + c·log d + const with confidence intervals over seeds.

Lipschitz constants are compared in the law's units: a row's `data_scale` (the synthetic Gaussian data's pixel map,
x_pix = 0.5 + data_scale·x with x of norm about 1) turns a pixel-space constant into one on x, so a d sweep keeps
the law's normalisation; rows without it (real images) are used as measured. Only ok rows that interpolate their
training labels enter a fit: the law speaks of nothing else.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .values import acc_at, interpolates, is_ok, num, row_eps, row_ratio, text, verified_at
from .stats import mean_ci, ols, t_quantile

LAW_EXPONENTS = {"p": -0.5, "n": 0.5, "d": 0.5}
RECIPES = ("erm", "smooth")


def law_units(row: dict, y: str) -> float | None:
    """The row's `y` (a Lipschitz bound) in the law's units: times data_scale where the row has one."""
    v = num(row.get(y))
    scale = num(row.get("data_scale"))
    if v is None:
        return None
    return v * scale if scale else v


def interpolating(rows) -> list[dict]:
    """The ok rows that fit every training label (`interpolates` true): the rows the law speaks of."""
    return [r for r in rows if isinstance(r, dict) and is_ok(r) and interpolates(r)]


def study_key(row: dict) -> tuple:
    """What a study holds fixed: data set, threat model, model family, recipe and label noise; p, n and d vary."""
    return (text(row.get("dataset")), text(row.get("threat")), text(row.get("family")) or text(row.get("model")),
            text(row.get("recipe")), num(row.get("label_noise")))


# ---------------------------------------------------------------------------------------------------- exponents

@dataclass
class Exponents:
    """The fitted exponents of one study: per variable (p, n, d) the mean over seeds and the CI half-width, or
    None where the variable does not vary within a seed."""
    key: tuple
    y: str
    dim: str                         # "d" or "d_eff"
    coef: dict = field(default_factory=dict)      # variable -> mean exponent
    half: dict = field(default_factory=dict)      # variable -> CI half-width (None: not enough seeds or points)
    n_seeds: int = 0
    n_points: int = 0
    method: str = "none"
    varied: tuple = ()
    regime: str = "all"              # a key of REGIMES, or "all"
    peak: float | None = None        # p/(n·d) of the interpolation peak the fit starts at (None: not located)
    before_peak: int = 0             # interpolating rows of the regime left out as lying before the peak
    rows_kept: int = 0               # interpolating rows of the regime at or past the peak (fitted where enough)


# The law's two regimes: below p = n·d its scale sqrt(n·d/p) exceeds 1 and binds; above, the smoothest fit is bounded
# by the data's own geometry, not by p. One exponent fitted across both is neither.
REGIMES = {"p < n·d": lambda ratio: ratio < 1, "p ≥ n·d": lambda ratio: ratio >= 1}


def interpolation_peak(rows, y: str) -> float | None:
    """The p/(n·d) where the mean over seeds of log y peaks among interpolating rows (Lipschitz constants show double
    descent: they rise up to the interpolation threshold and fall past it, Gamba et al. 2023; a slope fitted across
    the peak is meaningless). None with fewer than three distinct ratios: nothing to locate."""
    by: dict = defaultdict(list)
    for r in interpolating(rows):
        ratio, v = row_ratio(r), law_units(r, y)
        if ratio and v and ratio > 0 and v > 0 and math.isfinite(v):
            by[round(ratio, 12)].append(math.log(v))
    if len(by) < 3:
        return None
    return max(sorted(by), key=lambda k: float(np.mean(by[k])))


def _in(row: dict, regime: str) -> bool:
    """The row lies in the regime (a key of REGIMES; "all" holds every row)."""
    if regime == "all":
        return True
    ratio = row_ratio(row)
    return ratio is not None and REGIMES[regime](ratio)


def _past_peak(rows, y: str, regime: str) -> tuple[list, float | None, int]:
    """(the rows of the regime at or past the study's peak, the peak, how many rows of the regime lie before it)."""
    peak = interpolation_peak(rows, y)
    inside = [r for r in rows if _in(r, regime)]
    if peak is None:
        return inside, None, 0
    kept = [r for r in inside if row_ratio(r) is not None and round(row_ratio(r), 12) >= peak]
    return kept, peak, len(inside) - len(kept)


def _design(rows, y: str, dim: str):
    pts = []
    for r in rows:
        p, n, d, v = num(r.get("params")), num(r.get("n_train")), num(r.get(dim)), law_units(r, y)
        if None in (p, n, d, v) or min(p, n, d, v) <= 0 or not all(map(math.isfinite, (p, n, d, v))):
            continue
        pts.append((math.log(p), math.log(n), math.log(d), math.log(v)))
    return np.array(pts, dtype=float).reshape(-1, 4)


def fit_exponents(rows, y: str = "lip_upper", dim: str = "d", confidence: float = 0.95, regime: str = "all",
                  past_peak: bool = False) -> list[Exponents]:
    """Per study (see study_key), OLS of log y on the logs of whichever of p, n, d vary, per seed over its
    interpolating rows; with several seeds the exponents' mean and Student-t interval over seeds, with one the
    regression's own standard errors. `dim` = "d_eff" puts the intrinsic dimension in place of d. `regime` (a key
    of REGIMES) keeps the rows on one side of p = n·d; `past_peak` keeps only the rows at or past the study's
    interpolation peak (interpolation_peak, located over all its rows)."""
    studies: dict = defaultdict(list)
    for r in interpolating(rows):
        studies[study_key(r)].append(r)
    out = []
    names = ("p", "n", "d")
    for key in sorted(studies, key=repr):
        if past_peak:
            kept, peak, before = _past_peak(studies[key], y, regime)
        else:
            kept, peak, before = [r for r in studies[key] if _in(r, regime)], None, 0
        by_seed: dict = defaultdict(list)
        for r in kept:
            by_seed[text(r.get("seed"))].append(r)
        per_seed = {s: _design(rs, y, dim) for s, rs in by_seed.items()}
        varied = tuple(v for i, v in enumerate(names)
                       if any(len(np.unique(np.round(X[:, i], 9))) > 1 for X in per_seed.values() if len(X)))
        res = Exponents(key, y, dim, varied=varied, regime=regime, peak=peak, before_peak=before,
                        rows_kept=len(kept))
        fits = []
        for X in per_seed.values():
            cols = [names.index(v) for v in varied]
            if not cols or len(X) < len(cols) + 1:
                continue
            A = np.column_stack([X[:, cols], np.ones(len(X))])
            if np.linalg.matrix_rank(A) < A.shape[1]:
                continue
            beta, *_ = np.linalg.lstsq(A, X[:, 3], rcond=None)
            dof = len(X) - A.shape[1]
            se = None
            if dof > 0:
                resid = X[:, 3] - A @ beta
                cov = float(resid @ resid) / dof * np.linalg.inv(A.T @ A)
                se = np.sqrt(np.diag(cov))[:-1]
            fits.append((beta[:-1], se, dof, len(X)))
        res.n_seeds, res.n_points = len(fits), sum(f[3] for f in fits)
        for j, v in enumerate(varied):
            if len(fits) >= 2:
                res.coef[v], res.half[v] = mean_ci([f[0][j] for f in fits], confidence)
                res.method = "seeds"
            elif fits:
                beta, se, dof, _ = fits[0]
                res.coef[v] = float(beta[j])
                res.half[v] = None if se is None else t_quantile(0.5 + confidence / 2, dof) * float(se[j])
                res.method = "regression"
        out.append(res)
    return out


# ----------------------------------------------------------------------------------------------------- frontier

def frontier_key(row: dict) -> tuple:
    """One frontier: the rows that differ only in width (p), recipe and seed."""
    return (text(row.get("dataset")), text(row.get("threat")), text(row.get("family")) or text(row.get("model")),
            num(row.get("label_noise")), num(row.get("n_train")), num(row.get("d")))


@dataclass
class FrontierPoint:
    """One width of one frontier: per recipe the rows (over seeds) and their means."""
    width: object
    params: float | None
    ratio: float | None
    rows: dict                       # recipe -> rows


def _mean(rows, get):
    vals = [v for v in (get(r) for r in rows) if v is not None]
    return mean_ci(vals)[0] if vals else None


def frontier_points(rows) -> dict[tuple, list[FrontierPoint]]:
    """{frontier_key: points sorted by p} over ok rows of the erm and smooth recipes, for frontiers where both ran."""
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if isinstance(r, dict) and is_ok(r) and text(r.get("recipe")) in RECIPES:
            grouped[frontier_key(r)][num(r.get("width"))][text(r.get("recipe"))].append(r)
    out = {}
    for key in sorted(grouped, key=repr):
        recipes = {rec for by_recipe in grouped[key].values() for rec in by_recipe}
        if recipes != set(RECIPES):
            continue
        pts = [FrontierPoint(w, _mean(sum(rs.values(), []), lambda r: num(r.get("params"))),
                             _mean(sum(rs.values(), []), row_ratio), dict(rs))
               for w, rs in grouped[key].items()]
        out[key] = sorted(pts, key=lambda p: (p.params is None, p.params or 0))
    return out


def point_stat(point: FrontierPoint, recipe: str, get) -> float | None:
    return _mean(point.rows.get(recipe, []), get)


def interp_count(point: FrontierPoint, recipe: str) -> tuple[int, int]:
    rs = point.rows.get(recipe, [])
    return sum(1 for r in rs if interpolates(r)), len(rs)


def frontier_eps(points: list[FrontierPoint]) -> list[float]:
    return sorted({e for p in points for rs in p.rows.values() for r in rs for e in row_eps(r)})


def robust_at(point: FrontierPoint, recipe: str, eps: float) -> float | None:
    return point_stat(point, recipe, lambda r: acc_at(r, "robust_acc", eps))


def robust_verified(point: FrontierPoint, recipe: str, eps: float) -> bool:
    """Every row of the recipe at this width was verified at AutoAttack grade at eps."""
    return all(verified_at(r, eps) for r in point.rows.get(recipe, []))


def smooth_buys_robustness_from(points: list[FrontierPoint], eps: float) -> FrontierPoint | None:
    """The smallest width from which the smooth models' robust accuracy at eps exceeds ERM's at it and every larger
    width (means over seeds); None when it never does."""
    start = None
    for pt in points:
        e, s = robust_at(pt, "erm", eps), robust_at(pt, "smooth", eps)
        if e is not None and s is not None and s > e:
            start = start or pt
        else:
            start = None
    return start


# ------------------------------------------------------------------------------------------------- rendering

def frontier_title(key: tuple) -> str:
    dataset, threat, family, noise, n, d = key
    parts = [dataset or "?", threat or "?", family or "?"]
    parts.append(f"noise {noise:g}" if noise is not None else "noise ?")
    parts.append(f"n={n:g}" if n is not None else "n=?")
    parts.append(f"d={d:g}" if d is not None else "d=?")
    return " · ".join(parts)


def study_title(key: tuple) -> str:
    dataset, threat, family, recipe, noise = key
    return " · ".join([dataset or "?", threat or "?", family or "?", recipe or "?",
                       f"noise {noise:g}" if noise is not None else "noise ?"])


# ----------------------------------------------------------------------------------------------------- capacity

def capacity_key(row: dict) -> tuple:
    """One capacity curve: data set, threat, family and label noise; width, n and d move p/(n·d) along it."""
    return (text(row.get("dataset")), text(row.get("threat")), text(row.get("family")) or text(row.get("model")),
            num(row.get("label_noise")))


def capacity_title(key: tuple) -> str:
    dataset, threat, family, noise = key
    return " · ".join([dataset or "?", threat or "?", family or "?",
                       f"noise {noise:g}" if noise is not None else "noise ?"])


@dataclass
class Trend:
    """How one recipe's robust accuracy at one eps moves along p/(n·d): per seed the OLS slope of robust accuracy
    (points of %) on log2 p/(n·d), then the mean and t-interval over seeds."""
    recipe: str
    eps: float
    slope: float | None = None       # percentage points per doubling of p/(n·d)
    half: float | None = None        # CI half-width (None: under two seeds)
    n_seeds: int = 0

    @property
    def verdict(self) -> str:
        if self.slope is None:
            return "no trend measured (under two points per seed)"
        if self.half is None:
            return "has no verdict from one seed"
        if self.slope - self.half > 1e-9:
            return "rises with p/(n·d)"
        if self.slope + self.half < -1e-9:
            return "falls with p/(n·d)"
        return "flat within the seed spread"


def capacity_groups(rows) -> dict[tuple, dict[str, dict]]:
    """{capacity_key: {recipe: {(width, n, d): ok rows over seeds}}}, points in order of p/(n·d): every recipe,
    interpolating or not (robust accuracy speaks of every model; the table says which rows interpolate)."""
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if isinstance(r, dict) and is_ok(r) and row_ratio(r) is not None:
            point = (num(r.get("width")), num(r.get("n_train")), num(r.get("d")))
            grouped[capacity_key(r)][text(r.get("recipe"))][point].append(r)
    order = lambda item: _mean(item[1], row_ratio)  # noqa: E731
    return {k: {rec: dict(sorted(pts.items(), key=order)) for rec, pts in sorted(grouped[k].items())}
            for k in sorted(grouped, key=repr)}


def robust_trend(points: dict, recipe: str, eps: float) -> Trend:
    """The Trend of one recipe's rows ({point: rows}) at eps."""
    by_seed: dict = defaultdict(list)
    for rows in points.values():
        for r in rows:
            ratio, acc = row_ratio(r), acc_at(r, "robust_acc", eps)
            if ratio and ratio > 0 and acc is not None:
                by_seed[text(r.get("seed"))].append((math.log2(ratio), 100.0 * acc))
    slopes = []
    for pts in by_seed.values():
        if len({round(p[0], 9) for p in pts}) < 2:  # one p/(n·d): no slope
            continue
        xy = np.array(pts)
        slopes.append(ols(xy[:, 0], xy[:, 1])[0])
    slope, half = mean_ci(slopes)
    return Trend(recipe, eps, slope, half, len(slopes))


def separated(group: dict[str, dict], eps: float) -> list[tuple]:
    """Where two recipes' robust accuracy at eps differs by more than the seed spread: per point whose 95% intervals
    of two recipes do not overlap, (ratio, (recipe, mean, half), (recipe, mean, half)) for the pair farthest apart
    there (a recipe with one seed has no interval and separates from nothing)."""
    out = []
    for point in sorted({pt for pts in group.values() for pt in pts}, key=lambda pt: repr(pt)):
        stats = []
        for recipe, pts in group.items():
            mean, half = mean_ci([acc_at(r, "robust_acc", eps) for r in pts.get(point, [])])
            if mean is not None and half is not None:
                stats.append((recipe, mean, half))
        apart = [(a, b) for a in stats for b in stats if a[1] - a[2] > b[1] + b[2]]
        if apart:
            a, b = max(apart, key=lambda ab: ab[0][1] - ab[1][1])
            out.append((_mean([r for pts in group.values() for r in pts.get(point, [])], row_ratio), a, b))
    return sorted(out, key=lambda t: t[0])
