"""Plots from result rows (matplotlib, Agg / SVG canvases only; pyplot's global state is never touched).

- robust_vs_ratio: robust accuracy per eps against p/(n·d), log x, a vertical mark at p = n·d; one panel per view, or
  per line of a view with more than MAX_LINES_PER_PANEL (recipe x noise level).
- lipschitz_vs_ratio: lip_upper and lip_lower against p/(n·d) on log-log axes with the law's C·sqrt(n·d/p) line as a
  lower envelope: the largest C under every interpolating row's lip_lower (the law is a lower bound); one panel per
  view.
- accuracy_by_family: clean, robust and certified accuracy (headline eps) against p/(n·d), one panel per view and
  family.
- frontier: ERM against the smooth recipe per frontier: Lipschitz bounds with the law's envelope, robust accuracy.
"""
from __future__ import annotations

import io
import math
import textwrap

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from .formats import fmt_eps
from .values import num
from . import law
from .stats import law_envelope, loglog_slope
from .table import Entry, Stat, View

MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "h", "<", ">")
PLOT_NAMES = ("robust_vs_ratio", "lipschitz_vs_ratio", "accuracy_by_family", "frontier")


def _legend(ax, **kw) -> None:
    """A legend where the axes have labelled artists (matplotlib warns on an empty one, once per report)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _title(ax, text: str, fontsize: float = 10, width: int = 62) -> None:
    """An axis title wrapped onto as many lines as it needs: a view's title names its dataset, threat and suite, and
    a title wider than the axes is cut at both edges of the image."""
    ax.set_title("\n".join(textwrap.wrap(text, width=width)), fontsize=fontsize)

def _grid(n: int, max_cols: int = 2) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return math.ceil(max(n, 1) / cols), cols


def _figure(nrows: int, ncols: int, w: float = 5.6, h: float = 4.0):
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _no_data(ax, msg: str = "no data") -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _series(entries: list[Entry], get) -> tuple[list[float], list[float], list[float]]:
    """x = p/(n·d), y and yerr from get(entry) -> Stat; points without x > 0 or y are dropped; sorted by x."""
    pts = []
    for e in entries:
        st: Stat | None = get(e)
        x = e.ratio.mean
        if st is None or st.mean is None or x is None or not math.isfinite(x) or x <= 0 or not math.isfinite(st.mean):
            continue
        pts.append((x, st.mean, st.ci or 0.0))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def _families(view: View) -> list[str]:
    return list(dict.fromkeys(e.family for e in view.entries))


LINE_KEYS = ("family", "recipe", "label_noise", "n_train", "train_eps")  # what tells two lines of one panel apart


def _lines(view: View) -> list[tuple[str, list[Entry]]]:
    """One line per configuration apart from width and model: (label, its entries) for each family, recipe, label
    noise, n and training eps of the view (ERM and smooth points at the same p are two lines, never one zig-zag).
    The label names the family and whatever else differs between the view's lines."""
    groups: dict = {}
    for e in view.entries:
        groups.setdefault(tuple(getattr(e, k) for k in LINE_KEYS), []).append(e)
    varying = [i for i in range(1, len(LINE_KEYS)) if len({k[i] for k in groups}) > 1]
    names = {"recipe": "{}", "label_noise": "noise {:g}", "n_train": "n={:g}", "train_eps": "train eps {:g}"}

    def label(key) -> str:
        parts = [str(key[0])] + [names[LINE_KEYS[i]].format(key[i]) for i in varying if key[i] is not None]
        return " ".join(parts)

    return [(label(k), ents) for k, ents in groups.items()]


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class _Powers(LogFormatter):
    """Log-axis labels as plain text (10⁻², 2×10⁻¹) on the ticks matplotlib's own log formatter labels: its math-text
    labels are parsed by pyparsing, 2 of the 5 s the plots of a report took."""

    def __call__(self, x, pos=None):
        if x <= 0 or not super().__call__(x, pos):
            return ""
        exp = math.floor(math.log10(x) + 1e-9)
        coeff = round(x / 10.0 ** exp, 6)
        power = "10" + str(exp).translate(SUPERSCRIPT)
        return power if coeff == 1 else f"{coeff:g}×{power}"


def _log(ax, *which: str) -> None:
    """Log scale on the axes ``which`` ("x", "y"), labelled by _Powers."""
    for name in which:
        getattr(ax, f"set_{name}scale")("log")
        axis = getattr(ax, f"{name}axis")
        axis.set_major_formatter(_Powers())
        axis.set_minor_formatter(_Powers(labelOnlyBase=False))


def _mark_ratio_one(ax) -> None:
    ax.axvline(1.0, color="0.3", linestyle=":", linewidth=1.2, label="p = n·d")


def _accuracy_axes(ax, ylabel: str) -> None:
    """An accuracy panel against p/(n·d): log x axis, the ratio-1 mark, 0–100 % on y."""
    _mark_ratio_one(ax)
    _log(ax, "x")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("p / (n·d)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


# a view with more lines than this gets one panel per line (each eps one colour): recipes x noise levels x eps in one
# panel are unreadable
MAX_LINES_PER_PANEL = 4


def _robust_panels(views: list[View]) -> list[tuple[str, list]]:
    """(title, lines) per panel: a view's lines in one panel, or one panel per line where the view has more than
    MAX_LINES_PER_PANEL."""
    panels = []
    for view in views:
        lines = _lines(view)
        if len(lines) <= MAX_LINES_PER_PANEL:
            panels.append((f"{view.title}: robust accuracy", lines))
        else:
            panels += [(f"{view.title}: {label}", [(label, ents)]) for label, ents in lines]
    return panels


def plot_robust_vs_ratio(views: list[View]) -> Figure:
    panels = _robust_panels(views)
    fig, axes = _figure(*_grid(len(panels), max_cols=2 if len(panels) <= 4 else 3), w=7.2 if len(panels) <= 4 else 5.2)
    if not panels:
        _no_data(axes[0])
    for ax, (title, lines) in zip(axes, panels):
        eps_list = sorted({e for _, ents in lines for en in ents for e in en.by_eps.get("robust", {})})
        cmap = matplotlib.colormaps["viridis"]
        drawn = False
        used: set = set()
        for fi, (fam, ents) in enumerate(lines):
            marker = MARKERS[fi % len(MARKERS)]
            for ei, eps in enumerate(eps_list):
                get = lambda e, eps=eps: e.by_eps.get("robust", {}).get(eps)  # noqa: E731
                xs, ys, es = _series(ents, get)
                if not xs:
                    continue
                color = cmap(0.1 + 0.8 * ei / max(1, len(eps_list) - 1))
                ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * v for v in es], marker=marker, color=color,
                            capsize=2, linewidth=1.2, markersize=4,
                            label=f"{'' if len(lines) == 1 else fam + ' '}eps={fmt_eps(eps)}")
                unverified, flagged = _marked_points(ents, get, eps)
                _mark(ax, unverified, UNVERIFIED, used)
                _mark(ax, flagged, FLAGGED, used)
                drawn = True
            xs, ys, es = _series(ents, lambda e: e.clean)
            if xs:
                ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * v for v in es], marker=marker, color="0.55",
                            linestyle="--", capsize=2, linewidth=1, markersize=3,
                            label="clean" if len(lines) == 1 else f"{fam} clean")
                drawn = True
        if not drawn:
            _no_data(ax)
            _title(ax, title)
            continue
        _accuracy_axes(ax, "robust accuracy (%)")
        _title(ax, title, width=62 if len(panels) <= 4 else 48)
        if len(lines) == 1:  # a panel of its own: the legend inside, eps and clean only
            _legend(ax, fontsize=7, loc="best")
        else:
            _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                    ncols=1 + (len(ax.get_legend_handles_labels()[1]) > 14))
    for ax in axes[len(panels) or 1:]:
        ax.set_visible(False)
    return fig


NOT_INTERPOLATING = "does not interpolate (outside the law's premise)"
UNVERIFIED = "unverified: only PGD ran there (an upper bound)"
FLAGGED = "flagged: the attacks may have been fooled"
# how each mark is drawn over a point: a wide hollow grey square, a red cross
MARKS = {UNVERIFIED: dict(marker="s", markersize=11, markerfacecolor="none", markeredgecolor="0.45",
                          markeredgewidth=1.1),
         FLAGGED: dict(marker="x", markersize=9, color="red", markeredgewidth=1.6)}


def _mark(ax, pts, kind: str, used: set) -> None:
    """Mark points (x, y in %) as `kind` (UNVERIFIED or FLAGGED); one legend entry per panel and kind."""
    if not pts:
        return
    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", zorder=4, gid=kind,
            label="_nolegend_" if kind in used else kind, **MARKS[kind])
    used.add(kind)


def _marked_points(ents: list[Entry], get, eps) -> tuple[list, list]:
    """(unverified, flagged) points (p/(n·d), value in %) of the entries' metric `get` at eps."""
    unverified, flagged = [], []
    for e in ents:
        xs, ys, _ = _series([e], get)
        if not xs:
            continue
        pt = (xs[0], 100 * ys[0])
        if not e.verified(eps):
            unverified.append(pt)
        if e.flagged:
            flagged.append(pt)
    return unverified, flagged


def _mark_not_interpolating(ax, ents, attr, marker, color, labelled: bool) -> bool:
    """Hollow rings around the points of entries with a row that does not fit its training labels; one legend
    entry per panel. Returns whether the label is now used."""
    out = [e for e in ents if any(r.get("interpolates") is False for r in e.rows)]
    xs, ys, _ = _series(out, lambda e: getattr(e, attr))
    pts = [(x, y) for x, y in zip(xs, ys) if y > 0]
    if not pts:
        return labelled
    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker=marker, markersize=9,
            markerfacecolor="white", markeredgecolor=color, markeredgewidth=1.2, zorder=3,
            label="_nolegend_" if labelled else NOT_INTERPOLATING)
    return True


def plot_lipschitz(views: list[View]) -> Figure:
    fig, axes = _figure(*_grid(len(views)))
    if not views:
        _no_data(axes[0])
    for ax, view in zip(axes, views):
        drawn = marked = False
        xs_all = []
        for fi, (fam, ents) in enumerate(_lines(view)):
            marker = MARKERS[fi % len(MARKERS)]
            for attr, color, name in (("lip_upper", "C3", "upper"), ("lip_lower", "C0", "lower")):
                xs, ys, es = _series(ents, lambda e: getattr(e, attr))
                keep = [i for i, y in enumerate(ys) if y > 0]
                if not keep:
                    continue
                xs, ys, es = [xs[i] for i in keep], [ys[i] for i in keep], [es[i] for i in keep]
                lower_err = [min(err, 0.999 * y) for y, err in zip(ys, es)]  # stay positive on a log axis
                ax.errorbar(xs, ys, yerr=[lower_err, es], marker=marker, color=color, capsize=2, linewidth=1.2,
                            markersize=4, label=f"{fam} lip_{name}")
                xs_all += xs
                drawn = True
                marked = _mark_not_interpolating(ax, ents, attr, marker, color, marked)
        if not drawn:
            _no_data(ax)
            _title(ax, view.title)
            continue
        env = law_envelope(view.rows, "lip_lower")
        if env["c"] is not None and xs_all:
            c, lo, hi = env["c"], min(xs_all), max(xs_all)
            span = [lo / 1.5, hi * 1.5]
            ax.plot(span, [c / math.sqrt(x) for x in span], color="k", linestyle="--", linewidth=1,
                    label=f"law's scale under every interpolating row ({env['interpolating']} of {env['rows']}): "
                          f"{c:.3g}·sqrt(n·d/p)")
        _mark_ratio_one(ax)
        _log(ax, "x", "y")
        ax.set_xlabel("p / (n·d)")
        ax.set_ylabel("Lipschitz constant (L2, logits)")
        res = loglog_slope(view.rows, "lip_lower")
        slope = "" if res["slope"] is None else f" (lip_lower slope {res['slope']:.2f})"
        _title(ax, f"{view.title}: Lipschitz bounds{slope}")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, fontsize=7)
    for ax in axes[len(views) or 1:]:
        ax.set_visible(False)
    return fig


def plot_accuracy_by_family(views: list[View]) -> Figure:
    panels = [(v, fam) for v in views for fam in _families(v)]
    nrows, ncols = _grid(len(panels), max_cols=3)
    fig, axes = _figure(nrows, ncols, w=4.6, h=3.6)
    if not panels:
        _no_data(axes[0])
    for ax, (view, fam) in zip(axes, panels):
        ents = [e for e in view.entries if e.family == fam]
        drawn = False
        used: set = set()
        for attr, color, name in (("clean", "0.3", "clean"), ("robust", "C1", "robust"), ("cert", "C2", "certified")):
            xs, ys, es = _series(ents, lambda e: getattr(e, attr))
            if not xs:
                continue
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * v for v in es], marker="o", color=color, capsize=2,
                        linewidth=1.2, markersize=4, label=name)
            drawn = True
        for e in ents:  # the robust point at each entry's own headline eps
            unverified, flagged = _marked_points([e], lambda en: en.robust, e.eps)
            _mark(ax, unverified, UNVERIFIED, used)
            _mark(ax, flagged, FLAGGED, used)
        eps = sorted({e.eps for e in ents if e.eps is not None})
        _title(ax, f"{view.title} · {fam} (eps {', '.join(fmt_eps(e) for e in eps) or '–'})", fontsize=9)
        if not drawn:
            _no_data(ax)
            continue
        _accuracy_axes(ax, "accuracy (%)")
        _legend(ax, fontsize=7)
    for ax in axes[len(panels) or 1:]:
        ax.set_visible(False)
    return fig


def _frontier_series(points, recipe: str, get):
    pts = []
    for pt in points:
        v = law.point_stat(pt, recipe, get)
        if pt.ratio is not None and pt.ratio > 0 and v is not None and math.isfinite(v) and v > 0:
            pts.append((pt.ratio, v))
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_frontier(views: list[View]) -> Figure:
    """Per frontier (same data, family, noise, n and d): left, lip_upper and lip_lower at training margin 1 of ERM
    (solid) and of the smooth recipe (dashed) against p/(n·d), log-log, with the law's lower envelope under every
    interpolating row's lip_lower; right, robust accuracy of both at each eps."""
    rows = [r for v in views for r in v.rows]
    frontiers = law.frontier_points(rows)
    fig, axes = _figure(max(1, len(frontiers)), 2, w=6.0, h=4.2)
    if not frontiers:
        _no_data(axes[0], "no frontier: run the erm and smooth recipes on the same cells")
        axes[1].set_visible(False)
        return fig
    for i, (key, points) in enumerate(frontiers.items()):
        ax, ax_r = axes[2 * i], axes[2 * i + 1]
        xs_all = []
        for recipe, style, face in (("erm", "-", None), ("smooth", "--", "white")):
            for attr, color in (("lip_upper_unit_margin", "C3"), ("lip_lower_unit_margin", "C0")):
                xs, ys = _frontier_series(points, recipe, lambda r, a=attr: num(r.get(a)))
                if xs:
                    ax.plot(xs, ys, linestyle=style, marker="o", color=color, markerfacecolor=face or color,
                            markersize=5, linewidth=1.3, label=f"{recipe} {attr.replace('_unit_margin', '')}")
                    xs_all += xs
        pts_rows = [r for pt in points for rs in pt.rows.values() for r in rs]
        env = law_envelope(pts_rows, "lip_lower_unit_margin")
        if env["c"] is not None and xs_all:
            span = [min(xs_all) / 1.5, max(xs_all) * 1.5]
            ax.plot(span, [env["c"] / math.sqrt(x) for x in span], color="k", linestyle=":", linewidth=1.2,
                    label=f"law's envelope {env['c']:.3g}·sqrt(n·d/p) ({env['interpolating']}/{env['rows']} "
                          f"interpolating)")
        _log(ax, "x", "y")
        ax.set_xlabel("p / (n·d)")
        ax.set_ylabel("Lipschitz constant at training margin 1")
        _title(ax, f"{law.frontier_title(key)}: ERM (solid) vs smooth (dashed)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, fontsize=7)
        eps_list = law.frontier_eps(points)
        cmap = matplotlib.colormaps["viridis"]
        used: set = set()
        for ei, e in enumerate(eps_list):
            color = cmap(0.1 + 0.8 * ei / max(1, len(eps_list) - 1))
            for recipe, style, face in (("erm", "-", None), ("smooth", "--", "white")):
                xs, ys, unverified = [], [], []
                for pt in points:
                    v = law.robust_at(pt, recipe, e)
                    if v is not None and pt.ratio:
                        xs.append(pt.ratio)
                        ys.append(100 * v)
                        if not law.robust_verified(pt, recipe, e):
                            unverified.append((pt.ratio, 100 * v))
                if xs:
                    ax_r.plot(xs, ys, linestyle=style, marker="o", color=color, markerfacecolor=face or color,
                              markersize=4, linewidth=1.2, label=f"{recipe} eps={fmt_eps(e)}")
                    _mark(ax_r, unverified, UNVERIFIED, used)
        _accuracy_axes(ax_r, "robust accuracy (%)")
        _title(ax_r, "robust accuracy: ERM (solid) vs smooth (dashed)", fontsize=9)
        _legend(ax_r, fontsize=6, ncols=2)
    return fig


PLOTTERS = {
    "robust_vs_ratio": plot_robust_vs_ratio,
    "lipschitz_vs_ratio": plot_lipschitz,
    "accuracy_by_family": plot_accuracy_by_family,
    "frontier": plot_frontier,
}


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure encoded as png or svg (SVG without a date and with fixed ids, so equal rows give equal files)."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "lawbench", "svg.fonttype": "none"}):
        if fmt == "svg":
            fig.savefig(buf, format="svg", metadata={"Date": None})
        elif fmt == "png":
            fig.savefig(buf, format="png", dpi=110)
        else:
            raise ValueError(f"unknown plot format {fmt!r}")
    return buf.getvalue()
