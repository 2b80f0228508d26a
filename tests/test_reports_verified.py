"""Every report marks a robust accuracy no AutoAttack-grade attack verified (†) and a row whose attacks may have been
fooled (⚠, red cross in plots): in the Markdown ranking and leaderboard, the console table, the CSV and the plots."""
import csv
import io

import numpy as np

from lawbench.reports import build_views, console_table
from lawbench.reports.formats import FLAGGED_MARK, UNVERIFIED_MARK
from lawbench.reports.values import verified_at
from lawbench.reports.csvexport import render_csv
from lawbench.reports.markdown import render_markdown
from lawbench.reports.plots import FLAGGED, UNVERIFIED, plot_accuracy_by_family, plot_robust_vs_ratio
from test_reports import key, make_row, md_tables


def _rows():
    """Three MLP widths on Linf: w16 verified everywhere, w64 verified only at the headline eps 0.1 (PGD alone
    elsewhere), w256 unverified at the headline too and randomized."""
    rng = np.random.default_rng(7)
    rows = [make_row("mlp", "mlp", w, p, 0, "Linf", rng) for w, p in ((16, 12730), (64, 50890), (256, 203530))]
    eps = rows[0]["eps"]
    rows[0]["verified"] = {key(e): True for e in eps}
    rows[1]["verified"] = {key(e): e == 0.1 for e in eps}
    rows[2]["verified"] = {key(e): False for e in eps}
    rows[2]["autoattack_acc"] = {key(e): None for e in eps}
    rows[2]["flags"] = ["randomized", "unverified"]
    for r in rows:
        assert all(r["robust_acc"][key(e)] > 0 for e in eps)  # a 0 would be verified whatever ran
    return rows


def test_verified_at_reads_the_map_and_falls_back_for_older_rows():
    rows = _rows()
    assert verified_at(rows[0], 0.05) and not verified_at(rows[1], 0.05) and verified_at(rows[1], 0.1)
    old = {k: v for k, v in rows[1].items() if k != "verified"}  # an older row: verified where AutoAttack ran
    assert [verified_at(old, e) for e in old["eps"]] == [old["autoattack_acc"][key(e)] is not None for e in old["eps"]]
    old["robust_acc"] = {key(e): 0.0 for e in old["eps"]}  # nothing left standing: nothing to verify
    assert all(verified_at(old, e) for e in old["eps"])


def test_markdown_and_console_mark_unverified_and_flagged_rows():
    rows = _rows()
    md = render_markdown(rows, build_views(rows))
    tables = md_tables(md)
    title = "mnist5k · Linf"
    board = {r["model"]: r for r in tables[(title, "Leaderboard")]}
    assert not board["mlp-w16"]["robust %"].endswith(UNVERIFIED_MARK)
    assert not board["mlp-w64"]["robust %"].endswith(UNVERIFIED_MARK)  # verified at its headline eps
    flagged = f"mlp-w256 {FLAGGED_MARK}"
    assert board[flagged]["robust %"].endswith(UNVERIFIED_MARK) and "randomized" in board[flagged]["flags"]
    ranking = [r["Model"] for r in tables[(title, "Ranking")]]
    assert flagged in ranking and "mlp-w16" in ranking
    assert f"{UNVERIFIED_MARK} unverified" in md
    from rich.console import Console
    con = Console(width=250, record=True)
    con.print(console_table(rows))
    lines = con.export_text().splitlines()
    (w256,) = [ln for ln in lines if " 256 " in ln]
    (w64,) = [ln for ln in lines if " 64 " in ln]
    robust = lambda line: [c.strip() for c in line.split("│")][6].split(" / ")  # noqa: E731 (each eps, in order)
    assert all(v.endswith(UNVERIFIED_MARK) for v in robust(w256)) and "randomized" in w256
    assert [v.endswith(UNVERIFIED_MARK) for v in robust(w64)] == [e != 0.1 for e in rows[1]["eps"]]
    assert any("unverified: only PGD" in ln for ln in lines)


def test_csv_has_verified_per_eps():
    rows = _rows()
    got = list(csv.DictReader(io.StringIO(render_csv(rows))))
    assert [r["verified@0.05"] for r in got] == ["true", "false", "false"]
    assert [r["verified@0.1"] for r in got] == ["true", "true", "false"]


def _marks(fig, kind):
    """How many points the figure marks as `kind` (UNVERIFIED or FLAGGED), over all its axes."""
    return sum(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines() if line.get_gid() == kind)


def test_plots_mark_unverified_points_and_flagged_rows():
    rows = _rows()
    n_eps = len(rows[0]["eps"])
    fig = plot_robust_vs_ratio(build_views(rows))
    # one hollow square per unverified (entry, eps): w64 at every eps but 0.1, w256 at every eps; w256 crossed
    assert _marks(fig, UNVERIFIED) == (n_eps - 1) + n_eps
    assert _marks(fig, FLAGGED) == n_eps
    assert UNVERIFIED in fig.axes[0].get_legend_handles_labels()[1]
    fig = plot_accuracy_by_family(build_views(rows))
    assert _marks(fig, UNVERIFIED) == 1 and _marks(fig, FLAGGED) == 1  # w256's headline robust point
