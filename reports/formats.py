"""How reports write numbers and marks: missing values, percentages, significant digits, eps as k/255, the marks of
unverified and flagged results."""
from __future__ import annotations

import math

from .values import num, text


MISSING = "\u2013"  # en dash: how every missing/null value is rendered


# how every report marks a robust accuracy that no AutoAttack-grade attack verified, and says why (UNVERIFIED_NOTE)
UNVERIFIED_MARK = "†"


UNVERIFIED_NOTE = (f"{UNVERIFIED_MARK} unverified: only PGD (or a weaker attack) ran at this eps, so the robust "
                   "accuracy is an upper bound, not a figure verified at AutoAttack grade")


# how reports mark rows whose attacks may have been fooled (a flag of reports.schema.TRUST_FLAGS)
FLAGGED_MARK = "⚠"


def fmt_robust(mean: float | None, ci: float | None = None, verified: bool = True) -> str:
    """A robust accuracy as fmt_pct gives it, marked when it is unverified (UNVERIFIED_MARK)."""
    out = fmt_pct(mean, ci)
    return out if verified or mean is None else out + UNVERIFIED_MARK


def fmt_radius(r: float | None, beyond: float | None) -> str:
    """A median radius: '0.048', '>0.6' past the search's top, MISSING where there is none."""
    if r is None:
        return MISSING
    if math.isinf(r):
        return ">" + fmt_eps(beyond) if beyond is not None else ">"
    return f"{r:.2g}"


def radii_cell(cert: float | None, attack: float | None, cert_beyond, attack_beyond) -> str:
    """'certified / attacked' median radii, side by side."""
    if cert is None and attack is None:
        return MISSING
    return f"{fmt_radius(cert, cert_beyond)} / {fmt_radius(attack, attack_beyond)}"


def fmt_eps(eps: float | None) -> str:
    """eps for people: k/255 when it is one (CIFAR convention), else the short decimal."""
    if eps is None:
        return MISSING
    if eps > 0:
        k = eps * 255
        if abs(k - round(k)) < 1e-6 and round(k) >= 1 and not _short_decimal(eps):
            return f"{int(round(k))}/255"
    return f"{eps:g}"


def _short_decimal(eps: float) -> bool:
    return len(f"{eps:g}") <= 5 and float(f"{eps:g}") == eps


def fmt_pct(mean: float | None, ci: float | None = None) -> str:
    """An accuracy in [0,1] as a percentage with two decimals, with ± half-width when given."""
    if mean is None:
        return MISSING
    s = f"{100 * mean:.2f}"
    return s if ci is None else f"{s} ± {100 * ci:.2f}"


def fmt_sig(value: float | None, ci: float | None = None, digits: int = 4) -> str:
    """A positive quantity (Lipschitz bounds, law scale) with `digits` significant digits."""
    if value is None:
        return MISSING
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    s = f"{value:.{digits}g}"
    return s if ci is None else f"{s} ± {float(f'{ci:.2g}'):g}"


def fmt_ratio(value: float | None) -> str:
    return MISSING if value is None else ("inf" if math.isinf(value) else f"{value:.3g}")


def fmt_int(value: float | None) -> str:
    if value is None:
        return MISSING
    if math.isinf(value):
        return "inf"
    return str(int(round(value)))


def fmt_width(value) -> str:
    v = num(value)
    if v is None:
        return text(value) or MISSING
    return str(int(v)) if v == int(v) else f"{v:g}"


def fmt_slope(res: dict) -> str:
    if res.get("slope") is None:
        return MISSING
    return f"{res['slope']:.3f}"


def fmt_ci(res: dict) -> str:
    lo, hi = res.get("ci_low"), res.get("ci_high")
    if lo is None or hi is None:
        return MISSING
    return f"[{lo:.3f}, {hi:.3f}]"
