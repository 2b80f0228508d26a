"""`python -m bench perf --attacks --equivalence`: is our AutoAttack engine the original, within the original's own
randomness? The evidence a default engine needs, per zoo model and eps of the sweep.

Both engines run AutoAttack standard (rand on a randomized model) alone on the same points at several seeds. The test
per model and eps: native's forward and backward passes per point, averaged over the seeds, exceed the original's
mean by no more than the original's own spread over its seeds (a seed's passes follow which attack broke which point:
on the 8-level quantized MLP at 0.1, native's APGD-T broke one point fewer than the original's at seed 0, so FAB-T
spent 900 more backward passes on it, 0.2% of the run, while native kept 5 points robust against the original's
11); on an unmasked model native's mean
robust accuracy over the seeds differs from the original's mean by no more than the original differs from itself (the
largest gap between two of its seeds, at least one point); on a masked model native's mean is at or below the
original's (stronger is no fault there; on a randomized one within the noise of a mean, see verdict).
Numbers, not a
p-value: the original's seed spread is the only yardstick of "the same attack" there is.
"""
from __future__ import annotations

import argparse
import fcntl
import math
import os
import sys
import time

from bench.attacks_perf import MASKED, RANDOMIZED, SWEEP, native, reference, zoo


def compare(model, x, y, eps: float, seeds: int, masked: bool, runs=None, progress=None,
            randomized: bool = False) -> dict:
    """Robust % per seed on both engines, their passes, and the verdict at one eps. ``runs``: the seeds an
    interrupted run ended (records as ``progress(runs)`` is handed after each seed), taken as they are."""
    runs, n = list(runs or []), x.shape[0]
    for s in range(len(runs), seeds):
        t0 = time.perf_counter()
        r_o, p_o = reference(model, x, y, eps, s)
        t1 = time.perf_counter()
        r_n, p_n = native(model, x, y, eps, s)
        runs.append({"original": round(100.0 * float(r_o.float().mean()), 2),
                     "native": round(100.0 * float(r_n.float().mean()), 2),
                     "passes": {"original": p_o.per_point(n), "native": p_n.per_point(n)},
                     "seconds": {"original": round(t1 - t0, 2), "native": round(time.perf_counter() - t1, 2)}})
        if progress and len(runs) < seeds:
            progress(runs)
    return _outcome(runs[:seeds], n, masked, randomized)


def _outcome(runs: list, n: int, masked: bool, randomized: bool) -> dict:
    """The verdict at one eps from each seed's record."""
    seeds, engines, kinds = len(runs), ("original", "native"), ("forward", "backward")
    orig, nat = [r["original"] for r in runs], [r["native"] for r in runs]
    per_seed = {e: [r["passes"][e] for r in runs] for e in engines}
    spread = max(max(orig) - min(orig), 100.0 / n)
    gap = sum(nat) / seeds - sum(orig) / seeds
    passes = {e: {k: round(sum(p[k] for p in per_seed[e]) / seeds, 2) for k in kinds} for e in engines}
    # a seed's passes follow which attack broke which point: the original's own spread over seeds is the yardstick
    spread_passes = {k: round(max(p[k] for p in per_seed["original"]) - min(p[k] for p in per_seed["original"]), 2)
                     for k in kinds}
    out = {"original": orig, "native": nat, "gap": round(gap, 2), "original_spread": round(spread, 2),
           "passes_per_point": passes, "passes_per_seed": per_seed, "original_passes_spread": spread_passes,
           "point_evaluations": n * seeds,
           "seconds_per_seed": {e: [r["seconds"][e] for r in runs] for e in engines}}
    return {**out, "native_more_passes": more_passes(out, randomized), "equivalent": verdict(out, masked, randomized)}


def _noise(v: dict, randomized: bool) -> float:
    """The share of a spread a randomized model's mean may add: its spread over sqrt(seeds), about two standard
    errors of a mean of 4 seeds (the range of 4 normal draws is about 2 sigma); 0 on a deterministic model."""
    return 1.0 / math.sqrt(len(v["original"])) if randomized else 0.0


def more_passes(v: dict, randomized: bool = False) -> bool:
    """Native's mean passes per point above the original's by more than the original's own spread over its seeds
    (on a randomized model plus the noise of a mean: which points are attacked at all is a vote there)."""
    pp, spread = v["passes_per_point"], v["original_passes_spread"]
    return any(pp["native"][k] > pp["original"][k] + spread[k] * (1 + _noise(v, randomized))
               for k in ("forward", "backward"))


def verdict(v: dict, masked: bool, randomized: bool = False) -> bool:
    """The test at one eps (masked: stronger is no fault); saved results are judged again by it as they are read.
    On a randomized model "at or below" is read within the noise of a mean: each verdict there is a draw, and the
    original differs from itself by its seed spread (9.6 to 10.8 on the noisy MLP at 0.1), so the same engine run
    twice would fail a strict test half the time (see _noise)."""
    gap, spread = v["gap"], v["original_spread"]
    return (gap <= spread * _noise(v, randomized) if masked else abs(gap) <= spread) and not more_passes(v, randomized)


def _judged(name: str, per: dict) -> dict:
    """A model's saved results per eps, each with its verdict by today's test and today's MASKED; an eps whose
    seeds an interrupted run did not all end (``partial``) is left out."""
    return {e: {**v, "native_more_passes": more_passes(v, name in RANDOMIZED),
                "equivalent": verdict(v, name in MASKED, name in RANDOMIZED)}
            for e, v in per.items() if "partial" not in v}


def fingerprint(model) -> str:
    """The model's weights, hashed: saved results are taken again only for the same weights (a zoo retrained on
    another machine or torch may differ in the last bits)."""
    import hashlib
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def measure(quick: bool, cache, n_points: int, seeds: int, pattern: str, log, save=None, done=None) -> dict:
    """Every matching zoo model at every eps of the sweep; `save(res)` after each seed (a long run keeps what ended).
    ``done`` ({model: {eps: result}}, measured on the same points and seeds) is taken as it is where it was measured
    on the same weights, not run again."""
    models, x_test, y_test = zoo(quick, cache, log, pattern)
    x, y = x_test[:n_points], y_test[:n_points]
    res = {"n": n_points, "seeds": seeds, "sweep": list(SWEEP), "models": {}, "equivalent_all": True}
    for name, model in models.items():
        log(f"{name}:")
        per = res["models"][name] = {}
        weights = fingerprint(model)
        mine = {e: v for e, v in (done or {}).get(name, {}).items() if v.get("weights") == weights}
        earlier = _judged(name, mine)
        for e in SWEEP:
            kept = earlier.get(str(e))

            def progress(runs, e=e):  # after each seed: a CNN's eps takes an hour on one core
                per[str(e)] = {"partial": runs, "weights": weights}
                if save:
                    save(res)
            began = mine.get(str(e), {}).get("partial", [])
            v = per[str(e)] = kept or {**compare(model, x, y, e, seeds, name in MASKED, began, progress,
                                                 name in RANDOMIZED),
                                       "weights": weights}
            log(f"  @{e}{' (saved)' if kept else f' (resumed after {len(began)} seeds)' if began else ''}: "
                f"original {v['original']} native {v['native']} "
                f"gap {v['gap']:+.2f} (spread {v['original_spread']:.2f}) passes {v['passes_per_point']} "
                f"{'equivalent' if v['equivalent'] else 'NOT equivalent'}")
            res["equivalent_all"] &= v["equivalent"]
            if save:  # after each eps: a CNN's four take hours
                save(res)
    return res


def _read(path) -> dict:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def summary(cache, names, quick: bool = False, weights: dict | None = None) -> dict:
    """The saved verdicts of the zoo models ``names`` ({model: {eps: equivalent}}, None where never measured) and
    the run's settings: what bench perf --attacks reports beside its own measurements. ``weights`` ({model:
    fingerprint}): only verdicts measured on these weights count (a file copied from another machine's zoo)."""
    res = _read(saved(cache, quick))
    models = {name: {e: v for e, v in _judged(name, per).items()
                     if weights is None or v.get("weights") == weights.get(name)}
              for name, per in res.get("models", {}).items()}
    return {"points": res.get("n"), "seeds": res.get("seeds"),
            "models": {m: ({e: v["equivalent"] for e, v in models[m].items()} if models.get(m) else None)
                       for m in names},
            "command": "python -m bench perf --attacks --equivalence"}


def saved(cache, quick: bool = False) -> "Path":
    """Where the last --equivalence run keeps its results beside the zoo (bench perf --attacks reports them); the
    tiny --quick zoo's apart."""
    from pathlib import Path
    return Path(cache) / f"equivalence{'-quick' if quick else ''}.json"


def main(argv) -> int:
    import hashlib
    from pathlib import Path
    from bench.zoo import cache_dir, write_json
    p = argparse.ArgumentParser(prog="python -m bench perf --attacks --equivalence", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny models and points (a smoke test)")
    p.add_argument("--points", type=int, default=None, help="test points per seed (default 250)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per engine (default 4: 1,000 point-evaluations)")
    p.add_argument("--models", default="*", help="only the zoo models matching these comma-separated patterns")
    p.add_argument("--cache", default=None, help="folder for the trained zoo")
    p.add_argument("--again", action="store_true",
                   help="measure again what an earlier run saved on the same points, seeds and weights "
                        "(default: keep it)")
    p.add_argument("--keep", metavar="FILE", default=None,
                   help="where the results are merged seed by seed and an interrupted run resumes from (default: "
                        "beside the zoo, where bench perf --attacks reads them)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        print("bench perf --attacks --equivalence: --seeds must be at least 2 (a spread needs two)", file=sys.stderr)
        return 2
    if args.points is not None and args.points < 1:
        print(f"bench perf --attacks --equivalence: --points must be at least 1, got {args.points}", file=sys.stderr)
        return 2
    n = args.points or (8 if args.quick else 250)
    cache = cache_dir(args.cache)
    keep = Path(args.keep) if args.keep else saved(cache, args.quick)
    try:
        keep.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if keep.is_dir() or not os.access(keep.parent, os.W_OK) or (keep.exists() and not os.access(keep, os.W_OK)):
        print(f"bench perf --attacks --equivalence: cannot write {keep}", file=sys.stderr)
        return 2
    kept = _read(keep)
    if kept.get("models") and (kept.get("n"), kept.get("seeds")) != (n, args.seeds):
        print(f"bench perf --attacks --equivalence: {keep} holds results on {kept.get('n')} points x "
              f"{kept.get('seeds')} seeds, not {n} x {args.seeds}: give those, or another --keep FILE",
              file=sys.stderr)
        return 2

    def save(r):  # beside the zoo, merged eps by eps with earlier (or concurrent) runs' results; and --json
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"equivalence-{hashlib.sha256(str(keep.resolve()).encode()).hexdigest()[:12]}.lock",
                  "w") as lock:  # beside the zoo, not beside FILE (a repository's folder, say)
            fcntl.flock(lock, fcntl.LOCK_EX)
            models = _read(keep).get("models", {})
            for name, per in r["models"].items():  # results on other weights than this run's are dropped
                weights = {v.get("weights") for v in per.values()}
                models[name] = {**{e: v for e, v in models.get(name, {}).items() if v.get("weights") in weights},
                                **per}
            judged = {name: _judged(name, per) for name, per in models.items()}  # partial eps stay as they are
            models = {name: {**per, **judged[name]} for name, per in models.items()}
            write_json(keep, {**r, "models": models, "equivalent_all": all(
                v["equivalent"] for per in judged.values() for v in per.values())})
        if args.json:
            write_json(args.json, r)
    before = _read(keep)
    same = before.get("n") == n and before.get("seeds") == args.seeds and not args.again
    res = measure(args.quick, cache, n, args.seeds, args.models, lambda m: print(m, file=sys.stderr, flush=True),
                  save, before.get("models") if same else None)
    if not res["models"]:
        print(f"bench perf --attacks --equivalence: no zoo model matches --models {args.models!r}", file=sys.stderr)
        return 2
    for name, per in res["models"].items():
        for e, v in per.items():
            print(f"{name} @{e}: original {v['original']} native {v['native']} gap {v['gap']:+.2f} "
                  f"(spread {v['original_spread']:.2f}) {'equivalent' if v['equivalent'] else 'NOT equivalent'}")
    print(f"equivalent on every model and eps: {res['equivalent_all']}")
    if args.json:
        write_json(args.json, res)
    return 0
