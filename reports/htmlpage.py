"""The self-contained static HTML leaderboard: one file, inline CSS and JS, plots as data: URIs, no network assets (a
Content-Security-Policy forbids any). Every string from the rows is escaped.

Views: one section per dataset × threat model, chosen with tabs (all sections show when JS is off).
Sorting: click a column header (ascending, then descending; numeric columns sort by value, text columns in natural
order, missing values always last). The state lives in the URL fragment, e.g.
`report.html#view=v-mnist5k-linf&sort=p&desc=1&table=leaderboard`, so a sorted view can be linked; on load the page
replays the fragment through the same click handler.
"""
from __future__ import annotations

import base64
import html

from .formats import FLAGGED_MARK, MISSING, UNVERIFIED_NOTE, fmt_ci, fmt_slope
from .values import text
from .columns import LEADERBOARD, RANKING, Column
from .markdown import PLOT_TITLES, slope_rows, view_heading_facts
from .table import Entry, View, failed_rows, ranking


def esc(s) -> str:
    return html.escape(text(s), quote=True)


CSS = """
:root { --fg:#1b1f24; --muted:#57606a; --line:#d0d7de; --head:#f6f8fa; --accent:#0969da; --bad:#cf222e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0 auto;
       padding: 1rem 1.5rem 3rem; max-width: 1500px; }
h1 { font-size: 1.5rem; margin: .3rem 0; } h2 { font-size: 1.25rem; margin-top: 1.6rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .4rem; }
p.meta, p.note { color: var(--muted); margin: .2rem 0 .6rem; }
nav.tabs { display: flex; flex-wrap: wrap; gap: .3rem; margin: .8rem 0; }
nav.tabs button { font: inherit; border: 1px solid var(--line); background: var(--head); border-radius: 6px;
                  padding: .25rem .7rem; cursor: pointer; }
nav.tabs button[aria-selected="true"] { background: var(--accent); color: #fff; border-color: var(--accent); }
html:not(.js) nav.tabs { display: none; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; white-space: nowrap; }
td.text { text-align: left; } td.flags { white-space: normal; min-width: 8rem; } td.num { text-align: right; }
thead th { background: var(--head); position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #aaa; font-size: .8em; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--accent); }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--accent); }
td.flags { color: #9a6700; } td.error { color: var(--bad); white-space: normal; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { color: var(--muted); }
"""

JS = r"""
(function () {
  "use strict";
  var root = document.documentElement;
  root.classList.add("js");
  var views = Array.prototype.slice.call(document.querySelectorAll("section.view"));
  var tabs = Array.prototype.slice.call(document.querySelectorAll("nav.tabs button[data-view]"));
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
  var state = {};
  var replaying = false;

  function readHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf("=");
      try {
        out[decodeURIComponent(i < 0 ? kv : kv.slice(0, i))] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1));
      } catch (e) { /* a malformed fragment is ignored */ }
    });
    return out;
  }
  function writeHash() {
    if (replaying) return;
    var parts = [];
    ["view", "sort", "desc", "table"].forEach(function (k) {
      if (state[k] !== undefined && state[k] !== "") parts.push(k + "=" + encodeURIComponent(state[k]));
    });
    try { history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search); }
    catch (e) { /* file:// pages in some browsers refuse; sorting still works */ }
  }
  function showView(id) {
    var found = views.some(function (v) { return v.id === id; });
    if (!found && views.length) id = views[0].id;
    views.forEach(function (v) { var on = v.id === id; v.hidden = !on; v.classList.toggle("active", on); });
    tabs.forEach(function (b) { b.setAttribute("aria-selected", b.getAttribute("data-view") === id ? "true" : "false"); });
    state.view = id;
  }
  function cellValue(td, numeric) {
    if (!td) return null;
    if (numeric) {
      var v = td.getAttribute("data-v");
      if (v === null || v === "") return null;
      var f = parseFloat(v);
      return isNaN(f) ? null : f;
    }
    var t = td.textContent.trim();
    return (t === "" || t === "\u2013") ? null : t;
  }
  function order(row) { return +row.getAttribute("data-i"); }
  function sortTable(table, th, desc) {
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a.cells[idx], numeric), y = cellValue(b.cells[idx], numeric);
      if (x === null || y === null) {
        if (x === null && y === null) return order(a) - order(b);
        return x === null ? 1 : -1;          /* missing values last in both directions */
      }
      var c = numeric ? (x < y ? -1 : (x > y ? 1 : 0)) : collator.compare(x, y);
      if (desc) c = -c;
      return c || (order(a) - order(b));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.children, function (h) {
      h.setAttribute("aria-sort", h === th ? (desc ? "descending" : "ascending") : "none");
    });
    table.setAttribute("data-sorted", th.getAttribute("data-key") + (desc ? ":desc" : ":asc"));
  }
  function onHeader(ev) {
    var th = ev.currentTarget;
    var table = th.closest("table");
    var desc = th.getAttribute("aria-sort") === "ascending";
    sortTable(table, th, desc);
    var section = table.closest("section.view");
    if (section) state.view = section.id;
    state.sort = th.getAttribute("data-key");
    state.desc = desc ? "1" : "";
    state.table = table.getAttribute("data-table");
    writeHash();
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable thead th"), function (th) {
    th.tabIndex = 0;
    th.addEventListener("click", onHeader);
    th.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); th.click(); }
    });
  });
  tabs.forEach(function (b) {
    b.addEventListener("click", function () { showView(b.getAttribute("data-view")); writeHash(); });
  });

  /* replay the fragment: choose the view, then sort every table of that kind through the click handler */
  var h = readHash();
  showView(h.view);
  if (h.sort) {
    replaying = true;
    var kind = h.table || "leaderboard";
    Array.prototype.forEach.call(document.querySelectorAll('table.sortable[data-table="' + kind.replace(/[^a-z]/g, "") + '"]'),
      function (table) {
        var th = Array.prototype.filter.call(table.tHead.rows[0].cells, function (c) {
          return c.getAttribute("data-key") === h.sort;
        })[0];
        if (!th) return;
        th.click();
        if (h.desc === "1" || h.desc === "true") th.click();
      });
    replaying = false;
    state.sort = h.sort; state.desc = (h.desc === "1" || h.desc === "true") ? "1" : ""; state.table = kind;
  }
  root.setAttribute("data-ready", "1");
})();
"""


def _th(col: Column) -> str:
    title = f' title="{esc(col.title)}"' if col.title else ""
    return (f'<th scope="col" data-key="{esc(col.key)}" data-type="{"num" if col.numeric else "text"}"'
            f' aria-sort="none"{title}>{esc(col.header)}</th>')


def _td(col: Column, entry: Entry) -> str:
    shown, value = col.cell(entry)
    cls = "num" if col.numeric else ("text flags" if col.key == "flags" else "text")
    attrs = f' class="{cls}"'
    if col.numeric and value is not None:
        attrs += f' data-v="{value!r}"'
    if "±" in shown:
        attrs += f' title="mean ± 95% Student-t interval over {len(entry.rows)} seeds"'
    return f"<td{attrs}>{esc(shown) or MISSING}</td>"


def _table(kind: str, cols: tuple[Column, ...], entries, ranks=None) -> str:
    head = ([_th(Column("rank", "Rank", lambda e: ("", None)))] if ranks is not None else []) + [_th(c) for c in cols]
    body = []
    for i, e in enumerate(entries):
        cells = []
        if ranks is not None:
            r = ranks[i]
            cells.append(f'<td class="num" data-v="{r}">{r}</td>' if r is not None else f'<td class="num">{MISSING}</td>')
        cells += [_td(c, e) for c in cols]
        body.append(f'<tr data-i="{i}">{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table class="sortable" data-table="{kind}">'
            f'<thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _slopes(view: View) -> str:
    rows = []
    for y, scope, res in slope_rows(view):
        rows.append("<tr>" + "".join(f'<td class="{c}">{esc(v)}</td>' for c, v in (
            ("text", y), ("text", scope), ("num", fmt_slope(res)), ("num", fmt_ci(res)),
            ("num", res["n_seeds"]), ("num", res["n_points"]), ("num", res["n_excluded"]))) + "</tr>")
    return ('<div class="scroll"><table class="slopes"><thead><tr><th>bound</th><th>scope</th><th>slope</th>'
            '<th>95% CI</th><th>seeds</th><th>interpolating points</th><th>left out (not interpolating)</th></tr>'
            '</thead><tbody>' + "".join(rows) + "</tbody></table></div>")


def _failed(rows) -> str:
    if not rows:
        return "<p>None.</p>"
    body = []
    for r in rows:
        cells = [r.get("cell_id"), r.get("dataset"), r.get("threat"), r.get("model"), r.get("width"), r.get("seed"),
                 r.get("status") or "failed"]
        body.append("<tr>" + "".join(f'<td class="text">{esc(c) or MISSING}</td>' for c in cells)
                    + f'<td class="error">{esc(r.get("error")) or "(no error message)"}</td></tr>')
    return ('<div class="scroll"><table class="failed"><thead><tr><th>cell_id</th><th>dataset</th><th>threat</th>'
            '<th>model</th><th>width</th><th>seed</th><th>status</th><th>error</th></tr></thead><tbody>'
            + "".join(body) + "</tbody></table></div>")


def render_html(rows, views: list[View], *, source: str = "results.jsonl", images: dict | None = None) -> str:
    """The page. `images` maps plot name -> (mime type, bytes), embedded as data: URIs."""
    ok = sum(1 for r in rows if r.get("status") == "ok")
    failed = failed_rows(rows)
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
           'style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
           '<title>Law of robustness: leaderboard</title>', f"<style>{CSS}</style></head><body>",
           "<header><h1>Law of robustness: leaderboard</h1>",
           f'<p class="meta">From <code>{esc(source)}</code>: {len(rows)} rows ({ok} ok, {len(failed)} failed). '
           "Accuracies in % at the headline eps (a row's largest AutoAttack eps, else its largest eps); mean ± 95% "
           "Student-t interval over seeds where several ran. Ranking by robust accuracy (per-point worst case over "
           "every attack). Click a column header to sort.</p>",
           f'<p class="note">{esc(UNVERIFIED_NOTE)}. {FLAGGED_MARK} flagged: the attacks may have been fooled '
           "(gradient masking, randomness, scaled logits, an indicator of attack failure; the flags column says "
           "which).</p>"]
    if views:
        out.append('<nav class="tabs" role="tablist" aria-label="dataset and threat model">')
        for v in views:
            out.append(f'<button type="button" role="tab" data-view="{esc(v.id)}" aria-selected="false">'
                       f"{esc(v.title)}</button>")
        out.append("</nav>")
    out.append("</header><main>")
    if not views:
        out.append("<p>No successful rows.</p>")
    for v in views:
        ranked = ranking(v)
        out += [f'<section class="view" id="{esc(v.id)}" data-dataset="{esc(v.key[0])}" data-threat="{esc(v.key[1])}">',
                f"<h2>{esc(v.title)}</h2>", f'<p class="meta">{esc(view_heading_facts(v))}</p>',
                "<h3>Ranking</h3>", _table("ranking", RANKING, [e for _, e in ranked], [r for r, _ in ranked]),
                "<h3>Leaderboard</h3>", _table("leaderboard", LEADERBOARD, v.entries),
                "<h3>Log-log slope of the Lipschitz bounds against p/(n·d)</h3>",
                '<p class="note">The law\'s scale sqrt(n·d/p) has slope −0.5.</p>', _slopes(v), "</section>"]
    if images:
        out.append('<section id="plots"><h2>Plots</h2>')
        for name, (mime, data) in images.items():
            b64 = base64.b64encode(data).decode("ascii")
            out.append(f'<figure><img alt="{esc(PLOT_TITLES.get(name, name))}" src="data:{mime};base64,{b64}">'
                       f"<figcaption>{esc(PLOT_TITLES.get(name, name))}</figcaption></figure>")
        out.append("</section>")
    out += ['<section id="failed"><h2>Failed rows</h2>', _failed(failed), "</section>", "</main>",
            f"<script>{JS}</script>", "</body></html>", ""]
    return "\n".join(out)
