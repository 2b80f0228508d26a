"""The console table `bench run` prints at the end (and `bench report` prints): one line per result row, grouped by
dataset, threat model and family, sorted by p; failed rows shown in place with their error."""
from __future__ import annotations

from collections import defaultdict

from rich.table import Table
from rich.text import Text

from .formats import (MISSING, UNVERIFIED_MARK, UNVERIFIED_NOTE, fmt_eps, fmt_int, fmt_ratio, fmt_sig, fmt_width,
                      radii_cell)
from .values import (acc_at, is_ok, num, radius_beyond, row_eps, row_law_scale, row_radius, row_ratio, text,
                     verified_at)
from .table import headline_eps, row_flags, view_key

ROBUST_HEADER = "robust % at each eps"  # its group heading cell names the eps, the next one the headline eps
RAW_MARK = "*"  # a Lipschitz bound not at margin 1 (the row does not interpolate)


def _group_key(row: dict, families: dict) -> tuple[str, str, str]:
    ds, th, suite = view_key(row)
    return ds, th + (f" · attacks {suite}" if suite else ""), text(row.get("family")) or families.get(text(row.get("model"))) or "?"


def _row_sort_key(row: dict):
    p = num(row.get("params"))
    return (p is None, p or 0.0, num(row.get("width")) or 0.0, text(row.get("model")), text(row.get("recipe")),
            num(row.get("n_train")) or 0.0, num(row.get("label_noise")) or 0.0, text(row.get("seed")))


def _compact_pct(value: float | None, verified: bool) -> str:
    """An accuracy in % with one decimal (0 without one), marked when unverified."""
    if value is None:
        return MISSING
    out = "0" if value == 0 else f"{100 * value:.1f}"
    return out if verified else out + UNVERIFIED_MARK


def robust_cell(row: dict) -> str:
    """Robust accuracy at every eps of the row, compact: '18.4 / 0.4 / 0 / 0'."""
    return " / ".join(_compact_pct(acc_at(row, "robust_acc", e), verified_at(row, e)) for e in row_eps(row))


RADII_HEADER = "radius cert / atk"


def row_radii(row: dict) -> str:
    """The row's median certified radius beside its median attacked radius: what is proven against what attacks
    find."""
    return radii_cell(row_radius(row, "cert_radius"), row_radius(row, "attack_radius"),
                      radius_beyond(row, "cert_radius"), radius_beyond(row, "attack_radius"))


def lip_cell(row: dict, key: str) -> str:
    """A Lipschitz bound at margin 1 (the row's `<key>_unit_margin`), else the raw bound marked RAW_MARK (a row that
    does not interpolate has no margin to normalise by)."""
    unit = num(row.get(f"{key}_unit_margin"))
    if unit is not None:
        return fmt_sig(unit)
    raw = num(row.get(key))
    return MISSING if raw is None else fmt_sig(raw) + RAW_MARK


def shared_flags(rows: list[dict]) -> list[str]:
    """Flags every ok row carries (two rows or more): said once under the table instead of on every line."""
    ok = [row_flags(r) for r in rows if is_ok(r)]
    if len(ok) < 2:
        return []
    return [f for f in ok[0] if all(f in fl for fl in ok[1:])]


def console_table(rows, *, title: str | None = None) -> Table:
    """A rich Table of result rows: model, width, p, p/(n·d), clean accuracy, robust accuracy at every eps of the
    row (compact, in %), certified accuracy at the headline eps (see `headline_eps`), the Lipschitz bounds at margin 1
    (lip_upper, lip_lower), law_scale and the flags that differ between rows (a flag every row carries is said once
    under the table); a recipe column when several recipes ran, a seed column when several seeds ran. Each group's
    heading names its eps. Failed rows show their error in the flags column."""
    rows = [r for r in rows if isinstance(r, dict)]
    multi_seed = len({text(r.get("seed")) for r in rows}) > 1
    multi_recipe = len({text(r.get("recipe")) for r in rows}) > 1
    table = Table(title=title, show_lines=False, header_style="bold", pad_edge=False)
    table.add_column("model", overflow="fold", max_width=28)  # a group heading folds instead of widening it
    table.add_column("width", justify="right")
    if multi_recipe:
        table.add_column("recipe")
    if multi_seed:
        table.add_column("seed", justify="right")
    for name in ("p", "p/(n·d)", "clean", ROBUST_HEADER, "cert", RADII_HEADER, "lip_upper m=1", "lip_lower m=1",
                 "law_scale"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("flags", overflow="fold")
    ncols = len(table.columns)
    common = shared_flags(rows)

    # a row that failed before its model was built has no family: take it from the model's other rows
    families = {text(r.get("model")): text(r.get("family")) for r in rows if text(r.get("family"))}
    groups: dict = defaultdict(list)
    for r in rows:
        groups[_group_key(r, families)].append(r)
    for gi, gk in enumerate(sorted(groups)):
        if gi:
            table.add_section()
        head = [Text(" · ".join(gk), style="bold cyan")] + [""] * (ncols - 1)
        at = [c.header for c in table.columns].index(ROBUST_HEADER)
        head[at:at + 2] = _eps_heading(groups[gk])
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
                cells += [fmt_int(p), fmt_ratio(row_ratio(r))] + [MISSING] * 7
                table.add_row(*cells, Text(f"{status}: {err}", style="red"))
                continue
            eps = headline_eps(r)
            cells += [fmt_int(p), fmt_ratio(row_ratio(r)), _compact_pct(num(r.get("clean_acc")), True),
                      robust_cell(r), _compact_pct(acc_at(r, "cert_acc", eps), True), row_radii(r),
                      lip_cell(r, "lip_upper"),
                      lip_cell(r, "lip_lower"), fmt_sig(row_law_scale(r))]
            flags = [f for f in row_flags(r) if f not in common]
            table.add_row(*cells, Text(", ".join(flags), style="yellow") if flags else "")
    if not rows:
        table.add_row("(no rows)", *[""] * (ncols - 1))
    table.caption = _caption(rows, common)
    return table


def _eps_heading(rows: list[dict]) -> list:
    """The group heading's robust and cert cells: 'eps 0.05 / 0.1 / 0.2 / 0.3' and '@0.1', when the group's ok rows
    share one eps list and one headline eps."""
    ok = [r for r in rows if is_ok(r)]
    lists = {tuple(row_eps(r)) for r in ok}
    heads = {headline_eps(r) for r in ok}
    if len(lists) != 1 or len(heads) != 1:
        return ["", ""]
    (eps,), (head,) = lists, heads
    return [Text("eps " + " / ".join(fmt_eps(e) for e in eps), style="cyan"), Text(f"@{fmt_eps(head)}", style="cyan")]


def _caption(rows: list[dict], common: list[str]) -> str:
    lines = ["accuracies in %; robust at every eps of the group (worst case over every attack), cert at the headline "
             "eps (largest AutoAttack eps, else largest eps); radius: median certified radius / median attacked "
             "radius (smallest eps that breaks a point); Lipschitz bounds at margin 1 (bound / smallest training "
             "margin)"]
    if any(is_ok(r) and lip_cell(r, "lip_upper").endswith(RAW_MARK) for r in rows):
        lines.append(f"{RAW_MARK} raw bound: the row does not interpolate, so there is no margin to normalise by")
    if any(is_ok(r) and UNVERIFIED_MARK in robust_cell(r) for r in rows):
        lines.append(UNVERIFIED_NOTE)
    if common:
        lines.append("every row: " + ", ".join(common))
    return "\n".join(lines)
