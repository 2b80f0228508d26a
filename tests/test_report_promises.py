"""What the reports promise, read back from what they write: rows attacked by different suites are never ranked
together, Theorem 3's line says the bound or why it is vacuous, the d_eff exponent rows carry the intrinsic
dimension's own fit, and a row that does not interpolate is flagged. Each test fails when its promise breaks."""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest

from lawbench import reports
from lawbench.reports import markdown
from lawbench.reports.formats import fmt_eps
from lawbench.reports.values import row_eps
from test_reports import fixture_rows, make_row, mlp_params


def _md(rows) -> str:
    return markdown.render_markdown(rows, reports.build_views(rows))


def _ranking_section(md: str, title_part: str) -> str:
    """The Markdown between the heading naming title_part and the next heading of the same level or above."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and title_part in line)
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start:end])


def test_rows_of_different_suites_are_never_ranked_together():
    """Two models on the same data and threat, one attacked by the default suite, one by PGD then Square alone: two
    views, each ranking only its own rows (a weaker suite's higher robust accuracy would otherwise outrank)."""
    rng = np.random.default_rng(0)
    strong = make_row("mlp", "mlp", 128, mlp_params(128), 0, "Linf", rng)
    weak = make_row("mlp", "mlp-weak", 128, mlp_params(128), 0, "Linf", rng)
    strong["suite"], weak["suite"] = ["pgd", "autoattack"], ["pgd", "ta-square"]
    weak["robust_acc"] = {k: min(1.0, v + 0.3) if v is not None else v for k, v in weak["pgd_acc"].items()}
    weak["autoattack_acc"] = {k: None for k in weak["autoattack_acc"]}
    views = reports.build_views([strong, weak])
    assert len(views) == 2
    by_suite = {v.key[2]: v for v in views}
    assert set(by_suite) == {"", "pgd → ta-square"}
    assert [e.model for _, e in reports.ranking(by_suite[""])] == ["mlp"]
    assert [e.model for _, e in reports.ranking(by_suite["pgd → ta-square"])] == ["mlp-weak"]
    md = _md([strong, weak])
    other = _ranking_section(md, "attacks pgd → ta-square")
    assert "mlp-weak" in other
    default = md[:md.index(other)]
    assert "mlp-weak" not in default


def _frontier_rows(**law) -> list[dict]:
    """ERM and smooth rows at two widths (one seed): a frontier, with the law's quantities given."""
    rng = np.random.default_rng(3)
    rows = []
    for width in (32, 128):
        for recipe in ("erm", "smooth"):
            r = make_row("mlp", "mlp", width, mlp_params(width), 0, "Linf", rng)
            r.update(recipe=recipe, interpolates=True, train_margin=1.0, lip_lower_unit_margin=r["lip_lower"],
                     cell_id=f"{recipe}-{width}", **law)
            rows.append(r)
    return rows


def test_theorem3_line_gives_the_bound_where_it_applies():
    rows = _frontier_rows(law_applicable=True, law_bound=0.0123, law_flag="")
    lines = [line for line in _md(rows).splitlines() if "Theorem 3" in line]
    assert lines == ["- Theorem 3's explicit bound: 0.0123 (Lipschitz, law's units)."]


def test_theorem3_line_says_why_it_is_vacuous():
    flag = "law-bound-vacuous: n*eps^2 = 92.16 < 8^4 k log(8k/delta) = 3.2e+05 (needs n >= 3472)"
    rows = _frontier_rows(law_applicable=False, law_bound=None, law_flag=flag)
    lines = [line for line in _md(rows).splitlines() if "Theorem 3" in line]
    assert lines == ["- Theorem 3's explicit bound is vacuous here: n*eps^2 = 92.16 < 8^4 k log(8k/delta) = 3.2e+05 "
                     "(needs n >= 3472)."]


def _dim_study(c_d_eff: float) -> list[dict]:
    """A study where d varies and lip = sqrt(n) · p^-1/2 · d_eff^c with d_eff = d^0.5 (so against d the exponent is
    c/2): the d_eff rows must fit c, the d rows c/2."""
    rows = []
    n = 1000
    for seed in range(2):
        for d in (16, 64, 256):
            d_eff = d ** 0.5
            for p in (2 * n * d, 8 * n * d, 32 * n * d):  # all past p = n·d, decreasing: no peak before them
                lip = math.sqrt(n) * p ** -0.5 * d_eff ** c_d_eff * (1 + 0.001 * seed)
                rows.append({"status": "ok", "dataset": "gauss", "threat": "Linf", "family": "mlp", "model": "mlp",
                             "recipe": "erm", "label_noise": 0.1, "seed": seed, "params": p, "n_train": n, "d": d,
                             "d_eff": d_eff, "ratio": p / (n * d), "lip_upper": lip, "lip_lower": lip,
                             "interpolates": True})
    return rows


def test_d_eff_exponent_rows_carry_the_intrinsic_dimensions_fit():
    table = markdown.exponent_table(_dim_study(0.8))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    got = {(r[1], r[2]): r for r in rows if r[3] == "p ≥ n·d"}
    assert set(got) == {("lip_upper", "d"), ("lip_upper", "d_eff"), ("lip_lower", "d"), ("lip_lower", "d_eff")}
    for y in ("lip_upper", "lip_lower"):
        c_d = float(re.match(r"(-?[\d.]+)", got[(y, "d")][6]).group(1))
        c_eff = float(re.match(r"(-?[\d.]+)", got[(y, "d_eff")][6]).group(1))
        a_eff = float(re.match(r"(-?[\d.]+)", got[(y, "d_eff")][4]).group(1))
        assert c_eff == pytest.approx(0.8, abs=0.005) and c_d == pytest.approx(0.4, abs=0.005)
        assert a_eff == pytest.approx(-0.5, abs=0.005)


def test_a_row_that_does_not_interpolate_is_flagged_where_it_is_shown():
    rows = fixture_rows()
    flags = {(r["model"], r["width"], r["seed"], r["threat"]): reports.row_flags(r) for r in rows
             if r.get("status") == "ok"}
    for (model, width, _, _), f in flags.items():
        assert ("not-interpolating" in f) == (width <= 8), (model, width, f)  # the fixture: interpolates iff > 8
    md = _md(rows)
    marked = [line for line in md.splitlines() if line.startswith("|") and "not-interpolating" in line]
    # every table that shows the entry (leaderboard: width column; ranking: the label) marks it, and no other
    width8 = re.compile(r"(-w[48] |\| [48] \|)")
    assert marked and all(width8.search(line) for line in marked), marked[:3]
    unmarked = [line for line in md.splitlines() if line.startswith("|") and width8.search(line)
                and "not-interpolating" not in line]
    assert not unmarked, unmarked[:3]
    flipped = copy.deepcopy(rows)
    for r in flipped:
        r["interpolates"] = True
    assert "not-interpolating" not in _md(flipped)


def test_plot_titles_fit_inside_the_image():
    """A view's title names its dataset, threat and suite; wider than the axes it would be cut at both edges of the
    image (as it was): every title is wrapped to lie inside the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from lawbench.reports.plots import PLOTTERS
    rng = np.random.default_rng(5)
    rows = [make_row("mlp", "mlp", w, mlp_params(w), 0, "Linf", rng) for w in (32, 128, 512)]
    for r in rows:
        r["suite"] = ["pgd", "fast", "autoattack-plus", "ta-square"]  # a long suite label in the view's title
    for name, plot in PLOTTERS.items():
        fig = plot(reports.build_views(rows))
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        width = fig.bbox.width
        for ax in fig.axes:
            t = ax.title
            if t.get_text():
                box = t.get_window_extent(canvas.get_renderer())
                assert box.x0 >= -1 and box.x1 <= width + 1, (name, t.get_text())


def _capacity_rows(slopes: dict, seeds=(0, 1, 2, 3)) -> list[dict]:
    """Rows of recipes whose robust accuracy at every eps is base + slope·log2 p (points of %) plus a seed's
    offset: a known trend per recipe."""
    rng = np.random.default_rng(7)
    rows = []
    for recipe, (base, slope) in slopes.items():
        for width in (32, 64, 128, 256):
            for seed in seeds:
                r = make_row("mlp", "mlp", width, mlp_params(width), seed, "L2", rng)
                acc = (base + slope * math.log2(r["params"]) + (seed - 1.5)) / 100
                r.update(recipe=recipe, cell_id=f"{recipe}-{width}-{seed}", interpolates=True, train_margin=1.0,
                         lip_upper_unit_margin=5.0 + seed, lip_lower_unit_margin=4.0 + seed,
                         robust_acc={k: acc for k in r["robust_acc"]})
                rows.append(r)
    return rows


def test_the_capacity_section_says_which_recipe_rises_with_p_and_where_recipes_part():
    """Robust accuracy rising 3 points per doubling of p is read as rising, an exactly constant one as flat, not
    rising (a zero-width interval is no evidence of a trend), a falling one as falling; recipes 30 points apart are
    reported apart at every width, with the means the table shows."""
    rows = _capacity_rows({"erm": (10.0, 3.0), "pgd-at": (90.0, 0.0), "smooth": (60.0, -2.0)})
    section = "\n".join(markdown.capacity_section(rows))
    assert "## Robust accuracy and Lipschitz constants against p/(n·d)" in section
    eps = sorted({e for r in rows for e in row_eps(r)})
    for e in eps:
        tag = fmt_eps(e)
        assert f"erm at eps {tag}: robust accuracy rises with p/(n·d) (+3.00" in section
        assert f"pgd-at at eps {tag}: robust accuracy flat within the seed spread (+0.00" in section
        assert f"smooth at eps {tag}: robust accuracy falls with p/(n·d) (-2.00" in section
        assert f"At eps {tag} recipes differ by more than their seed spread at 4 point(s)" in section
    # the table: one line per recipe and width, the Lipschitz bound at margin 1 as mean ± interval over 4 seeds
    table = [line for line in section.splitlines() if line.startswith("| smooth")]
    assert len(table) == 4 and all("5.5 ± 2.1" in line or "5.5 ± 2.05" in line for line in table), table


def test_rows_that_differ_in_more_than_the_seed_are_never_averaged_together():
    """The same cell attacked by the original and by our AutoAttack engine (two seeds, robust 4% and 1%): two entries,
    each with its own mean and no interval, labelled by the setting that sets them apart, not one entry reading
    2.50 ± 19.06 as if the engines were seeds. Rows of one setting over two seeds still form one entry."""
    rng = np.random.default_rng(5)
    rows = []
    for seed, impl, acc in ((0, "original", 0.04), (1, "native", 0.01), (2, "native", 0.03)):
        r = make_row("mlp", "mlp", 128, mlp_params(128), seed, "Linf", rng)
        cell = {"width": 128, "seed": seed, "lr": 0.01}
        if impl == "native":
            cell["autoattack_impl"] = "native"
        r.update(cell=cell, cell_id=f"c{seed}", robust_acc={k: acc for k in r["robust_acc"]}, autoattack_impl=impl)
        rows.append(r)
    (view,) = reports.build_views(rows)
    by_label = {e.label: e for e in view.entries}
    # the original's cell has no key (ids as before): its label reads the engine the row records
    assert set(by_label) == {"mlp-w128 · autoattack_impl=original", "mlp-w128 · autoattack_impl=native"}
    assert by_label["mlp-w128 · autoattack_impl=original"].robust.mean == pytest.approx(0.04)
    assert by_label["mlp-w128 · autoattack_impl=native"].robust.mean == pytest.approx(0.02)
    assert sorted(by_label["mlp-w128 · autoattack_impl=native"].seeds) == ["1", "2"]
    assert "autoattack_impl=native" in _md(rows)
