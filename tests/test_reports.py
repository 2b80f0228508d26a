"""Reports from a stored results file: Markdown and CSV numbers checked against the rows, ranking order, plots,
console table, statistics. The HTML page in a real browser is tested in test_reports_html.py."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats  # an independent Student t for the expected intervals (declared in the test extra)

from lawbench import reports
from lawbench.reports.rows import read_rows, read_rows_file
from lawbench.reports.schema import REQUIRED_KEYS
from lawbench.reports.formats import UNVERIFIED_MARK

D, N_TRAIN, N_TEST, NOISE, CLASSES = 784, 1000, 200, 0.2, 10
THREAT_EPS = {"Linf": [0.05, 0.1, 0.2, 0.3], "L2": [0.5, 1.0, 1.5, 2.0]}
THREAT_AA = {"Linf": [0.1], "L2": [1.0]}
ERROR = 'RuntimeError: out of memory | <b>bold</b> & "quoted" \'x\''


def mlp_params(w):
    return (D + 1) * w + (w + 1) * CLASSES


def cnn_params(w):
    return (9 + 1) * w + (w * 196 + 1) * CLASSES


CONFIGS = [("mlp", "mlp", w, mlp_params(w), (0, 1, 2)) for w in (8, 32, 128, 512)] + \
          [("cnn", "small_cnn", w, cnn_params(w), (0, 1)) for w in (4, 16)]


def key(e):
    return str(float(e))  # the runner's eps_key


def make_row(family, model, width, params, seed, threat, rng, *, autoattack=True, lip_upper=True):
    eps = THREAT_EPS[threat]
    d_eff = 11.0 + 0.1 * seed
    ratio = params / (N_TRAIN * D)
    clean = float(min(1.0, 0.80 + 0.04 * math.log10(params / 5000 + 1) + rng.uniform(0, 0.05)))
    pgd, aa, rob, cert = {}, {}, {}, {}
    level = clean
    for i, e in enumerate(eps):
        level = level * float(rng.uniform(0.55, 0.9)) * min(1.0, 0.5 + ratio)
        p = round(level, 4)
        aa_v = round(p - float(rng.uniform(0, 0.03)), 4) if (autoattack and e in THREAT_AA[threat]) else None
        r = min(p, aa_v) if aa_v is not None else p
        pgd[key(e)], aa[key(e)], rob[key(e)] = p, aa_v, r
        cert[key(e)] = round(r * float(rng.uniform(0.0, 0.6)), 4)
    law = math.sqrt(N_TRAIN * D / params)
    # width 8 does not fit its training labels (interpolates false below): smoother than the law allows an interpolator
    lip_lower = (0.3 if width == 8 else 0.8) * law * float(np.exp(rng.normal(0, 0.1)))
    row = {
        "cell_id": f"{model}-{width}-{seed}-{threat}", "bench_version": "0.1.0", "status": "ok", "error": None,
        "dataset": "mnist5k", "n_train": N_TRAIN, "n_test": N_TEST, "d": D, "d_eff": d_eff, "label_noise": NOISE,
        "num_classes": CLASSES, "model": model, "family": family, "width": width, "params": params, "recipe": "erm",
        "train_eps": None, "seed": seed, "device": "cpu", "train_acc": 1.0 if width > 8 else 0.97,
        "interpolates": width > 8, "clean_acc": clean, "threat": threat,
        "eps": eps, "pgd_acc": pgd, "autoattack_acc": aa, "robust_acc": rob, "cert_acc": cert,
        "lip_upper": lip_lower * float(rng.uniform(3, 30)) if lip_upper else None, "lip_lower": lip_lower,
        "ratio": ratio, "ratio_eff": params / (N_TRAIN * d_eff), "law_scale": law,
        "aa_flags": ["aa-subset"] if (width == 8 and threat == "Linf") else [],
        "timings": {"train": 1.5, "attacks": 2.25}, "cell": {"seed": seed},
    }
    return row


def fixture_rows() -> list[dict]:
    rng = np.random.default_rng(1234)
    rows = []
    for threat in ("Linf", "L2"):
        for family, model, width, params, seeds in CONFIGS:
            for seed in seeds:
                rows.append(make_row(family, model, width, params, seed, threat, rng,
                                     autoattack=not (threat == "L2" and model == "small_cnn"),
                                     lip_upper=not (model == "mlp" and width == 32)))
    failed = {k: None for k in REQUIRED_KEYS}
    failed.update(cell_id="failed-cell", bench_version="0.1.0", status="failed", error=ERROR, dataset="mnist5k",
                  label_noise=NOISE, model="mlp", width=2048, recipe="erm", seed=0, threat="Linf",
                  eps=THREAT_EPS["Linf"], aa_flags=[], timings={"total": 0.5})
    rows.insert(5, failed)
    return rows


def write_results(out_dir: Path) -> tuple[Path, list[dict]]:
    """results.jsonl with the fixture rows and a torn last line (a run killed mid-write)."""
    rows = fixture_rows()
    for r in rows:
        assert set(REQUIRED_KEYS) <= set(r)
    path = Path(out_dir) / "results.jsonl"
    torn = json.dumps(make_row("mlp", "mlp", 999, mlp_params(999), 0, "Linf", np.random.default_rng(0)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn[: len(torn) // 2])
    return path, rows


def expected_headline(row):
    aa = [float(k) for k, v in (row["autoattack_acc"] or {}).items() if v is not None]
    return max(aa) if aa else max(row["eps"])


def mean_ci(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None
    n = len(values)
    return float(np.mean(values)), float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def expected_entries(rows):
    """{(threat, label): dict of expected aggregates} computed straight from the rows."""
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[(r["threat"], f"{r['model']}-w{r['width']}")].append(r)
    out = {}
    for k, rs in groups.items():
        h = expected_headline(rs[0])
        assert all(expected_headline(r) == h for r in rs)
        at = lambda name: mean_ci([r[name][key(h)] for r in rs])  # noqa: E731
        out[k] = dict(rows=rs, eps=h, params=rs[0]["params"], ratio=rs[0]["ratio"],
                      ratio_eff=float(np.mean([r["ratio_eff"] for r in rs])),
                      clean=mean_ci([r["clean_acc"] for r in rs]),
                      pgd=at("pgd_acc"), aa=at("autoattack_acc") if rs[0]["autoattack_acc"][key(h)] is not None
                      else (None, None), robust=at("robust_acc"), cert=at("cert_acc"),
                      lip_upper=mean_ci([r["lip_upper"] for r in rs]), lip_lower=mean_ci([r["lip_lower"] for r in rs]),
                      law_scale=rs[0]["law_scale"], family=rs[0]["family"])
    return out


# ------------------------------------------------------------------------------------------------ markdown parsing

def split_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [re.sub(r"\\([<&|])", r"\1", c.strip()) for c in cells]


def md_tables(md: str) -> dict:
    """{(view heading, sub heading): [ {header: cell} ]} for every GitHub table in the document."""
    tables, h2, h3, cur = {}, None, None, None
    for line in md.splitlines():
        if line.startswith("## "):
            h2, h3, cur = line[3:].strip(), None, None
        elif line.startswith("### "):
            h3, cur = line[4:].strip(), None
        elif line.startswith("|"):
            cells = split_cells(line)
            if cur is None:
                cur = {"header": cells, "rows": []}
                tables[(h2, h3)] = cur
            elif set("".join(cells)) <= set("-: "):
                continue
            else:
                cur["rows"].append(dict(zip(cur["header"], cells)))
        else:
            cur = None
    return {k: v["rows"] for k, v in tables.items()}


def parse_pm(cell: str):
    """'12.34 ± 0.56' -> (12.34, 0.56); '12.34' -> (12.34, None); '–' -> (None, None)."""
    if cell == "–":
        return None, None
    if "±" in cell:
        a, b = cell.split("±")
        return float(a), float(b)
    return float(cell), None


def assert_pct(cell, expected, what):
    mean, ci = parse_pm(cell)
    if expected[0] is None:
        assert mean is None, what
        return
    assert mean == pytest.approx(100 * expected[0], abs=0.0051), what
    if expected[1] is None:
        assert ci is None, what
    else:
        assert ci == pytest.approx(100 * expected[1], abs=0.0051), what


def assert_sig(cell, expected, what, rel=6e-4):
    mean, ci = parse_pm(cell)
    if expected[0] is None:
        assert mean is None, what
        return
    assert mean == pytest.approx(expected[0], rel=rel), what
    if expected[1] is None:
        assert ci is None, what
    else:
        assert ci == pytest.approx(expected[1], rel=0.06), what


# ------------------------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    path, rows = write_results(out)
    files = reports.render(path, out)
    return out, path, rows, files


def test_render_writes_every_format_atomically(rendered):
    out, path, rows, files = rendered
    report = out / "report"
    names = sorted(p.name for p in files)
    assert names == sorted(["leaderboard.md", "leaderboard.html", "results.csv"]
                           + [f"{n}.{e}" for n in ("robust_vs_ratio", "lipschitz_vs_ratio", "accuracy_by_family",
                                                   "frontier") for e in ("png", "svg")])
    assert all(p.parent == report and p.stat().st_size > 0 for p in files)
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temp file left behind
    # the torn last line is skipped, the failed row kept
    assert len(read_rows(path)) == len(rows)


def test_report_files_are_renamed_into_place(tmp_path, monkeypatch):
    """Every report file is written to a temporary file beside it and renamed over the old one: a failure before the
    rename (disk full, a killed process) leaves the previous report whole and no temporary file behind."""
    path, rows = write_results(tmp_path)
    real_replace = os.replace
    moves = []

    def spy(src, dst, *args, **kwargs):
        moves.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    files = reports.render(path, tmp_path, formats=("md", "html", "csv"))
    assert sorted(dst for _, dst in moves) == sorted(files) and len(files) == 3
    assert all(src.parent == dst.parent and src.name.startswith(".") and src != dst for src, dst in moves)
    before = {p.name: p.read_bytes() for p in files}

    def full_disk(src, dst, *args, **kwargs):
        if Path(dst).name == "leaderboard.html":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))  # a different store: a different report
    with pytest.raises(OSError, match="No space left"):
        reports.render(path, tmp_path, formats=("md", "html", "csv"))
    report = tmp_path / "report"
    assert (report / "leaderboard.html").read_bytes() == before["leaderboard.html"]  # the old page, whole
    assert (report / "leaderboard.md").read_bytes() != before["leaderboard.md"]  # written before the failure
    assert sorted(p.name for p in report.iterdir()) == sorted(before)  # no temporary file left


def test_markdown_leaderboard_numbers_match_rows(rendered):
    out, _, rows, _ = rendered
    md = (out / "report" / "leaderboard.md").read_text()
    tables = md_tables(md)
    expected = expected_entries(rows)
    for threat in ("Linf", "L2"):
        board = tables[(f"mnist5k · {threat}", "Leaderboard")]
        exp = {lbl: v for (t, lbl), v in expected.items() if t == threat}
        assert sorted(r["model"] for r in board) == sorted(exp)
        # grouped by family, sorted by p inside a family
        fams = [r["family"] for r in board]
        assert fams == sorted(fams, key=lambda f: fams.index(f))
        for fam in set(fams):
            ps = [int(r["p"]) for r in board if r["family"] == fam]
            assert ps == sorted(ps)
        for r in board:
            e = exp[r["model"]]
            what = f"{threat} {r['model']}"
            assert int(r["p"]) == e["params"]
            assert r["seeds"] == str(len(e["rows"]))
            assert float(r["p/(n·d)"]) == pytest.approx(e["ratio"], rel=5e-3)
            assert float(r["p/(n·d_eff)"]) == pytest.approx(e["ratio_eff"], rel=5e-3)
            assert float(r["eps"]) == e["eps"]
            assert_pct(r["clean %"], e["clean"], what + " clean")
            assert_pct(r["PGD %"], e["pgd"], what + " pgd")
            assert_pct(r["AutoAttack %"], e["aa"], what + " aa")
            # rows without a `verified` map (an older lawbench) are verified where AutoAttack ran or nothing is left
            unverified = e["aa"][0] is None and any(x["robust_acc"][key(e["eps"])] != 0 for x in e["rows"])
            assert r["robust %"].endswith(UNVERIFIED_MARK) == unverified, what
            assert_pct(r["robust %"].removesuffix(UNVERIFIED_MARK), e["robust"], what + " robust")
            assert_pct(r["certified %"], e["cert"], what + " cert")
            assert_sig(r["lip_upper"], e["lip_upper"], what + " lip_upper")
            assert_sig(r["lip_lower"], e["lip_lower"], what + " lip_lower")
            assert_sig(r["law_scale"], (e["law_scale"], None), what + " law")
            if r["model"] == "mlp-w8" and threat == "Linf":
                assert "aa-subset" in r["flags"]
    # the L2 CNN rows ran no AutoAttack: headline falls back to the largest eps and the AA cell is missing
    l2 = {r["model"]: r for r in tables[("mnist5k · L2", "Leaderboard")]}
    assert l2["small_cnn-w4"]["eps"] == "2" and l2["small_cnn-w4"]["AutoAttack %"] == "–"
    assert l2["mlp-w8"]["eps"] == "1"
    # a null lip_upper renders as a dash
    assert l2["mlp-w32"]["lip_upper"] == "–"


def test_markdown_ranking_order(rendered):
    out, _, rows, _ = rendered
    tables = md_tables((out / "report" / "leaderboard.md").read_text())
    expected = expected_entries(rows)
    for threat in ("Linf", "L2"):
        rank = tables[(f"mnist5k · {threat}", "Ranking")]
        exp = {lbl: v for (t, lbl), v in expected.items() if t == threat}
        order = sorted(exp, key=lambda lbl: (-exp[lbl]["robust"][0], -exp[lbl]["clean"][0]))
        assert [r["Model"] for r in rank] == order
        assert [r["Rank"] for r in rank] == [str(i) for i in range(1, len(order) + 1)]
        assert list(rank[0]) == ["Rank", "Model", "Family", "p", "p/(n·d)", "eps", "Clean %", "AutoAttack %",
                                 "Robust %", "Certified %", "Radius cert / atk", "flags"]
        robust = [parse_pm(r["Robust %"].removesuffix(UNVERIFIED_MARK))[0] for r in rank]
        assert robust == sorted(robust, reverse=True)
        for r in rank:
            assert_pct(r["Clean %"], exp[r["Model"]]["clean"], r["Model"])
            assert r["Family"] == exp[r["Model"]]["family"]


def test_markdown_failed_rows_slopes_and_plots(rendered):
    out, _, rows, _ = rendered
    md = (out / "report" / "leaderboard.md").read_text()
    tables = md_tables(md)
    failed = tables[("Failed rows", None)]
    assert len(failed) == 1 and failed[0]["cell_id"] == "failed-cell"
    assert failed[0]["error"] == ERROR  # escaped for Markdown, unescaped by the parser
    assert not re.search(r"(?<!\\)<[a-z/]", md)  # no tag a renderer would swallow ...
    assert not re.search(r"&[a-z]+;", md)  # ... and no HTML entity a reader of the plain text would have to decode
    slopes = tables[("mnist5k · Linf", "Log-log slope of the Lipschitz bounds against p/(n·d)")]
    linf = [r for r in rows if r["threat"] == "Linf" and r["status"] == "ok"]
    fam, recipe = linf[0]["family"], linf[0]["recipe"]
    (first,) = [s for s in slopes if (s["bound"], s["scope"]) == ("lip_lower", f"{fam} · {recipe}")]
    # one slope per family and recipe: never a fit across recipes (ERM and the smooth interpolator apart)
    scopes = {(r["family"], r["recipe"]) for r in linf}
    assert len(slopes) == 2 * len(scopes) and len({s["scope"] for s in slopes}) == len(scopes)
    res = reports.loglog_slope([r for r in linf if (r["family"], r["recipe"]) == (fam, recipe)], y="lip_lower")
    assert float(first["slope"]) == pytest.approx(res["slope"], abs=5e-4)
    lo, hi = (float(x) for x in first["95% CI"].strip("[]").split(","))
    assert (lo, hi) == (pytest.approx(res["ci_low"], abs=5e-4), pytest.approx(res["ci_high"], abs=5e-4))
    assert first["seeds"] == "3"
    for name in ("robust_vs_ratio", "lipschitz_vs_ratio", "accuracy_by_family"):
        assert f"]({name}.png)" in md


def test_csv_matches_rows(rendered):
    out, _, rows, _ = rendered
    text = (out / "report" / "results.csv").read_text()
    got = list(csv.DictReader(io.StringIO(text)))
    assert [g["cell_id"] for g in got] == [r["cell_id"] for r in rows]
    by_id = {r["cell_id"]: r for r in rows}
    for g in got:
        r = by_id[g["cell_id"]]
        assert g["status"] == r["status"]
        if r["status"] != "ok":
            assert g["error"] == ERROR and g["clean_acc"] == "" and g["pgd_acc@0.1"] == ""
            continue
        assert int(g["params"]) == r["params"] and int(g["width"]) == r["width"] and int(g["seed"]) == r["seed"]
        assert float(g["clean_acc"]) == r["clean_acc"] and float(g["lip_lower"]) == r["lip_lower"]
        assert float(g["ratio"]) == r["ratio"] and float(g["law_scale"]) == r["law_scale"]
        assert float(g["headline_eps"]) == expected_headline(r)
        assert (g["lip_upper"] == "") == (r["lip_upper"] is None)
        for e in THREAT_EPS["Linf"] + THREAT_EPS["L2"]:
            for m in ("pgd_acc", "autoattack_acc", "robust_acc", "cert_acc"):
                v = r[m].get(key(e))
                assert g[f"{m}@{e!r}"] == ("" if v is None else repr(v)), (m, e)
        assert g["aa_flags"] == ";".join(r["aa_flags"])
        assert float(g["time_train"]) == r["timings"]["train"]


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_valid_png_and_svg(rendered):
    out, _, _, _ = rendered
    from PIL import Image  # a matplotlib dependency
    for name in ("robust_vs_ratio", "lipschitz_vs_ratio", "accuracy_by_family"):
        png = out / "report" / f"{name}.png"
        w, h = _png_size(png.read_bytes())
        assert w > 300 and h > 200
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            px = np.asarray(im.convert("L"), dtype=float)
        assert px.std() > 5  # not a blank canvas
        root = ET.parse(out / "report" / f"{name}.svg").getroot()
        assert root.tag.endswith("svg")
        svg_text = (out / "report" / f"{name}.svg").read_text()
        assert "p / (n·d)" in svg_text and "mnist5k · Linf" in svg_text and "mnist5k · L2" in svg_text


def series(ax, label):
    """The data line of the errorbar series called `label`."""
    found = [c for c in ax.containers if c.get_label() == label]
    assert len(found) == 1, [c.get_label() for c in ax.containers]
    return found[0].lines[0]


def test_plot_contents(rendered):
    _, _, rows, _ = rendered
    from lawbench.reports.plots import plot_accuracy_by_family, plot_lipschitz, plot_robust_vs_ratio
    views = reports.build_views(rows)
    expected = expected_entries(rows)

    fig = plot_lipschitz(views)
    for ax, view in zip(fig.axes, views):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        vr = [r for r in rows if r["status"] == "ok" and r["threat"] == view.key[1]]
        # the law's scale is a lower envelope: C·sqrt(n·d/p) under every interpolating row, touching one of them;
        # rows that do not interpolate (width 8 here) are outside the law's premise and may lie below it
        fits = [r for r in vr if r["interpolates"]]
        assert 0 < len(fits) < len(vr)
        law = [ln for ln in ax.get_lines() if ln.get_label().endswith("·sqrt(n·d/p)")]
        assert len(law) == 1 and f"({len(fits)} of {len(vr)})" in law[0].get_label()
        x, y = law[0].get_data()
        c = float(y[0] * np.sqrt(x[0]))
        assert np.allclose(y, c / np.sqrt(np.asarray(x)), rtol=1e-9)
        scale = [math.sqrt(r["n_train"] * r["d"] / r["params"]) for r in fits]
        assert all(r["lip_lower"] >= c * s * (1 - 1e-12) for r, s in zip(fits, scale))
        assert min(r["lip_lower"] / s for r, s in zip(fits, scale)) == pytest.approx(c, rel=1e-12)
        assert any(r["lip_lower"] < c * math.sqrt(r["n_train"] * r["d"] / r["params"]) for r in vr
                   if not r["interpolates"]), "the fixture should show a non-interpolating row under the line"
        # and those points are marked: hollow rings at exactly the non-interpolating entries (mlp width 8 here)
        from lawbench.reports.plots import NOT_INTERPOLATING
        rings = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
        assert sum(ln.get_label() == NOT_INTERPOLATING for ln in rings) == 1
        ringed = sorted(float(x) for ln in rings for x in ln.get_xdata())
        outside = sorted({v["ratio"] for (t, lbl), v in expected.items() if t == view.key[1]
                          and any(not r["interpolates"] for r in v["rows"])})
        assert np.allclose(ringed, sorted(outside * 2))  # one ring on lip_upper, one on lip_lower
        assert any(ln.get_xdata()[0] == 1.0 and ln.get_label() == "p = n·d" for ln in ax.get_lines())
        lower = series(ax, "mlp lip_lower")
        exp = sorted((v["ratio"], v["lip_lower"][0]) for (t, lbl), v in expected.items()
                     if t == view.key[1] and v["family"] == "mlp")
        assert np.allclose(lower.get_xdata(), [p[0] for p in exp]) and np.allclose(lower.get_ydata(),
                                                                                    [p[1] for p in exp])

    fig = plot_robust_vs_ratio(views)
    ax = fig.axes[[v.key[1] for v in views].index("Linf")]
    assert ax.get_xscale() == "log"
    line = series(ax, "mlp eps=0.3")
    exp = sorted((v["ratio"], 100 * mean_ci([r["robust_acc"]["0.3"] for r in v["rows"]])[0])
                 for (t, lbl), v in expected.items() if t == "Linf" and v["family"] == "mlp")
    assert np.allclose(line.get_ydata(), [p[1] for p in exp])

    fig = plot_accuracy_by_family(views)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 4 and any("L2 · cnn" in t for t in titles)


def test_headline_eps():
    row = {"eps": [0.1, 0.3], "autoattack_acc": {"0.1": 0.5, "0.3": None}, "pgd_acc": {"0.1": 0.6, "0.3": 0.2}}
    assert reports.headline_eps(row) == 0.1
    row["autoattack_acc"] = {"0.1": None, "0.3": None}
    assert reports.headline_eps(row) == 0.3
    assert reports.headline_eps({"eps": None, "autoattack_acc": None}) is None


def test_loglog_slope_against_independent_fits():
    rng = np.random.default_rng(7)
    ratios = [0.01, 0.05, 0.2, 1.0, 4.0]
    rows = [{"status": "ok", "seed": s, "ratio": x, "lip_lower": 3.0 * x ** -0.45 * math.exp(rng.normal(0, 0.05)),
             "lip_upper": 50.0 * x ** -0.2, "interpolates": True} for s in range(3) for x in ratios]
    # a model that does not fit its labels is outside the law: counted, never fitted
    outside = {"status": "ok", "seed": 0, "ratio": 0.02, "lip_lower": 1e-3, "lip_upper": 1.0, "interpolates": False}
    res = reports.loglog_slope(rows + [outside])
    assert res["n_excluded"] == 1
    assert reports.loglog_slope(rows + [outside], interpolating_only=False)["n_points"] == 16
    per_seed = [np.polyfit(np.log([r["ratio"] for r in rows if r["seed"] == s]),
                           np.log([r["lip_lower"] for r in rows if r["seed"] == s]), 1)[0] for s in range(3)]
    m, half = mean_ci(per_seed)
    assert res["slope"] == pytest.approx(m) and res["n_seeds"] == 3 and res["n_points"] == 15
    assert (res["ci_low"], res["ci_high"]) == (pytest.approx(m - half), pytest.approx(m + half))
    assert res["ci_low"] < -0.45 < res["ci_high"]
    one = reports.loglog_slope([r for r in rows if r["seed"] == 0])
    lr = stats.linregress(np.log(ratios), np.log([r["lip_lower"] for r in rows if r["seed"] == 0]))
    half = stats.t.ppf(0.975, len(ratios) - 2) * lr.stderr
    assert one["slope"] == pytest.approx(lr.slope) and one["n_seeds"] == 1 and one["method"] == "regression"
    assert (one["ci_low"], one["ci_high"]) == (pytest.approx(lr.slope - half), pytest.approx(lr.slope + half))
    none = reports.loglog_slope([rows[0], {"status": "failed", "seed": 0, "ratio": 2.0, "lip_lower": 1.0}])
    assert none["slope"] is None and none["n_seeds"] == 0


def test_t_quantile_matches_scipy():
    for df in (1, 2, 3, 7, 30, 200):
        assert reports.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


def test_console_table(rendered):
    from rich.console import Console
    _, path, rows, _ = rendered
    table = reports.console_table(read_rows(path), title="results")
    con = Console(record=True, width=400, color_system=None)
    con.print(table)
    out = con.export_text()
    assert ERROR.split("|")[0].strip() in out and "failed" in out
    lines = out.splitlines()
    heads = [i for i, ln in enumerate(lines) if "mnist5k · " in ln]
    assert [lines[i].split("│")[1].strip() for i in heads] == ["mnist5k · L2 · cnn", "mnist5k · L2 · mlp",
                                                               "mnist5k · Linf · cnn", "mnist5k · Linf · mlp"]
    # inside a group, rows are sorted by p (the p column is the 4th after model, width, seed)
    blk = lines[heads[3] + 1:]
    ps = []
    for ln in blk:
        cells = [c.strip() for c in ln.split("│")]
        if len(cells) > 5 and cells[1].startswith("mlp"):
            ps.append(cells[4])
    assert len(ps) == 13 and ps[-1] == "–"  # 4 widths × 3 seeds, then the failed row (no p) in its family
    assert [int(p) for p in ps[:-1]] == sorted(int(p) for p in ps[:-1])
    # the row's values: accuracies in % (robust at every eps, cert at the headline eps), bounds at margin 1 where the
    # row interpolates, raw and marked where not; a flag every row carries is said once, under the table
    r = next(r for r in rows if r["cell_id"] == "mlp-128-1-Linf")
    cells = next(c for c in ([x.strip() for x in ln.split("│")] for ln in blk) if c[1:4] == ["mlp", "128", "1"])
    # model, width, seed, p, p/(n·d), clean, robust at each eps, cert, radii, lip_upper m=1, lip_lower m=1, law_scale,
    # flags
    assert cells[4:7] == [str(r["params"]), f"{r['ratio']:.3g}", f"{100 * r['clean_acc']:.1f}"]
    shown = [v.rstrip("†") for v in cells[7].split(" / ")]
    assert [float(v) for v in shown] == [pytest.approx(round(100 * r["robust_acc"][k], 1))
                                         for k in sorted(r["robust_acc"], key=float)]
    assert cells[7].count("†") == sum(not v for v in r["verified"].values()) if "verified" in r else True
    assert float(cells[8]) == pytest.approx(100 * r["cert_acc"]["0.1"], abs=0.051)
    lo = r.get("lip_lower_unit_margin")
    assert cells[9] == "–"  # rows of earlier versions carry no radii
    assert float(cells[11].rstrip("*")) == pytest.approx(lo if lo is not None else r["lip_lower"], rel=1e-3)
    assert cells[11].endswith("*") == (lo is None)
    heading = next(ln for ln in lines if "mnist5k · Linf · mlp" in ln)
    assert "eps 0.05 / 0.1 / 0.2 / 0.3" in heading and "@0.1" in heading


def test_console_table_says_a_shared_flag_once():
    """A flag every row carries goes in one line under the table; flags that differ stay on their rows."""
    from rich.console import Console
    base = {"status": "ok", "dataset": "d", "threat": "Linf", "model": "mlp", "family": "mlp", "eps": [0.1],
            "robust_acc": {"0.1": 0.5}, "verified": {"0.1": True}, "clean_acc": 0.9, "params": 10, "ratio": 0.1}
    rows = [{**base, "width": 1, "flags": ["law-vacuous"]}, {**base, "width": 2, "flags": ["law-vacuous", "odd-one"]}]
    con = Console(record=True, width=300, color_system=None)
    con.print(reports.console_table(rows))
    out = con.export_text()
    assert "every row: law-vacuous" in out and out.count("law-vacuous") == 1
    assert [ln for ln in out.splitlines() if "odd-one" in ln][0].split("│")[2].strip() == "2"


def test_bad_input_and_empty_store(tmp_path):
    with pytest.raises(reports.ReportError, match="no results file"):
        reports.render(tmp_path / "missing.jsonl", tmp_path)
    with pytest.raises(reports.ReportError, match="unknown report format"):
        (tmp_path / "results.jsonl").write_text("")
        reports.render(tmp_path / "results.jsonl", tmp_path, formats=("pdf",))
    files = reports.render(tmp_path, tmp_path)  # a folder holding an empty results.jsonl
    assert len(files) == 11 and "No successful rows." in (tmp_path / "report" / "leaderboard.md").read_text()
    # rows with missing and malformed values: the file's reader leaves them out (reports.schema), and the tables
    # themselves, given them anyway, render them without crashing
    weird = [{"status": "ok", "dataset": "gauss", "threat": "L2", "model": "m", "family": "f", "width": "x",
              "params": None, "eps": "bad", "pgd_acc": {"nan": 1, "0.5": "0.4"}, "robust_acc": [1, 2],
              "lip_lower": float("nan"), "lip_upper": float("inf"), "seed": [1]},
             {"status": "running"}, {"status": "ok"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in weird))
    parsed = read_rows_file(tmp_path / "results.jsonl", strict=False)
    assert parsed.rows == [] and [i for i, _ in parsed.invalid] == [1, 2, 3]
    files = reports.render(tmp_path / "results.jsonl", tmp_path, formats=("md", "csv", "png"))
    assert [p.suffix for p in files] == [".md", ".csv", ".png", ".png", ".png", ".png"]
    assert "No successful rows." in (tmp_path / "report" / "leaderboard.md").read_text()
    from lawbench.reports.csvexport import render_csv
    from lawbench.reports.markdown import render_markdown
    tables = md_tables(render_markdown(weird, reports.build_views(weird)))
    (board,) = tables[("gauss · L2", "Leaderboard")]
    assert (board["model"], board["width"], board["eps"], board["PGD %"]) == ("m-wx", "x", "0.5", "40.00")
    assert (board["lip_upper"], board["lip_lower"], board["p"], board["clean %"]) == ("inf", "–", "–", "–")
    assert [r["status"] for r in tables[("Failed rows", None)]] == ["running"]
    got = list(csv.DictReader(io.StringIO(render_csv(weird))))
    assert [g["status"] for g in got] == ["ok", "running", "ok"]
    assert (got[0]["lip_upper"], got[0]["lip_lower"], got[0]["pgd_acc@0.5"]) == ("inf", "", "0.4")


def test_reports_do_not_import_torch_or_bench():
    import subprocess
    code = ("import sys, reports, reports.rows, reports.plots; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'bench')]; print(bad); sys.exit(bool(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout + res.stderr


def test_views_labels_and_slope_summary():
    rng = np.random.default_rng(3)
    rows = [make_row("mlp", "mlp", w, mlp_params(w), 0, "Linf", rng) for w in (8, 32)]
    for r in rows:
        r["interpolates"] = True
    adv = make_row("mlp", "mlp", 8, mlp_params(8), 0, "Linf", rng)
    adv.update(recipe="pgd-at", train_eps=0.1, cell_id="adv")
    other = make_row("mlp", "mlp", 8, mlp_params(8), 0, "Linf", rng)
    other.update(dataset="MNIST5K", threat="linf", cell_id="clash")  # a different key with the same page id
    views = reports.build_views(rows + [adv, other])
    assert [v.title for v in views] == ["MNIST5K · linf", "mnist5k · Linf"]
    assert len({v.id for v in views}) == 2
    labels = [e.label for e in views[1].entries]
    assert labels == ["mlp-w8 · erm", "mlp-w8 · pgd-at · train_eps=0.1", "mlp-w32 · erm"]
    lines = reports.slope_summary(rows)
    res = reports.loglog_slope(rows)
    assert len(lines) == 1 and lines[0].startswith("mnist5k · Linf: lip_lower")
    assert f"^{res['slope']:.3f}" in lines[0] and "1 seed; 2 of 2 rows interpolate" in lines[0]
    # another recipe is a separate fit, never pooled with the erm widths
    lines = reports.slope_summary(rows + [adv])
    assert len(lines) == 2
    assert lines[0].startswith("mnist5k · Linf · mlp erm noise 0") and f"^{res['slope']:.3f}" in lines[0]
    assert "pgd-at@0.1" in lines[1] and "needs two interpolating widths" in lines[1]
    rows[0]["interpolates"] = False  # outside the law's premise: no longer fitted, and the line says so
    line = reports.slope_summary(rows)[0]
    assert "needs two interpolating widths" in line and "1 of 2 rows interpolate" in line


def test_svg_only_plots_are_linked_and_embedded(tmp_path):
    path, _ = write_results(tmp_path)
    files = reports.render(path, tmp_path, formats=("md", "html", "svg"))
    assert [p.suffix for p in files] == [".md", ".html", ".svg", ".svg", ".svg", ".svg"]
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "](lipschitz_vs_ratio.svg)" in md and ".png" not in md
    html = (tmp_path / "report" / "leaderboard.html").read_text()
    assert html.count("data:image/svg+xml;base64,") == 4


def test_radii_cell_puts_the_certified_radius_beside_the_attacked_one():
    """The median certified radius, then the median attacked radius; a median beyond its search (stored null) reads
    '>' and where the search stopped (twice the largest eps for the certificate, the largest eps for attacks)."""
    from lawbench.reports.console import row_radii
    row = {"eps": [0.05, 0.1], "cert_radius": {"q1": 0.0, "median": 0.0375, "q3": 0.06},
           "attack_radius": {"q1": 0.05, "median": 0.1, "q3": None}}
    assert row_radii(row) == "0.037 / 0.1"
    row["cert_radius"]["median"], row["attack_radius"]["median"] = None, None
    assert row_radii(row) == ">0.2 / >0.1"
    assert row_radii({"eps": [0.1]}) == "–"
