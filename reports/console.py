"""The console table `bench run` prints at the end (and `bench report` prints): one line per result row, grouped by
dataset, threat model and family, sorted by p; failed rows shown in place with their error."""
from __future__ import annotations

from collections import defaultdict

from rich.table import Table
from rich.text import Text

from ._util import (MISSING, UNVERIFIED_NOTE, acc_at, fmt_eps, fmt_int, fmt_pct, fmt_ratio, fmt_robust, fmt_sig,
                    fmt_width, is_ok, num, row_law_scale, row_ratio, text, verified_at)
from .table import headline_eps, row_flags, view_key


def _group_key(row: dict, families: dict) -> tuple[str, str, str]:
    ds, th, suite = view_key(row)
    return ds, th + (f" · attacks {suite}" if suite else ""), text(row.get("family")) or families.get(text(row.get("model"))) or "?"


def _row_sort_key(row: dict):
    p = num(row.get("params"))
    return (p is None, p or 0.0, num(row.get("width")) or 0.0, text(row.get("model")), text(row.get("recipe")),
            num(row.get("n_train")) or 0.0, num(row.get("label_noise")) or 0.0, text(row.get("seed")))


def console_table(rows, *, title: str | None = None) -> Table:
    """A rich Table of result rows: columns model, width, p, p/(n·d), eps (the headline eps, see `headline_eps`),
    clean, PGD, AutoAttack, robust, certified (accuracies in %, at the headline eps), lip_upper, lip_lower, law_scale,
    flags; a recipe column when several recipes ran, a seed column when several seeds ran. Failed rows show their
    error in the flags column."""
    rows = [r for r in rows if isinstance(r, dict)]
    multi_seed = len({text(r.get("seed")) for r in rows}) > 1
    multi_recipe = len({text(r.get("recipe")) for r in rows}) > 1
    table = Table(title=title, show_lines=False, header_style="bold", pad_edge=False)
    table.add_column("model", overflow="fold")
    table.add_column("width", justify="right")
    if multi_recipe:
        table.add_column("recipe")
    if multi_seed:
        table.add_column("seed", justify="right")
    for name in ("p", "p/(n·d)", "eps", "clean", "PGD", "AutoAttack", "robust", "certified", "lip_upper",
                 "lip_lower", "law_scale"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("flags", overflow="fold")
    ncols = len(table.columns)

    # a row that failed before its model was built has no family: take it from the model's other rows
    families = {text(r.get("model")): text(r.get("family")) for r in rows if text(r.get("family"))}
    groups: dict = defaultdict(list)
    for r in rows:
        groups[_group_key(r, families)].append(r)
    for gi, gk in enumerate(sorted(groups)):
        if gi:
            table.add_section()
        head = [Text(" · ".join(gk), style="bold cyan")] + [""] * (ncols - 1)
        table.add_row(*head)
        for r in sorted(groups[gk], key=_row_sort_key):
            cells = [text(r.get("model")) or MISSING, fmt_width(r.get("width"))]
            if multi_recipe:
                cells.append(text(r.get("recipe")) or MISSING)
            if multi_seed:
                cells.append(text(r.get("seed")) or MISSING)
            p = num(r.get("params"))
            if not is_ok(r):
                status = text(r.get("status")) or "failed"
                err = text(r.get("error")) or "(no error message)"
                cells += [fmt_int(p), fmt_ratio(row_ratio(r))] + [MISSING] * 9
                table.add_row(*cells, Text(f"{status}: {err}", style="red"))
                continue
            eps = headline_eps(r)
            cells += [
                fmt_int(p), fmt_ratio(row_ratio(r)), fmt_eps(eps), fmt_pct(num(r.get("clean_acc"))),
                fmt_pct(acc_at(r, "pgd_acc", eps)), fmt_pct(acc_at(r, "autoattack_acc", eps)),
                fmt_robust(acc_at(r, "robust_acc", eps), verified=verified_at(r, eps)),
                fmt_pct(acc_at(r, "cert_acc", eps)),
                fmt_sig(num(r.get("lip_upper"))), fmt_sig(num(r.get("lip_lower"))), fmt_sig(row_law_scale(r)),
            ]
            flags = row_flags(r)
            table.add_row(*cells, Text(", ".join(flags), style="yellow") if flags else "")
    if not rows:
        table.add_row("(no rows)", *[""] * (ncols - 1))
    table.caption = "accuracies in % at the headline eps (largest AutoAttack eps, else largest eps)"
    if any(is_ok(r) and not verified_at(r, headline_eps(r)) for r in rows):
        table.caption += "; " + UNVERIFIED_NOTE
    return table
