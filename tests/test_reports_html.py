"""The HTML leaderboard in a real browser: headless Chromium loads the page, runs its script (sorting is replayed from
the URL fragment through the column headers' click handler), and we read back the rendered DOM (--dump-dom)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import missing_service
from lawbench import reports
from test_reports import ERROR, expected_entries, write_results


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = find_chromium()
MISSING = ("Chromium not found (looked for `chromium` and `chromium-browser` on PATH and /usr/bin/chromium), so the "
           "HTML leaderboard cannot be checked in a browser here; `make browser` installs Debian's `chromium` "
           "(needs apt-get and root or passwordless sudo), and `make test` runs it first")


@pytest.fixture
def chromium():
    """The browser's path. Without one a developer's run skips, saying why and how to fix it; CI must exercise the
    page, so there a missing browser is a failure."""
    if CHROMIUM is None:
        missing_service(MISSING)
    return CHROMIUM


class Dom(HTMLParser):
    """Just enough of the dumped DOM: <html> and <section> attributes, sortable tables with their header cells and
    rows (cell attributes and text), and the failed-rows error cells with any child elements inside them."""

    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.html_attrs: dict = {}
        self.sections: dict[str, dict] = {}
        self.tables: list[dict] = []
        self.errors: list[dict] = []
        self._section = None
        self._table = None
        self._cell = None
        self._error = None
        self.feed(source)

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        if self._error is not None:
            self._error["children"].append(tag)
        if tag == "html":
            self.html_attrs = a
        elif tag == "section" and "id" in a:
            self._section = a["id"]
            self.sections[a["id"]] = a
        elif tag == "table" and "data-table" in a:
            self._table = {"section": self._section, "attrs": a, "head": [], "rows": []}
            self.tables.append(self._table)
        elif self._table is not None and tag == "tr":
            self._row = []
        elif self._table is not None and tag in ("th", "td"):
            self._cell = {"tag": tag, "attrs": a, "text": ""}
        elif tag == "td" and "error" in a.get("class", ""):
            self._error = {"text": "", "children": []}

    def handle_endtag(self, tag):
        if self._table is not None and tag in ("th", "td") and self._cell is not None:
            (self._table["head"] if self._cell["tag"] == "th" else self._row).append(self._cell)
            self._cell = None
        elif self._table is not None and tag == "tr":
            if self._row:
                self._table["rows"].append(self._row)
        elif tag == "table":
            self._table = None
        elif tag == "td" and self._error is not None:
            self.errors.append(self._error)
            self._error = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._error is not None:
            self._error["text"] += data

    def table(self, section: str, kind: str) -> dict:
        found = [t for t in self.tables if t["section"] == section and t["attrs"]["data-table"] == kind]
        assert len(found) == 1, (section, kind)
        return found[0]


def column(table: dict, key: str, attr: str | None = None) -> list:
    idx = [h["attrs"].get("data-key") for h in table["head"]].index(key)
    if attr:
        return [r[idx]["attrs"].get(attr) for r in table["rows"]]
    return [r[idx]["text"].strip() for r in table["rows"]]


def header(table: dict, key: str) -> dict:
    return next(h for h in table["head"] if h["attrs"].get("data-key") == key)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    path, rows = write_results(out)
    reports.render(path, out, formats=("html", "png"))
    return out / "report" / "leaderboard.html", rows


def browse(chromium: str, html: Path, fragment: str, tmp_path: Path) -> Dom:
    profile = tmp_path / f"profile-{abs(hash(fragment))}"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={profile}", "--dump-dom", html.as_uri() + fragment]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = Dom(res.stdout)
    assert dom.html_attrs.get("data-ready") == "1", "the page script did not run to the end"
    return dom


def views_of(rows):
    return {f"v-mnist5k-{t.lower()}": t for t in ("Linf", "L2")}


def test_page_is_self_contained_and_escaped(page):
    html, _ = page
    src = html.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", src), "no network assets"
    assert "Content-Security-Policy" in src and "data:image/png;base64," in src
    assert "<b>bold</b>" not in src and "&lt;b&gt;bold&lt;/b&gt;" in src


def test_default_view_renders(page, chromium, tmp_path):
    html, rows = page
    dom = browse(chromium, html, "", tmp_path)
    # first view shown, others hidden by the script; tables rendered with every ok configuration
    assert "hidden" not in dom.sections["v-mnist5k-l2"] and "hidden" in dom.sections["v-mnist5k-linf"]
    for vid, threat in views_of(rows).items():
        board = dom.table(vid, "leaderboard")
        labels = column(board, "model")
        expected = {f"{r['model']}-w{r['width']}" for r in rows if r["status"] == "ok" and r["threat"] == threat}
        assert sorted(labels) == sorted(expected)
        assert all(h["attrs"].get("aria-sort") == "none" for h in board["head"])
        fams = column(board, "family")
        assert fams == sorted(fams)  # default order: grouped by family, then by p
        # every shown number is the mean over seeds of its rows (the numeric sort key and the text agree)
        exp = {lbl: v for (t, lbl), v in expected_entries(rows).items() if t == threat}
        for metric in ("clean", "robust", "cert"):
            got = dict(zip(labels, column(board, metric, "data-v")))
            assert {k: float(v) for k, v in got.items()} == pytest.approx({k: exp[k][metric][0] for k in got}), metric
            shown = dict(zip(labels, column(board, metric)))
            assert {k: float(v.split("±")[0]) for k, v in shown.items()} == \
                pytest.approx({k: 100 * exp[k][metric][0] for k in got}, abs=0.0051), metric
        # the ranking: robust accuracy at the headline eps, best first, ties broken by clean accuracy
        rank = dom.table(vid, "ranking")
        assert column(rank, "rank") == [str(i) for i in range(1, len(expected) + 1)]
        assert column(rank, "model") == sorted(exp, key=lambda k: (-exp[k]["robust"][0], -exp[k]["clean"][0]))
    assert [e["text"] for e in dom.errors] == [ERROR] and dom.errors[0]["children"] == []


def test_fragment_selects_view_and_sorts_numeric_descending(page, chromium, tmp_path):
    html, rows = page
    dom = browse(chromium, html, "#view=v-mnist5k-linf&sort=p&desc=1", tmp_path)
    assert "hidden" in dom.sections["v-mnist5k-l2"] and "hidden" not in dom.sections["v-mnist5k-linf"]
    board = dom.table("v-mnist5k-linf", "leaderboard")
    ps = [float(v) for v in column(board, "p", "data-v")]
    expected = sorted({r["params"] for r in rows if r["status"] == "ok" and r["threat"] == "Linf"}, reverse=True)
    assert ps == expected
    assert [int(t) for t in column(board, "p")] == expected  # the shown text moved with the sort values
    assert header(board, "p")["attrs"]["aria-sort"] == "descending" and board["attrs"]["data-sorted"] == "p:desc"
    # the ranking table is not touched by a leaderboard sort
    assert column(dom.table("v-mnist5k-linf", "ranking"), "rank") == [str(i) for i in range(1, len(ps) + 1)]


def test_text_sort_is_numeric_aware(page, chromium, tmp_path):
    html, _ = page
    dom = browse(chromium, html, "#view=v-mnist5k-l2&sort=model", tmp_path)
    board = dom.table("v-mnist5k-l2", "leaderboard")
    assert column(board, "model") == ["mlp-w8", "mlp-w32", "mlp-w128", "mlp-w512", "small_cnn-w4", "small_cnn-w16"]
    assert header(board, "model")["attrs"]["aria-sort"] == "ascending"


def test_missing_values_sort_last_and_ranking_sorts(page, chromium, tmp_path):
    html, rows = page
    dom = browse(chromium, html, "#view=v-mnist5k-l2&sort=lip_upper&desc=1", tmp_path)
    board = dom.table("v-mnist5k-l2", "leaderboard")
    vals = column(board, "lip_upper", "data-v")
    assert vals[-1] is None and column(board, "model")[-1] == "mlp-w32"  # the config without lip_upper
    nums = [float(v) for v in vals[:-1]]
    assert nums == sorted(nums, reverse=True)
    dom = browse(chromium, html, "#view=v-mnist5k-l2&table=ranking&sort=clean", tmp_path)
    rank = dom.table("v-mnist5k-l2", "ranking")
    clean = [float(v) for v in column(rank, "clean", "data-v")]
    assert clean == sorted(clean) and rank["attrs"]["data-sorted"] == "clean:asc"
    assert column(rank, "rank") != [str(i) for i in range(1, len(clean) + 1)]
