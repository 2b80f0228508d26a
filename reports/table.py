"""From result rows to leaderboard entries: the headline eps, grouping into views (dataset × threat model), aggregation
over seeds (mean ± Student-t interval), flags, and the RobustBench-style ranking.
"""
from __future__ import annotations

import json

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .values import (acc_at, acc_map, dedupe_eps, flagged, is_ok, num, per_row, radius_beyond, row_eps, row_law_scale,
                     row_radius, row_ratio, row_suite, suite_label, text, verified_at)
from .stats import mean_ci

TOL = 1e-9
MISSING_SUITE = "–"


@per_row
def headline_eps(row: dict) -> float | None:
    """The eps a row is summarised at: its largest AutoAttack eps (a key of `autoattack_acc` with a value), else its
    largest eps (from `eps` and the accuracy maps); None when the row names no eps."""
    aa = [e for e, v in acc_map(row, "autoattack_acc").items() if v is not None]
    if aa:
        return max(aa)
    eps = row_eps(row)
    return eps[-1] if eps else None


@per_row
def row_flags(row: dict) -> list[str]:
    """The row's own flags (AutoAttack's `aa_flags`, a `flags` list if present), `not-interpolating` for a row that
    does not fit its training labels (the law's slopes leave it out), and the report's consistency checks:
    cert_acc ≤ robust_acc ≤ pgd_acc ≤ clean_acc at every eps and lip_lower ≤ lip_upper."""
    flags: list[str] = []
    for key in ("aa_flags", "flags"):
        raw = row.get(key)
        if isinstance(raw, (list, tuple)):
            flags.extend(text(f) for f in raw if text(f))
        elif text(raw):
            flags.append(text(raw))
    if row.get("interpolates") is False:  # outside the law's premise: it does not fit its training labels
        flags.append("not-interpolating")
    clean = num(row.get("clean_acc"))
    maps = [acc_map(row, k) for k in ("cert_acc", "robust_acc", "pgd_acc")]
    for e in row_eps(row):
        cert, rob, pgd = (m.get(e) for m in maps)
        if cert is not None and rob is not None and cert > rob + TOL:
            flags.append("cert>robust")
        if rob is not None and pgd is not None and rob > pgd + TOL:
            flags.append("robust>pgd")
        if pgd is not None and clean is not None and pgd > clean + TOL:
            flags.append("pgd>clean")
    lo, up = num(row.get("lip_lower")), num(row.get("lip_upper"))
    if lo is not None and up is not None and lo > up * (1 + 1e-6) + TOL:
        flags.append("lip_lower>lip_upper")
    return list(dict.fromkeys(flags))


@dataclass
class Stat:
    """A value aggregated over seeds: mean, half-width of the t-interval (None with one value), number of values."""
    mean: float | None = None
    ci: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values, confidence: float = 0.95) -> "Stat":
        vals = [v for v in values if v is not None]
        m, ci = mean_ci(vals, confidence)
        return cls(m, ci, len(vals))


CONFIG_KEYS = ("dataset", "n_train", "label_noise", "threat", "family", "model", "width", "recipe", "train_eps")


def _hashable(v):
    if isinstance(v, float) and v == int(v):
        return int(v)
    if isinstance(v, (list, dict)):
        return repr(v)
    return v


def config_key(row: dict) -> tuple:
    """What identifies a configuration apart from its seed: the columns a reader sees (CONFIG_KEYS), then every
    other setting of the row's cell, so rows that differ in anything but the seed (the AutoAttack engine, the
    learning rate, the attacks' options) are never averaged together as if they were seeds."""
    return _visible(row) + (_settings_json(_settings(row)),)


def _visible(row: dict) -> tuple:
    return tuple(_hashable(row.get(k)) for k in CONFIG_KEYS)


class ConfigKeys:
    """config_key for many rows: the cell settings' JSON is written once per distinct settings, not once per row (a
    sweep's rows of one configuration carry equal cells but for the seed; 0.8 s of JSON at 20,000 rows). Settings
    equal as values (``==``: 1 and 1.0 alike) share their first row's key."""

    def __init__(self):
        self.seen: dict[tuple, list[tuple[dict, str]]] = defaultdict(list)  # visible columns -> (settings, JSON)

    def __call__(self, row: dict) -> tuple:
        visible = _visible(row)
        settings, known = _settings(row), self.seen[visible]
        for other, key in known:
            if other == settings:
                return visible + (key,)
        key = _settings_json(settings)
        if all(key != k for _, k in known):  # else NaN, unequal to itself, whose JSON matches
            known.append((settings, key))
        return visible + (key,)


def _settings(row: dict) -> dict:
    """The row's cell without its seed ({} for rows that carry no cell)."""
    cell = row.get("cell")
    return {k: v for k, v in cell.items() if k != "seed"} if isinstance(cell, dict) else {}


def _settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=repr)


def _setting_text(settings: dict, key: str, row: dict) -> str:
    """A cell setting for a label: strings bare, other values as JSON; a key the cell lacks reads as the row's field
    of that name where the row records what was used (autoattack_impl), else as "default"."""
    if key not in settings and not isinstance(row.get(key), str):
        return "default"
    v = settings[key] if key in settings else row[key]
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=repr)


def _setting_differences(entries: list) -> dict[int, list[str]]:
    """For entries that the visible columns cannot tell apart, the cell settings that set them apart
    ({id(entry): ["key=value", ...]}), so two lines of a table never read alike."""
    twins: dict = defaultdict(list)
    for e in entries:
        twins[config_key(e.rows[0])[:-1]].append(e)
    out = {}
    for group in twins.values():
        if len(group) < 2:
            continue
        settings = [_settings(e.rows[0]) for e in group]
        keys = sorted({k for s in settings for k in s if len({json.dumps(x.get(k), sort_keys=True, default=repr)
                                                                for x in settings}) > 1})
        for e, st in zip(group, settings):
            out[id(e)] = [f"{k}={_setting_text(st, k, e.rows[0])}" for k in keys]
    return out


def view_key(row: dict) -> tuple[str, str, str]:
    """(dataset, threat, suite label): a view is one dataset and threat model attacked by one suite of attacks (the
    label is '' for the default suite), so its ranking never mixes rows evaluated differently."""
    return text(row.get("dataset")) or "?", text(row.get("threat")) or "?", suite_label(row)


def view_title(key: tuple) -> str:
    return f"{key[0]} · {key[1]}" + (f" · attacks {key[2]}" if len(key) > 2 and key[2] else "")


def view_id(key: tuple) -> str:
    """A stable identifier made of [a-z0-9-] only (HTML ids, URL fragments, file names)."""
    raw = "-".join(str(k) for k in key if k).lower()
    s = "".join(c if c.isalnum() and c.isascii() else "-" for c in raw)
    s = "-".join(p for p in s.split("-") if p)
    return "v-" + (s or "x")


@dataclass
class Entry:
    """One configuration of one view, aggregated over its seeds."""
    rows: list[dict]
    dataset: str
    threat: str
    family: str
    model: str
    width: object
    recipe: str
    train_eps: float | None
    n_train: float | None
    label_noise: float | None
    seeds: list
    eps: float | None  # headline eps
    params: Stat
    ratio: Stat
    ratio_eff: Stat
    law_scale: Stat
    d: Stat
    d_eff: Stat
    clean: Stat
    pgd: Stat
    aa: Stat
    robust: Stat
    cert: Stat
    lip_upper: Stat
    lip_lower: Stat
    flags: list[str]
    radii: tuple = (None, None, None, None)  # median certified and attacked radii over the rows, where each stops
    by_eps: dict = field(default_factory=dict)  # {metric: {eps: Stat}} for pgd/aa/robust/cert
    label: str = ""
    unverified: frozenset = frozenset()  # eps where a row's robust accuracy was not verified at AutoAttack grade
    flagged: list = field(default_factory=list)  # flags saying the attacks may have been fooled (TRUST_FLAGS)

    def verified(self, eps: float | None) -> bool:
        return eps not in self.unverified

    @property
    def sort_key(self):
        p = self.params.mean
        return (self.family, p is None, p if p is not None else 0.0, num(self.width) or 0.0, self.model,
                self.recipe, self.n_train or 0.0, self.label_noise or 0.0, self.train_eps or 0.0)


def _group_headline(rows: list[dict]) -> float | None:
    hs = [h for h in (headline_eps(r) for r in rows) if h is not None]
    if not hs:
        return None
    counts = Counter(hs)
    top = max(counts.values())
    return max(h for h, c in counts.items() if c == top)


def make_entry(rows: list[dict], confidence: float = 0.95) -> Entry:
    first = rows[0]
    eps = _group_headline(rows)
    seeds = sorted({text(r.get("seed")) for r in rows}, key=lambda s: (num(s) is None, num(s) or 0, s))
    by_eps: dict = {}
    all_eps = dedupe_eps(e for r in rows for e in row_eps(r))
    for metric, key in (("pgd", "pgd_acc"), ("aa", "autoattack_acc"), ("robust", "robust_acc"), ("cert", "cert_acc")):
        by_eps[metric] = {}
        maps = [acc_map(r, key) for r in rows]
        for e in all_eps:
            st = Stat.of([m.get(e) for m in maps], confidence)
            if st.n:
                by_eps[metric][e] = st
    flags: list[str] = []
    for r in rows:
        flags.extend(row_flags(r))
    return Entry(
        rows=rows,
        dataset=text(first.get("dataset")), threat=text(first.get("threat")), family=text(first.get("family")),
        model=text(first.get("model")), width=first.get("width"), recipe=text(first.get("recipe")),
        train_eps=num(first.get("train_eps")), n_train=num(first.get("n_train")),
        label_noise=num(first.get("label_noise")), seeds=seeds, eps=eps,
        params=Stat.of([num(r.get("params")) for r in rows], confidence),
        ratio=Stat.of([row_ratio(r) for r in rows], confidence),
        ratio_eff=Stat.of([row_ratio(r, "ratio_eff") for r in rows], confidence),
        law_scale=Stat.of([row_law_scale(r) for r in rows], confidence),
        d=Stat.of([num(r.get("d")) for r in rows], confidence),
        d_eff=Stat.of([num(r.get("d_eff")) for r in rows], confidence),
        clean=Stat.of([num(r.get("clean_acc")) for r in rows], confidence),
        pgd=Stat.of([acc_at(r, "pgd_acc", eps) for r in rows], confidence),
        aa=Stat.of([acc_at(r, "autoattack_acc", eps) for r in rows], confidence),
        robust=Stat.of([acc_at(r, "robust_acc", eps) for r in rows], confidence),
        cert=Stat.of([acc_at(r, "cert_acc", eps) for r in rows], confidence),
        lip_upper=Stat.of([num(r.get("lip_upper")) for r in rows], confidence),
        lip_lower=Stat.of([num(r.get("lip_lower")) for r in rows], confidence),
        flags=list(dict.fromkeys(flags)), by_eps=by_eps, radii=_radii(rows),
        unverified=frozenset(e for e in all_eps if any(not verified_at(r, e) for r in rows)),
        flagged=list(dict.fromkeys(f for r in rows for f in flagged(r))),
    )


def _radii(rows: list[dict]) -> tuple:
    """(certified, attacked) median radius over the rows' medians (inf: beyond the search), and where each search
    stopped."""
    out = []
    for key in ("cert_radius", "attack_radius"):
        vs = sorted(v for v in (row_radius(r, key) for r in rows) if v is not None)
        out.append(vs[(len(vs) - 1) // 2] if vs else None)
    tops = [radius_beyond(rows[0], k) for k in ("cert_radius", "attack_radius")]
    return (*out, *tops)


@dataclass
class View:
    key: tuple[str, str]
    entries: list[Entry]
    varying: list[str]  # which of recipe / n_train / label_noise / train_eps differ between entries
    id: str = ""  # unique among the views of one report: view_id(key), suffixed when two keys map to one id

    @property
    def title(self) -> str:
        return view_title(self.key)

    @property
    def rows(self) -> list[dict]:
        return [r for e in self.entries for r in e.rows]


def _label(entry: Entry, varying: list[str]) -> str:
    parts = [f"{entry.model or '?'}-w{text(entry.width) or '?'}"]
    if "recipe" in varying:
        parts.append(entry.recipe or "?")
    if "train_eps" in varying and entry.train_eps is not None:
        parts.append(f"train_eps={entry.train_eps:g}")
    if "n_train" in varying and entry.n_train is not None:
        parts.append(f"n={entry.n_train:g}")
    if "label_noise" in varying and entry.label_noise is not None:
        parts.append(f"noise={entry.label_noise:g}")
    return " · ".join(parts)


def build_views(rows, confidence: float = 0.95) -> list[View]:
    """Ok rows grouped into views (dataset, threat), each a list of entries (configs over seeds) grouped by family and
    sorted by p. Views are sorted by dataset then threat."""
    grouped: dict = defaultdict(lambda: defaultdict(list))
    keys = ConfigKeys()
    for row in rows:
        if isinstance(row, dict) and is_ok(row):
            grouped[view_key(row)][keys(row)].append(row)
    views = []
    for vk in sorted(grouped):
        entries = sorted((make_entry(rs, confidence) for rs in grouped[vk].values()), key=lambda e: e.sort_key)
        varying = [k for k in ("recipe", "train_eps", "n_train", "label_noise")
                   if len({repr(getattr(e, k)) for e in entries}) > 1]
        differences = _setting_differences(entries)
        for e in entries:
            e.label = " · ".join([_label(e, varying), *differences.get(id(e), [])])
        vid = base = view_id(vk)
        taken = {v.id for v in views}
        i = 2
        while vid in taken:
            vid, i = f"{base}-{i}", i + 1
        views.append(View(vk, entries, varying, vid))
    return views


def ranking(view: View) -> list[tuple[int | None, Entry]]:
    """RobustBench-style ranking of a view's entries: robust accuracy at the headline eps (descending), ties broken by
    clean accuracy (descending) then p (ascending). Entries without a robust accuracy come last, unranked (None)."""
    def key(e: Entry):
        return (-(e.robust.mean), -(e.clean.mean if e.clean.mean is not None else -1.0),
                e.params.mean if e.params.mean is not None else math.inf, e.label)
    ranked = sorted((e for e in view.entries if e.robust.mean is not None), key=key)
    rest = [e for e in view.entries if e.robust.mean is None]
    return [(i + 1, e) for i, e in enumerate(ranked)] + [(None, e) for e in rest]


def failed_rows(rows) -> list[dict]:
    """Rows whose status is not "ok" (failed cells), in file order."""
    return [r for r in rows if isinstance(r, dict) and not is_ok(r)]


def view_context(view: View) -> dict:
    """Facts shared by a view's rows, for its heading: n, d, d_eff, label noise, seeds, headline eps values."""
    rows = view.rows
    def uniq(vals):
        return sorted({v for v in vals if v is not None})
    return dict(
        n_train=uniq(num(r.get("n_train")) for r in rows),
        d=uniq(num(r.get("d")) for r in rows),
        d_eff=mean_ci([num(r.get("d_eff")) for r in rows])[0],
        label_noise=uniq(num(r.get("label_noise")) for r in rows),
        seeds=sorted({text(r.get("seed")) for r in rows}),
        eps=dedupe_eps(e.eps for e in view.entries if e.eps is not None),
        families=list(dict.fromkeys(e.family for e in view.entries)),
        rows=len(rows),
        suite=" → ".join(row_suite(rows[0])) if rows else MISSING_SUITE,
    )


def slope_summary(rows, y: str = "lip_lower") -> list[str]:
    """One line per view for the runner to print, e.g.
    'mnist5k · Linf: lip_lower ∝ (p/(n·d))^-0.499, 95% CI [-0.552, -0.446] (3 seeds, 16 points; the law: -0.5)'."""
    from .stats import loglog_slope
    lines = []
    for view in build_views(rows):
        # A slope is fitted across widths of one family: other settings (noise level, recipe, n) are separate fits.
        groups: dict[tuple, list] = {}
        for r in view.rows:
            key = (r.get("model"), r.get("recipe"), r.get("train_eps"), r.get("label_noise"), r.get("n_train"))
            groups.setdefault(key, []).append(r)
        for (model, recipe, train_eps, noise, n), group in groups.items():
            title = view.title
            if len(groups) > 1:
                title += f" · {model} {recipe}" + (f"@{train_eps:g}" if train_eps else "") + f" noise {noise:g} n={n}"
            res = loglog_slope(group, y=y)
            fitted = f"{res['n_interpolating']} of {res['n_interpolating'] + res['n_excluded']} rows interpolate"
            if res["slope"] is None:
                lines.append(f"{title}: {y} slope against p/(n·d) needs two interpolating widths per seed "
                             f"({fitted})")
                continue
            ci = ("" if res["ci_low"] is None else f", 95% CI [{res['ci_low']:.3f}, {res['ci_high']:.3f}]")
            seeds = f"{res['n_seeds']} seed{'s' if res['n_seeds'] != 1 else ''}"
            lines.append(f"{title}: {y} ∝ (p/(n·d))^{res['slope']:.3f}{ci} over interpolating rows ({seeds}; "
                         f"{fitted}; the law's scale: -0.5)")
    return lines
