"""Reading result rows as a report does: tolerant value access.

Rows come from a file that other programs (or people) write, so every accessor here tolerates a missing key, a null,
a wrong type, NaN, or an accuracy map keyed by strings or numbers (keys read back by reports.schema.parse_eps_key).
Nothing here raises on bad row content.
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from functools import wraps

from .schema import ACC_KEYS, eps_key, is_trust_flag, parse_eps_key


def num(value) -> float | None:
    """A float for a real number (int, float, numeric string); None for null, NaN, bools, or anything else."""
    if type(value) is float:  # the usual case first: a report asks a million times
        return None if value != value else value
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            v = float(value)
        except OverflowError:  # an integer past every float
            return None
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return None if math.isnan(v) else v


def text(value) -> str:
    """A one-line string for any value ('' for null)."""
    if value is None:
        return ""
    return " ".join(str(value).split())


def is_ok(row: dict) -> bool:
    return row.get("status") == "ok"


def interpolates(row: dict) -> bool:
    """The row says it fits every training label (`interpolates` true): the models the law speaks of. A row
    without the key (an older lawbench) does not say so."""
    return row.get("interpolates") is True


_memo: dict | None = None  # function -> {id(row) or (id(row), *args): (row, result)} while ``remembered`` is active


@contextmanager
def remembered():
    """Inside, what ``per_row`` functions read from a row is computed once per row and arguments: a report of 20,000
    rows asks each row the same questions dozens of times (its eps, its maps, its flags). Rows must not change
    inside; each remembered row is held, so its id stays its own."""
    global _memo
    outer = _memo
    if outer is None:
        _memo = defaultdict(dict)
    try:
        yield
    finally:
        _memo = outer


def per_row(fn):
    """``fn(row, *args)`` remembered inside ``remembered()`` (its result must not be changed by callers)."""
    @wraps(fn)
    def read(row, *args):
        memo = _memo
        if memo is None:
            return fn(row, *args)
        table, k = memo[fn], (id(row), *args) if args else id(row)
        hit = table.get(k)
        if hit is None:
            hit = table[k] = (row, fn(row, *args))
        return hit[1]
    return read


@per_row
def acc_map(row: dict, key: str) -> dict[float, float | None]:
    """The accuracy map `row[key]` as {eps (float): accuracy or None}; {} when absent, null or malformed. Two keys
    of one eps ("0.1" and "0.10"): the one its writer writes (schema.eps_key) wins, else the later."""
    raw = row.get(key)
    out: dict[float, float | None] = {}
    if not isinstance(raw, dict):
        return out
    for k, v in raw.items():
        e = parse_eps_key(k)
        if e is not None:
            out[e] = num(v)
    if len(out) < len(raw):  # a bad key, or two of one eps: its writer's spelling (eps_key) over the others
        for k, v in raw.items():
            e = parse_eps_key(k)
            if e is not None and k == eps_key(e):
                out[e] = num(v)
    return out


def acc_at(row: dict, key: str, eps: float | None) -> float | None:
    """Accuracy of map `key` at eps (its key read back by reports.schema.parse_eps_key), or None: acc_map's value."""
    return None if eps is None else acc_map(row, key).get(float(eps))


def verified_at(row: dict, eps: float | None) -> bool:
    """The row's robust accuracy at eps was verified at AutoAttack grade: its `verified` map says so; a row without
    the map (an older lawbench) only where AutoAttack ran (autoattack_acc set) or nothing was left robust."""
    if eps is None:
        return True
    said = _verified(row)
    if said is not None:
        return said.get(float(eps), False)
    return acc_at(row, "autoattack_acc", eps) is not None or acc_at(row, "robust_acc", eps) == 0


@per_row
def _verified(row: dict) -> dict[float, bool] | None:
    """The `verified` map as {eps: true where a spelling of it says true}; None for a row without the map."""
    m = row.get("verified")
    if not isinstance(m, dict):
        return None
    out: dict[float, bool] = {}
    for k, v in m.items():
        e = parse_eps_key(k)
        if e is not None:
            out[e] = out.get(e, False) or v is True
    return out


def flagged(row: dict) -> list[str]:
    """The row's flags (in `flags` or `aa_flags`) that say its attacks may have been fooled."""
    out = []
    for key in ("flags", "aa_flags"):
        raw = row.get(key)
        if isinstance(raw, (list, tuple)):
            out += [f for f in raw if is_trust_flag(f)]
    return list(dict.fromkeys(out))


@per_row
def row_eps(row: dict) -> list[float]:
    """Every eps a row mentions: its `eps` list plus the keys of its accuracy maps, sorted, deduplicated."""
    found: list[float] = []
    raw = row.get("eps")
    if isinstance(raw, (list, tuple)):
        found.extend(e for e in (parse_eps_key(x) for x in raw) if e is not None)
    elif parse_eps_key(raw) is not None:
        found.append(parse_eps_key(raw))
    for key in ACC_KEYS:
        found.extend(acc_map(row, key))
    return dedupe_eps(found)


def dedupe_eps(values) -> list[float]:
    """The distinct eps, sorted (keys are read back exactly: reports.schema.parse_eps_key)."""
    return sorted({float(e) for e in values})


@per_row
def row_ratio(row: dict, which: str = "ratio") -> float | None:
    """p/(n·d) (which="ratio") or p/(n·d_eff) (which="ratio_eff"): the stored value, else computed from the row."""
    v = num(row.get(which))
    if v is not None:
        return v
    p, n = num(row.get("params")), num(row.get("n_train"))
    d = num(row.get("d" if which == "ratio" else "d_eff"))
    if p is None or not n or not d:
        return None
    return p / (n * d)


def row_law_scale(row: dict) -> float | None:
    """sqrt(n·d/p): the stored value, else computed from the row."""
    v = num(row.get("law_scale"))
    if v is not None:
        return v
    r = row_ratio(row)
    return None if not r or r <= 0 else 1.0 / math.sqrt(r)


def row_radius(row: dict, key: str) -> float | None:
    """A row's median radius (key: cert_radius or attack_radius): inf where it lies beyond the search (stored null),
    None where the row has none."""
    v = row.get(key)
    if not isinstance(v, dict) or "median" not in v:
        return None
    return math.inf if v["median"] is None else num(v["median"])


def radius_beyond(row: dict, key: str) -> float | None:
    """Where a row's radius search stopped: the largest eps for the attacked radius, twice it for the certified."""
    eps = row_eps(row)
    if not eps:
        return None
    return max(eps) * (2 if key == "cert_radius" else 1)


def row_suite(row: dict) -> list[str]:
    """The attacks a row was evaluated with, in order: its `suite`, or for rows written before rows named it, the
    PGD sweep then AutoAttack unless its `autoattack` was off."""
    suite = row.get("suite")
    if isinstance(suite, list) and suite:
        return [text(s) for s in suite]
    return ["pgd"] if text(row.get("autoattack")) == "off" else ["pgd", "autoattack"]


DEFAULT_SUITE = ["pgd", "autoattack"]


def suite_label(row: dict) -> str:
    """'' for the default suite (PGD, then AutoAttack), else 'pgd → ta-square': views split on it, so rows attacked
    by different suites are never ranked together."""
    suite = row_suite(row)
    return "" if suite == DEFAULT_SUITE else " → ".join(suite)
