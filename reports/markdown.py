"""The Markdown leaderboard (GitHub tables through tabulate)."""
from __future__ import annotations

import math
import re

from tabulate import tabulate

from .formats import (FLAGGED_MARK, MISSING, UNVERIFIED_NOTE, fmt_ci, fmt_eps, fmt_int, fmt_pct, fmt_ratio,
                      fmt_robust, fmt_sig, fmt_slope, fmt_width)
from .schema import parse_eps_key
from .values import acc_at, interpolates, num, row_eps, row_ratio, text, verified_at
from .columns import LEADERBOARD, RANKING, Column
from .table import View, failed_rows, ranking, view_context
from .stats import law_envelope, loglog_slope, mean_ci
from . import law

PLOT_TITLES = {
    "robust_vs_ratio": "Robust accuracy per eps against p/(n·d)",
    "lipschitz_vs_ratio": "Lipschitz bounds against p/(n·d) with the law's sqrt(n·d/p) line",
    "accuracy_by_family": "Clean, robust and certified accuracy per family",
    "frontier": "ERM against the smoothest interpolator found: Lipschitz bounds and robust accuracy",
}


# What a Markdown renderer would read as HTML: '<' opening a tag, comment or declaration, '&' opening an entity.
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
_ENTITY = re.compile(r"&(?=#?\w+;)")


def md_escape(s: str) -> str:
    """A single-line table cell, readable as plain text too: pipes escaped, and a backslash before the few '<' and
    '&' a renderer would take for a tag or an entity (no HTML entities: 'p < n·d' stays as it is)."""
    out = _ENTITY.sub(r"\\&", _TAG_OPEN.sub(r"\\<", text(s))).replace("|", "\\|")
    return out or MISSING


def md_table(headers, rows, aligns) -> str:
    return tabulate([[md_escape(c) for c in r] for r in rows], headers=[md_escape(h) for h in headers],
                    tablefmt="github", disable_numparse=True, colalign=aligns)


def _columns_table(cols: tuple[Column, ...], entries, prefix=None) -> str:
    headers = ([prefix[0]] if prefix else []) + [c.header for c in cols]
    aligns = (["right"] if prefix else []) + ["right" if c.numeric else "left" for c in cols]
    body = []
    for i, e in enumerate(entries):
        cells = [c.cell(e)[0] for c in cols]
        body.append(([prefix[1][i]] if prefix else []) + cells)
    return md_table(headers, body, aligns)


def _fmt_list(values, fmt=lambda v: f"{v:g}") -> str:
    return ", ".join(fmt(v) for v in values) if values else MISSING


def view_heading_facts(view: View) -> str:
    ctx = view_context(view)
    d_eff = MISSING if ctx["d_eff"] is None else f"{ctx['d_eff']:.3g}"
    return (f"n = {_fmt_list(ctx['n_train'], fmt_int)} · d = {_fmt_list(ctx['d'], fmt_int)} · d_eff ≈ {d_eff} · "
            f"label noise {_fmt_list(ctx['label_noise'])} · seeds {', '.join(ctx['seeds']) or MISSING} · "
            f"headline eps {_fmt_list(ctx['eps'], fmt_eps)} · attacks {ctx['suite']}")


def slope_scopes(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The rows in groups a slope may be fitted over: one family, one recipe, one label-noise level each (a fit
    across recipes mixes models the law treats apart: ERM and the smoothest interpolator). The scope names the
    family and recipe, and the noise level where the view has several."""
    key = lambda r: (r.get("family") or "?", r.get("recipe") or "?", r.get("label_noise"))  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    noises = len({k[2] for k in groups}) > 1
    out = []
    for (fam, recipe, noise), members in groups.items():
        parts = [fam, recipe] + ([f"noise {noise:g}"] if noises and isinstance(noise, (int, float)) else [])
        out.append((" · ".join(parts), members))
    return out


def slope_rows(view: View) -> list[tuple[str, str, dict]]:
    """(bound, scope, loglog_slope result) for lip_lower and lip_upper, per family, recipe and label noise."""
    scopes = slope_scopes(view.rows)
    return [(y, scope, loglog_slope(members, y=y)) for y in ("lip_lower", "lip_upper") for scope, members in scopes]


def interval_note(res: dict) -> str:
    if res["method"] == "seeds":
        return "per-seed fits, t-interval over seeds"
    if res["method"] == "regression":
        return "one seed, regression s.e." if res["ci_low"] is not None else "one seed, two points: no interval"
    return "too few points (two widths per seed needed)"


def slope_table(view: View) -> str:
    body = [[y, scope, fmt_slope(res), fmt_ci(res), str(res["n_seeds"]), str(res["n_points"]),
             str(res["n_excluded"]), interval_note(res)] for y, scope, res in slope_rows(view)]
    return md_table(["bound", "scope", "slope", "95% CI", "seeds", "interpolating points", "left out (not "
                     "interpolating)", "interval"], body,
                    ["left", "left", "right", "right", "right", "right", "right", "left"])


def _arrow(a, b, fmt) -> str:
    """'ERM → smooth' in one cell."""
    return f"{fmt(a)} → {fmt(b)}"


def _count(point, recipe) -> str:
    k, n = law.interp_count(point, recipe)
    return f"{k}/{n}"


def _attempts(point) -> str:
    """The smooth search's spread at one width: the lowest and highest certified bound at margin 1 its attempts
    ended at (over every seed), how many attempts that is, and how many rows found nothing below ERM's."""
    rows = point.rows.get("smooth", [])
    bounds = [num(a.get("bound_unit_margin")) for r in rows for a in (r.get("smooth_attempts") or [])
              if isinstance(a, dict)]
    ended = [b for b in bounds if b is not None]
    if not bounds:
        return MISSING
    out = (f"{fmt_sig(min(ended))} … {fmt_sig(max(ended))} ({len(ended)}/{len(bounds)} ended)" if ended
           else f"none ended (0/{len(bounds)})")
    failed = sum(1 for r in rows if r.get("smooth_no_gain") is True)
    return out + (f", {failed} no gain" if failed else "")


def frontier_table(points) -> str:
    """One line per width: p, p/(n·d), then 'ERM → smooth' for the rows that interpolate, their smallest training
    margin, lip_upper, lip_lower and robust accuracy at each eps (means over seeds)."""
    eps = law.frontier_eps(points)
    headers = ["width", "p", "p/(n·d)", "interpolating", "train margin", "lip_upper", "lip_lower",
               "lip_upper at margin 1", "lip_lower at margin 1", "lip_upper at 1st-percentile margin 1",
               "smooth attempts at margin 1"]
    headers += [f"robust @{fmt_eps(e)}" for e in eps]
    body = []
    for pt in points:
        stat = lambda key: (law.point_stat(pt, "erm", lambda r: num(r.get(key))),  # noqa: E731
                            law.point_stat(pt, "smooth", lambda r: num(r.get(key))))
        cells = [fmt_width(pt.width), fmt_int(pt.params), fmt_ratio(pt.ratio),
                 f"{_count(pt, 'erm')} → {_count(pt, 'smooth')}", _arrow(*stat("train_margin"), fmt_sig),
                 _arrow(*stat("lip_upper"), fmt_sig), _arrow(*stat("lip_lower"), fmt_sig),
                 _arrow(*stat("lip_upper_unit_margin"), fmt_sig), _arrow(*stat("lip_lower_unit_margin"), fmt_sig),
                 _arrow(*stat("lip_upper_q01_margin"), fmt_sig), _attempts(pt)]
        cells += [" → ".join(fmt_robust(law.robust_at(pt, r, e), verified=law.robust_verified(pt, r, e))
                             for r in ("erm", "smooth")) for e in eps]
        body.append(cells)
    return md_table(headers, body, ["right"] * len(headers))


def frontier_notes(key, points) -> list[str]:
    rows = [r for pt in points for rs in pt.rows.values() for r in rs]
    env = law_envelope(rows, "lip_lower_unit_margin")
    lines = []
    if env["c"] is not None:
        lines.append(f"The law's scale under every interpolating row's lip_lower at margin 1 ({env['interpolating']} "
                     f"of {env['rows']} rows): {env['c']:.3g}·sqrt(n·d/p), the largest such C.")
    elif not any(interpolates(r) for r in rows):
        lines.append("No row interpolates: the law says nothing about these models.")
    else:
        lines.append("No interpolating row records its bounds at margin 1 (rows from an older lawbench): no envelope.")
    bounds = sorted({round(num(r.get("law_bound")), 12) for r in rows if r.get("law_applicable") is True
                     and num(r.get("law_bound")) is not None})
    flags = sorted({text(r.get("law_flag")) for r in rows if text(r.get("law_flag"))})
    if bounds:
        lines.append(f"Theorem 3's explicit bound: {', '.join(f'{b:.3g}' for b in bounds)} (Lipschitz, law's units).")
    elif flags:
        lines.append(f"Theorem 3's explicit bound is vacuous here: {flags[0].split(':', 1)[-1].strip()}.")
    bought = False
    for e in law.frontier_eps(points):
        start = law.smooth_buys_robustness_from(points, e)
        if start is not None:
            bought = True
            lines.append(f"At eps {fmt_eps(e)} the smooth models are more robust than ERM's from p = "
                         f"{fmt_int(start.params)} (width {fmt_width(start.width)}) on.")
    if not bought:
        lines.append("At no eps are the smooth models more robust than ERM's from some width on.")
    return lines


def exponent_table(rows) -> str:
    """a, b, c of log Lip = a·log p + b·log n + c·log d + const per study and regime (p < n·d, p ≥ n·d), each fitted
    past the study's interpolation peak, beside the law's (−1/2, +1/2, +1/2)."""
    body = []
    for y in ("lip_upper", "lip_lower"):
        for dim in ("d", "d_eff"):
            for regime in law.REGIMES:
                for res in law.fit_exponents(rows, y=y, dim=dim, regime=regime, past_peak=True):
                    if dim == "d_eff" and "d" not in res.varied:
                        continue  # with d fixed, d_eff is one constant too: the same a and b, no c
                    if not res.rows_kept and not res.before_peak:
                        continue  # no row of the study in this regime
                    body.append(_exponent_cells(res))
    headers = ["study", "bound", "dimension", "regime", "a (p; law −0.5)", "b (n; law +0.5)", "c (d; law +0.5)",
               "seeds", "points", "peak left out", "interval"]
    return md_table(headers, body, ["left"] * 4 + ["right"] * 5 + ["left"] * 2)


def _exponent_cells(res) -> list[str]:
    cells = [law.study_title(res.key), res.y, res.dim, res.regime]
    for v in ("p", "n", "d"):
        if v not in res.varied or v not in res.coef:
            cells.append("not varied" if v not in res.varied else MISSING)
            continue
        h = res.half.get(v)
        ci = "" if h is None else f" [{res.coef[v] - h:.3f}, {res.coef[v] + h:.3f}]"
        cells.append(f"{res.coef[v]:.3f}{ci}")
    peak = ("not located (under 3 ratios)" if res.peak is None
            else f"peak at p/(n·d) {res.peak:.3g}; {res.before_peak} row(s) before it")
    cells += [str(res.n_seeds), str(res.rows_kept), peak,
              {"seeds": "t-interval over seeds", "regression": "one seed, regression s.e."}.get(res.method,
                                                                                             "too few points")]
    return cells


def _mean_ci_of(rows, get) -> tuple:
    return mean_ci([get(r) for r in rows])


def capacity_table(group: dict[str, dict], eps: list[float]) -> str:
    """One line per recipe and point along p/(n·d): robust accuracy at every eps and the Lipschitz bounds at margin 1
    (interpolating rows only: the law's quantity), each the mean ± the 95% t-interval over seeds."""
    headers = ["recipe", "width", "n", "d", "p/(n·d)", "seeds", "interpolating", "clean"]
    headers += [f"robust @{fmt_eps(e)}" for e in eps] + ["lip_lower at margin 1", "lip_upper at margin 1"]
    body = []
    for recipe, points in group.items():
        for (width, n, d), rs in points.items():
            fits = [r for r in rs if interpolates(r)]
            cells = [md_escape(recipe), fmt_width(width), fmt_int(n), fmt_int(d),
                     fmt_ratio(_mean_ci_of(rs, row_ratio)[0]), str(len(rs)), f"{len(fits)}/{len(rs)}",
                     fmt_pct(*_mean_ci_of(rs, lambda r: num(r.get("clean_acc"))))]
            cells += [fmt_robust(*_mean_ci_of(rs, lambda r, e=e: acc_at(r, "robust_acc", e)),
                                 verified=all(verified_at(r, e) for r in rs)) for e in eps]
            cells += [fmt_sig(*_mean_ci_of(fits, lambda r, k=k: law.law_units(r, k)))
                      for k in ("lip_lower_unit_margin", "lip_upper_unit_margin")]
            body.append(cells)
    return md_table(headers, body, ["left"] + ["right"] * (len(headers) - 1))


def capacity_notes(group: dict[str, dict], eps: list[float]) -> list[str]:
    """Per recipe and eps whether robust accuracy rises with p/(n·d) (a t-interval over seeds of per-seed slopes),
    then per eps where the recipes differ by more than their seed spread."""
    lines = []
    for recipe, points in group.items():
        for e in eps:
            t = law.robust_trend(points, recipe, e)
            if t.slope is None:
                continue
            ci = f" [{t.slope - t.half:+.2f}, {t.slope + t.half:+.2f}]" if t.half is not None else ""
            lines.append(f"{recipe} at eps {fmt_eps(e)}: robust accuracy {t.verdict} ({t.slope:+.2f}{ci} points "
                         f"per doubling of p/(n·d), {t.n_seeds} seed(s)).")
    for e in eps:
        apart = law.separated(group, e)
        if not apart:
            lines.append(f"At eps {fmt_eps(e)} no two recipes differ by more than their seed spread at any point.")
            continue
        ratio, (ra, ma, ha), (rb, mb, hb) = max(apart, key=lambda t: t[1][1] - t[2][1])
        lines.append(f"At eps {fmt_eps(e)} recipes differ by more than their seed spread at {len(apart)} point(s) "
                     f"along p/(n·d); farthest apart at {fmt_ratio(ratio)}: {ra} {fmt_pct(ma, ha)} against "
                     f"{rb} {fmt_pct(mb, hb)}.")
    return lines


def capacity_section(rows) -> list[str]:
    """Robust accuracy and the Lipschitz constant against p/(n·d) per recipe and label noise, with CIs over seeds and
    the verdict on whether robust accuracy rises with capacity; curves with a single point are left out."""
    groups = {k: g for k, g in law.capacity_groups(rows).items() if any(len(pts) > 1 for pts in g.values())}
    if not groups:
        return []
    out = ["## Robust accuracy and Lipschitz constants against p/(n·d)", "",
           "Per label-noise level, every recipe along p/(n·d): robust accuracy at each eps (all rows) and the "
           "Lipschitz bounds at margin 1 in the law's units (interpolating rows only), each the mean ± the "
           "half-width of a 95% t-interval over seeds. The law says an interpolator of noisy labels has a Lipschitz "
           "constant of at least about sqrt(n·d/p), so robust interpolation needs p ≳ n·d; the verdicts fit, per "
           "seed, robust accuracy (points of %) against log2 p/(n·d) and give the t-interval of the slopes over "
           "seeds.", ""]
    for key, group in groups.items():
        eps = sorted({e for pts in group.values() for rs in pts.values() for r in rs for e in row_eps(r)})
        out += [f"### {md_escape(law.capacity_title(key))}", "", capacity_table(group, eps), ""]
        out += ["\n".join(f"- {md_escape(line)}" for line in capacity_notes(group, eps)), ""]
    return out


def law_section(rows) -> list[str]:
    """The frontier per (data, threat, family, noise, n, d) and the exponents per study, over interpolating rows."""
    out = ["## The law: smoothest interpolators and exponents", "",
           "Only rows that fit every training label (noisy ones included) enter a fit: the law bounds interpolating "
           "models. Frontier cells read ERM → smooth (means over seeds); the smooth recipe fits at a smallest "
           "training margin of 1, ERM at whatever margin it stopped with, so the two compare at margin 1 (a "
           "classifier's logits scale freely: bound / smallest training margin). Exponents: per seed, OLS of log Lip on "
           "the logs of the variables that vary, Lipschitz constants in the law's units (synthetic Gaussian data: "
           "times the data's scale, so inputs have norm about 1 at every d). They are fitted for p < n·d (where the "
           "law's scale sqrt(n·d/p) exceeds 1) and p ≥ n·d separately, each only at and past the study's "
           "interpolation peak (the p/(n·d) where the mean log bound is largest: Lipschitz constants rise up to the "
           "interpolation threshold and fall past it, and a slope across the peak is meaningless); the table says "
           "where the peak is and how many rows before it were left out.", ""]
    frontiers = law.frontier_points(rows)
    for key, points in frontiers.items():
        out += [f"### Frontier: {md_escape(law.frontier_title(key))}", "", frontier_table(points), ""]
        out += ["\n".join(f"- {md_escape(line)}" for line in frontier_notes(key, points)), ""]
    if not frontiers:
        out += ["No frontier: run the erm and smooth recipes on the same cells (e.g. `python -m bench run law`).", ""]
    out += ["### Exponents of log Lip = a·log p + b·log n + c·log d + const", "", exponent_table(rows), ""]
    return out


def failed_table(rows) -> str:
    body = [[text(r.get("cell_id")), text(r.get("dataset")), text(r.get("threat")), text(r.get("model")),
             text(r.get("width")), text(r.get("seed")), text(r.get("status")) or "failed",
             text(r.get("error")) or "(no error message)"] for r in rows]
    return md_table(["cell_id", "dataset", "threat", "model", "width", "seed", "status", "error"], body,
                    ["left", "left", "left", "left", "right", "right", "left", "left"])


def indicator_rows(rows) -> list[list[str]]:
    """One line per ok row and eps where an indicator of attack failure fired (`attack_indicators`): what fired (value
    over threshold), what the adaptive stage broke there, the robust accuracy left."""
    out = []
    for r in rows:
        ind = r.get("attack_indicators")
        if r.get("status") != "ok" or not isinstance(ind, dict):
            continue
        for key in sorted(ind, key=lambda k: parse_eps_key(k) if parse_eps_key(k) is not None else math.inf):
            per = ind[key] if isinstance(ind[key], dict) else {}
            fired = [f"{md_escape(str(n))} {v.get('value'):.3g} > {v.get('threshold'):g}" for n, v in sorted(per.items())
                     if isinstance(v, dict) and v.get("fired") is True and isinstance(v.get("value"), (int, float))
                     and isinstance(v.get("threshold"), (int, float))]
            if not fired:
                continue
            breaks = (r.get("attack_breaks") or {}).get(key) or {}
            robust = acc_at(r, "robust_acc", parse_eps_key(key))
            out.append([md_escape(f"{text(r.get('model'))}-w{text(r.get('width'))}"), text(r.get("recipe")),
                        text(r.get("seed")), text(r.get("threat")), key, "; ".join(fired),
                        text(breaks.get("adaptive")) if isinstance(breaks, dict) else "",
                        MISSING if robust is None else f"{100 * robust:.1f}"])
    return out


def indicator_section(rows) -> list[str]:
    measured = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("attack_indicators"), dict)]
    if not measured:
        return []
    out = ["## Indicators of attack failure", "",
           "Measured at every eps by the adaptive stage on the points the other attacks left (Pintor et al. 2022's "
           "six, Carlini et al. 2019's sanity checks). Where one fires, the stage attacks the defense itself; its "
           "breaks are in the robust accuracy shown.", ""]
    body = indicator_rows(measured)
    if not body:
        return out + [f"No indicator fired on any of the {len(measured)} rows that measured them.", ""]
    return out + [md_table(["model", "recipe", "seed", "threat", "eps", "fired (value > threshold)",
                            "adaptive broke", "robust %"], body,
                           ["left", "left", "right", "left", "right", "left", "right", "right"]), ""]


def render_markdown(rows, views: list[View], *, source: str = "results.jsonl", plots: list[str] = (),
                    plot_ext: str | None = None) -> str:
    ok = sum(1 for r in rows if r.get("status") == "ok")
    failed = failed_rows(rows)
    versions = sorted({text(r.get("bench_version")) for r in rows if text(r.get("bench_version"))})
    out = ["# Law of robustness: leaderboard", ""]
    out.append(f"From `{md_escape(source)}`: {len(rows)} rows ({ok} ok, {len(failed)} failed)"
               + (f" · bench {', '.join(versions)}" if versions else "") + ".")
    out.append("")
    out.append("Accuracies are in % at the headline eps (a row's largest AutoAttack eps, else its largest eps). "
               "Where several seeds ran for the same configuration a cell shows the mean ± the half-width of a 95% "
               "Student-t confidence interval over seeds. p/(n·d) is parameters over training points times input "
               "dimension; the law of robustness (Bubeck & Sellke 2021) says an interpolating model needs a "
               "Lipschitz constant of order at least law_scale = sqrt(n·d/p). Robust accuracy is the per-point "
               "worst case over every attack run; ranking is by robust accuracy.")
    out.append("")
    out += [f"{UNVERIFIED_NOTE}. {FLAGGED_MARK} flagged: the attacks may have been fooled (gradient masking, "
            "randomness, scaled logits, an indicator of attack failure; the flags column says which).", ""]
    if not views:
        out += ["No successful rows.", ""]
    for view in views:
        out += [f"## {md_escape(view.title)}", "", view_heading_facts(view), ""]
        ranked = ranking(view)
        out += ["### Ranking", "",
                _columns_table(RANKING, [e for _, e in ranked],
                               prefix=("Rank", [str(r) if r is not None else MISSING for r, _ in ranked])), ""]
        out += ["### Leaderboard", "", _columns_table(LEADERBOARD, view.entries), ""]
        out += ["### Log-log slope of the Lipschitz bounds against p/(n·d)", "",
                "The law's scale sqrt(n·d/p) has slope −0.5. Fitted over the rows that interpolate their training "
                "labels only (the law bounds no other model); rows that do not are counted, not fitted.", "",
                slope_table(view), ""]
    out += capacity_section(rows)
    out += law_section(rows)
    out += indicator_section(rows)
    if plots and plot_ext:
        out += ["## Plots", ""]
        for name in plots:
            out += [f"![{PLOT_TITLES.get(name, name)}]({name}.{plot_ext})", ""]
    out += ["## Failed rows", ""]
    out += [failed_table(failed) if failed else "None.", ""]
    return "\n".join(out)
