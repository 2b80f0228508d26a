"""`python -m bench perf --attacks --masked [--json FILE] [--models PATTERN] [--points N]`: the adaptive stage on the
masked zoo (bench.masked_zoo), against pyautoattack and a hand-written adaptive reference per model, and its
indicators on the unmasked zoo models (bench.attacks_perf), in one run.

Per model and eps of its sweep, on the same points (class-balanced: the first of each digit) and seed: the robust
accuracy of our default pipeline as the CLI runs it (PGD sweep, the fast suite at every eps but the headline,
AutoAttack standard at the headline, the adaptive stage at every eps), of pyautoattack alone (standard; rand on a
randomized model, its examples judged by the majority of 25 draws; at eps·(1−2⁻²⁰)), of the model's hand-written
reference (masked models), and the indicators of attack failure that fired. Times: the adaptive stage over the sweep
against pyautoattack over the sweep.

JSON keys: ``adaptive_gap_max`` (max over masked models and eps of row − reference, points), ``aa_excess_max`` (max
over every model and eps of row − pyautoattack, points; above 0: the row above AutoAttack), ``indicator_false_alarms``
(indicators that fired on the unmasked models, counted over models and eps), ``adaptive_time_ratio_max`` (max over
masked models of the adaptive stage's seconds over pyautoattack's, whole sweep), ``unmasked_adaptive_share_max``
(max over unmasked models of the adaptive stage's seconds over the pipeline's), and per model the details.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

HEADLINE = {"Linf": 0.1, "L2": 1.0}
UNMASKED = ("mlp-erm", "mlp-pgdat", "cnn-erm", "cnn-pgdat")


def pipeline(model, x, y, norm: str, sweep, seed: int = 0):
    """Our default suite as the CLI runs it on one cell: the robust_eval result."""
    from lawbench.attacks import SuiteStep, robust_eval
    head = HEADLINE[norm]
    steps = [SuiteStep("fast", tuple(e for e in sweep if e != head), {"steps": 0}),
             SuiteStep("autoattack", (head,), {"version": "standard"}),
             SuiteStep("adaptive", tuple(sweep), {})]
    return robust_eval(model, x, y, norm=norm, eps=list(sweep), steps=100, restarts=1, seed=seed,
                       aa_batch_size=x.shape[0], suite=steps)


def bench_model(name, model, x, y, norm, sweep, ref_fn, log, seed: int = 0) -> dict:
    from bench.attacks_perf import reference
    n = x.shape[0]
    acc = lambda mask: round(100 * float(mask.float().sum()) / n, 2)  # noqa: E731
    t0 = time.perf_counter()
    log(f"{name}: our pipeline ...")
    ev = pipeline(model, x, y, norm, sweep, seed)
    t_pipe = time.perf_counter() - t0
    per_eps, t_aa = {}, 0.0
    for e in sweep:
        log(f"  pyautoattack at {e} ...")
        t = time.perf_counter()
        aa, _ = reference(model, x, y, e, seed, norm)
        t_aa += time.perf_counter() - t
        ref = None
        if ref_fn is not None:
            log(f"  hand-written reference at {e} ...")
            ref = ref_fn(x, y, e, seed)
        ind = ev.info["indicators"].get(e, {})
        d = (ev.info["details"].get("adaptive") or {}).get(e, {})
        per_eps[str(e)] = {"row": acc(ev.robust[e]), "autoattack": acc(aa),
                           "reference": None if ref is None else acc(ref),
                           "gap": None if ref is None else round(acc(ev.robust[e]) - acc(ref), 2),
                           "aa_excess": round(acc(ev.robust[e]) - acc(aa), 2),
                           "ref_misses": None if ref is None else int((~ref & ev.robust[e]).sum()),
                           "fired": sorted(k for k, v in ind.items() if v.get("fired")),
                           "adaptive_ran": bool(d.get("ran")), "adaptive_broke": d.get("broke"),
                           "ops": d.get("ops"), "eot": d.get("eot")}
    t_ad = ev.info["seconds"].get("adaptive", 0.0)
    return {"norm": norm, "clean": acc(ev.clean), "eps": per_eps, "flags": ev.aa_flags,
            "seconds_pipeline": round(t_pipe, 2), "seconds_adaptive": round(t_ad, 2),
            "seconds_autoattack_sweep": round(t_aa, 2), "seconds_stages": {k: round(v, 2) for k, v in
                                                                          ev.info["seconds"].items()},
            "adaptive_time_ratio": round(t_ad / max(t_aa, 1e-9), 3),
            "adaptive_share": round(t_ad / max(t_pipe, 1e-9), 3)}


def balanced(x, y, n: int):
    """The first n // C test points of each class, in the test set's order (mnist5k's test set is sorted by label:
    its first 200 points are zeros and ones), then the next ones of any class up to n."""
    classes = torch.unique(y)
    per = max(1, n // len(classes))
    pick = torch.cat([(y == c).nonzero().flatten()[:per] for c in classes])
    rest = torch.ones_like(y, dtype=torch.bool)
    rest[pick] = False
    pick = torch.cat([pick, rest.nonzero().flatten()[: max(0, n - pick.numel())]]).sort().values
    return x[pick], y[pick]


def measure(cache, n_points: int, pattern: str, log, quick: bool = False, partial=None) -> dict:
    """The benchmark; ``partial(res)`` is called after each model (the CLI writes the JSON so far: a long run that
    is stopped keeps what it measured)."""
    from bench.attacks_perf import SWEEP, zoo
    from bench.masked_zoo import masked_zoo
    import fnmatch
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    want = [m for m in UNMASKED if any(fnmatch.fnmatch(m, p) for p in pats)]
    masked, x_test, y_test = masked_zoo(cache, log, pattern, quick)
    x, y = balanced(x_test, y_test, n_points)
    res = {"n": n_points, "quick": quick, "threads": torch.get_num_threads(), "models": {}}
    for name, zm in masked.items():
        res["models"][name] = {"masked": True, "masking": zm.masking,
                               **bench_model(name, zm.model, x, y, zm.norm, zm.eps, zm.reference, log)}
        if partial:
            partial(res)
    if want:
        plain, _, _ = zoo(quick, cache, log, ",".join(want))
        for name, model in plain.items():
            res["models"][name] = {"masked": False, **bench_model(name, model, x, y, "Linf", SWEEP, None, log)}
            if partial:
                partial(res)
    per = res["models"]
    masked_rows = [m for m in per.values() if m["masked"]]
    unmasked_rows = [m for m in per.values() if not m["masked"]]
    gaps = [v["gap"] for m in masked_rows for v in m["eps"].values() if v["gap"] is not None]
    res["adaptive_gap_max"] = max(gaps) if gaps else None
    res["aa_excess_max"] = max((v["aa_excess"] for m in per.values() for v in m["eps"].values()), default=None)
    res["indicator_false_alarms"] = (sum(len(v["fired"]) for m in unmasked_rows for v in m["eps"].values())
                                     if unmasked_rows else None)
    res["adaptive_time_ratio_max"] = max((m["adaptive_time_ratio"] for m in masked_rows), default=None)
    res["unmasked_adaptive_share_max"] = max((m["adaptive_share"] for m in unmasked_rows), default=None)
    res["targets"] = {"adaptive_gap_max<=1.0": res["adaptive_gap_max"] is not None and res["adaptive_gap_max"] <= 1.0,
                      "aa_excess_max<=0": res["aa_excess_max"] is not None and res["aa_excess_max"] <= 0,
                      "indicator_false_alarms==0": res["indicator_false_alarms"] == 0,
                      "adaptive_time_ratio_max<=1": res["adaptive_time_ratio_max"] is not None
                      and res["adaptive_time_ratio_max"] <= 1.0}
    return res


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"bench perf --attacks --masked: robust accuracy (%) per eps, row / pyautoattack / reference, "
                    f"{res['n']} points")
    for col in ("model", "threat", "clean", "eps 1", "eps 2", "eps 3", "eps 4", "adaptive s", "AA s (sweep)",
                "adaptive/AA", "indicators fired (any eps)"):
        t.add_column(col, justify="left" if col in ("model", "indicators fired (any eps)") else "right")
    for name, m in res["models"].items():
        cells = []
        for e, v in m["eps"].items():
            ref = "–" if v["reference"] is None else f"{v['reference']:.1f}"
            cells.append(f"{e}: {v['row']:.1f} / {v['autoattack']:.1f} / {ref}")
        cells += [""] * (4 - len(cells))
        fired = sorted({f for v in m["eps"].values() for f in v["fired"]})
        t.add_row(name, m["norm"], f"{m['clean']:.1f}", *cells, f"{m['seconds_adaptive']:.1f}",
                  f"{m['seconds_autoattack_sweep']:.1f}", f"{m['adaptive_time_ratio']:.2f}", ", ".join(fired))
    Console(width=220).print(t)
    for key in ("adaptive_gap_max", "aa_excess_max", "indicator_false_alarms", "adaptive_time_ratio_max",
                "unmasked_adaptive_share_max"):
        print(f"{key} = {res[key]}")
    for k, ok in res["targets"].items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")


def main(argv=None) -> int:
    from bench.zoo import cache_dir, write_json
    p = argparse.ArgumentParser(prog="python -m bench perf --attacks --masked", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny models and points (a smoke test)")
    p.add_argument("--points", type=int, default=None, help="test points attacked (default 200)")
    p.add_argument("--models", default="*", help="only the models matching these comma-separated patterns "
                   "(masked zoo names such as 'quant*' or 'noise-linf', and the unmasked mlp-erm, mlp-pgdat, cnn-erm, "
                   "cnn-pgdat)")
    p.add_argument("--cache", default=None, help="folder for the trained zoo")
    args = p.parse_args(argv)
    n = args.points or (12 if args.quick else 200)
    import logging
    lg = logging.getLogger("auto-attack")  # pyautoattack's warnings are the flags the table shows
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        res = measure(cache_dir(args.cache), n, args.models, lambda m: print(m, file=sys.stderr, flush=True),
                      args.quick, (lambda r: write_json(args.json, r)) if args.json else None)
    finally:
        lg.setLevel(old)
    if not res["models"]:
        print(f"bench perf --attacks --masked: no model matches --models {args.models!r}", file=sys.stderr)
        return 2
    _print(res)
    if args.json:
        write_json(args.json, res)
    return 0
