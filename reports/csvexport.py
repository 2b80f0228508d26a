"""CSV export: one line per result row (failed rows included), the main fields flattened.

Columns: the identifying and scalar fields, `headline_eps`, then for every eps found in the file (sorted)
`pgd_acc@<eps>`, `autoattack_acc@<eps>`, `robust_acc@<eps>`, `cert_acc@<eps>`, `verified@<eps>` (eps as Python's
shortest round-trip text, e.g. `pgd_acc@0.1`; verified: true where an AutoAttack-grade attack verified the robust
accuracy, false where only PGD or a weaker attack ran), then `aa_flags` (joined by ";") and `time_<phase>` per
timing phase. Numbers are written at full precision; missing values are empty cells.
"""
from __future__ import annotations

import csv
import io
from itertools import repeat

from .values import acc_map, dedupe_eps, num, row_eps, row_law_scale, row_ratio, text, verified_at
from .schema import ACC_KEYS, FIELDS, eps_key
from .table import headline_eps, row_flags

# every required scalar field of the row schema, in its order
SCALARS = tuple(f.name for f in FIELDS if f.required and f.kind in ("str", "int", "float", "bool"))


def _cell(v) -> str:
    """A value as CSV text: full precision, "" for null or NaN, text() for the rest (its common types without a
    call: a report of 20,000 rows writes a million cells)."""
    t = type(v)
    if t is float:
        return "" if v != v else repr(v)  # NaN is a missing value
    if t is str and v.isprintable() and "  " not in v and v[:1] != " " and v[-1:] != " ":
        return v  # text(v) is v: the only printable whitespace is a single inner space
    if t is int:
        return str(v)
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if v != v else repr(v)
    return text(v)


def render_csv(rows) -> str:
    rows = [r for r in rows if isinstance(r, dict)]
    all_eps = dedupe_eps(e for r in rows for e in row_eps(r))
    phases = list(dict.fromkeys(k for r in rows if isinstance(r.get("timings"), dict) for k in r["timings"]))
    header = list(SCALARS) + ["headline_eps"]
    header += [f"{k}@{eps_key(e)}" for e in all_eps for k in (*ACC_KEYS, "verified")]
    header += ["flags", "aa_flags"] + [f"time_{p}" for p in phases]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    computed = {"ratio": lambda r: row_ratio(r, "ratio"), "ratio_eff": lambda r: row_ratio(r, "ratio_eff"),
                "law_scale": row_law_scale}
    plain = [k for k in SCALARS if k not in computed]
    columns = {k: map(_cell, map(dict.get, rows, repeat(k))) for k in plain}  # column by column: fewer calls per cell
    columns.update({k: map(_cell, map(f, rows)) for k, f in computed.items()})
    scalars = zip(*(columns[k] for k in SCALARS), map(_cell, map(headline_eps, rows)))
    for r, line in zip(rows, scalars):
        line = list(line)
        maps = [acc_map(r, k) for k in ACC_KEYS]
        for e in all_eps:
            line += map(_cell, [m.get(e) for m in maps])
            line.append("true" if verified_at(r, e) else "false")
        aa = r.get("aa_flags")
        line.append(";".join(row_flags(r)))
        line.append(";".join(text(f) for f in aa) if isinstance(aa, (list, tuple)) else text(aa))
        t = r.get("timings") if isinstance(r.get("timings"), dict) else {}
        line += [_cell(num(t.get(p))) for p in phases]
        w.writerow(line)
    return buf.getvalue()
