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

from .values import acc_map, dedupe_eps, num, row_eps, row_law_scale, row_ratio, text, verified_at
from .schema import ACC_KEYS, FIELDS, eps_key
from .table import headline_eps, row_flags

# every required scalar field of the row schema, in its order
SCALARS = tuple(f.name for f in FIELDS if f.required and f.kind in ("str", "int", "float", "bool"))


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if v != v else repr(v)  # NaN is a missing value
    if isinstance(v, (int, str)):
        return text(v)
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
    for r in rows:
        line = []
        for k in SCALARS:
            if k in ("ratio", "ratio_eff"):
                v = row_ratio(r, k)
            elif k == "law_scale":
                v = row_law_scale(r)
            else:
                v = r.get(k)
            line.append(_cell(v))
        line.append(_cell(headline_eps(r)))
        maps = [acc_map(r, k) for k in ACC_KEYS]
        for e in all_eps:
            line += [_cell(m.get(e)) for m in maps] + [_cell(verified_at(r, e))]
        aa = r.get("aa_flags")
        line.append(";".join(row_flags(r)))
        line.append(";".join(text(f) for f in aa) if isinstance(aa, (list, tuple)) else text(aa))
        t = r.get("timings") if isinstance(r.get("timings"), dict) else {}
        line += [_cell(num(t.get(p))) for p in phases]
        w.writerow(line)
    return buf.getvalue()
