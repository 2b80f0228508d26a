"""The Markdown leaderboard (GitHub tables through tabulate)."""
from __future__ import annotations

from tabulate import tabulate

from ._util import MISSING, fmt_ci, fmt_eps, fmt_int, fmt_slope, text
from .columns import LEADERBOARD, RANKING, Column
from .table import View, failed_rows, ranking, view_context
from .stats import loglog_slope

PLOT_TITLES = {
    "robust_vs_ratio": "Robust accuracy per eps against p/(n·d)",
    "lipschitz_vs_ratio": "Lipschitz bounds against p/(n·d) with the law's sqrt(n·d/p) line",
    "accuracy_by_family": "Clean, robust and certified accuracy per family",
}


def md_escape(s: str) -> str:
    """A single-line table cell: pipes escaped, angle brackets as entities (GitHub would swallow them as tags)."""
    return (text(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            or MISSING)


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
            f"headline eps {_fmt_list(ctx['eps'], fmt_eps)}")


def slope_rows(view: View) -> list[tuple[str, str, dict]]:
    """(bound, scope, loglog_slope result) for lip_lower and lip_upper, over all families then per family."""
    out = []
    families = list(dict.fromkeys(e.family for e in view.entries))
    for y in ("lip_lower", "lip_upper"):
        out.append((y, "all families", loglog_slope(view.rows, y=y)))
        if len(families) > 1:
            for fam in families:
                out.append((y, fam or "?", loglog_slope([r for e in view.entries if e.family == fam for r in e.rows],
                                                        y=y)))
    return out


def interval_note(res: dict) -> str:
    if res["method"] == "seeds":
        return "per-seed fits, t-interval over seeds"
    if res["method"] == "regression":
        return "one seed, regression s.e." if res["ci_low"] is not None else "one seed, two points: no interval"
    return "too few points (two widths per seed needed)"


def slope_table(view: View) -> str:
    body = [[y, scope, fmt_slope(res), fmt_ci(res), str(res["n_seeds"]), str(res["n_points"]), interval_note(res)]
            for y, scope, res in slope_rows(view)]
    return md_table(["bound", "scope", "slope", "95% CI", "seeds", "points", "interval"], body,
                    ["left", "left", "right", "right", "right", "right", "left"])


def failed_table(rows) -> str:
    body = [[text(r.get("cell_id")), text(r.get("dataset")), text(r.get("threat")), text(r.get("model")),
             text(r.get("width")), text(r.get("seed")), text(r.get("status")) or "failed",
             text(r.get("error")) or "(no error message)"] for r in rows]
    return md_table(["cell_id", "dataset", "threat", "model", "width", "seed", "status", "error"], body,
                    ["left", "left", "left", "left", "right", "right", "left", "left"])


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
                "The law's scale sqrt(n·d/p) has slope −0.5.", "", slope_table(view), ""]
    if plots and plot_ext:
        out += ["## Plots", ""]
        for name in plots:
            out += [f"![{PLOT_TITLES.get(name, name)}]({name}.{plot_ext})", ""]
    out += ["## Failed rows", ""]
    out += [failed_table(failed) if failed else "None.", ""]
    return "\n".join(out)
