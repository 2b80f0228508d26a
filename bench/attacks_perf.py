"""`python -m bench perf --attacks [--json FILE] [--quick] [--models PATTERN]`: pyautoattack alone, our default
pipeline and the fast suite on a zoo of nine models trained here, at every eps of the default sweep, in one run.

The zoo (MNIST-5k, cached like `bench perf`'s models): an undefended MLP, a PGD-trained MLP, a small CNN, a
PGD-trained CNN, and five models built to fool evaluations, all the undefended MLP behind a front end: input
quantization to 8, 16 and 256 levels (zero gradient almost everywhere), logits multiplied by 1e4 (cross-entropy
saturates) and Gaussian input noise at every forward pass (randomized). Per model, on the same points and seed, at
every eps of the sweep: robust accuracy of pyautoattack alone (standard; rand for the randomized model, its examples
judged by the majority of VOTE_DRAWS (25) draws, as ours are; at eps·(1−2⁻²⁰), inside the exact ball), of our default
pipeline (PGD sweep, the fast suite at every eps but the headline, AutoAttack standard at the headline) and of the
fast suite at every eps, and of our AutoAttack engine alone (native, attacks.standard) at every eps beside the
original. Times: pyautoattack at the headline eps alone against each of ours over the whole sweep; native against
the original over the sweep. Forward and backward passes are counted around the model for every method
(attacks.cost): the figure that holds on any machine.

JSON keys: ``gap_max_all_eps`` (max over models, eps and both of ours of ours − pyautoattack, in points),
``masked_pipeline_time_ratio`` (max over the scaled, 16- and 256-level and noisy models of our pipeline over the
whole sweep against pyautoattack at the headline eps alone), ``masked_fast_time_ratio`` (the same for the fast suite
at the headline eps alone), ``pipeline_time_ratio``, ``fast_time_ratio`` (the same over every model),
``fast_sweep_time_ratio`` (fast over the sweep against pyautoattack at every eps of it), the headline gaps
``fast_acc_gap_max``, ``pipeline_acc_gap_max``; ``native_time_ratio`` (max over models of native's seconds over the
original's, whole sweep), ``native_gap_max`` (max over models and eps of native − original, points),
``native_agreement_min`` (min over models and eps of the share of points with the same verdict),
``fast_backward_ratio`` (max over models of the fast suite's backward passes at the headline over AutoAttack's),
``passes_per_point`` (per method: forward and backward passes per point at the headline, averaged over models;
the pipeline's over its whole sweep), ``fast_gap_max`` (max over models and eps of the fast suite − pyautoattack,
points; ``fast_gap_max_deterministic`` the same without the randomized model, whose verdicts are draws),
``equivalence`` (per model and eps, the verdict of the last ``--equivalence`` run kept beside the zoo; None
where it never ran), and per model the details.
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import sys
import time
from pathlib import Path

import torch

from bench.masked_zoo import Noise, Quantize, Scale  # noqa: F401  (the masking modules, declared once)


SWEEP = (0.05, 0.1, 0.2, 0.3)  # the default Linf sweep: every eps is compared with the reference
# built to fool evaluations (the 8-level quantizer zeroes the input gradient of nearly every point): the cost targets
# are theirs, and an engine stronger than the original there is no fault
MASKED = ("mlp-quantized", "mlp-scaled", "mlp-quant16", "mlp-quant256", "mlp-noisy")
RANDOMIZED = ("mlp-noisy",)  # fresh noise at every forward: each verdict is a draw (the rand version runs on it)


def zoo(quick: bool, cache: Path, log, pattern: str = "*") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The zoo's models whose names match `pattern` (comma-separated patterns; only those are trained), and the test
    points."""
    from lawbench.datasets import load_dataset
    from lawbench.models import get_model

    from bench.zoo import small_cnn, trained as _trained
    from bench.train import TrainConfig, train
    split = load_dataset("mnist5k", n_train=400 if quick else None, seed=0)
    xtr, ytr = split.x_train, split.y_train
    in_shape = tuple(split.meta.in_shape)
    tag = f"{'q' if quick else 'f'}{len(xtr)}"
    width = 32 if quick else 512

    def mlp():
        torch.manual_seed(0)
        return get_model("mlp", in_shape=in_shape, num_classes=10, width=width)

    def cnn():
        torch.manual_seed(0)
        return small_cnn()

    erm = TrainConfig(recipe="erm", epochs=2 if quick else 30, seed=0)
    at = TrainConfig(recipe="pgd-at", epochs=1 if quick else 20, train_eps=0.1, train_norm="Linf", train_steps=10,
                     train_eps_warmup=0 if quick else 5, seed=0)
    cnn_erm = TrainConfig(recipe="erm", epochs=1 if quick else 3, seed=0)
    cnn_at = TrainConfig(recipe="pgd-at", epochs=1 if quick else 8, train_eps=0.2, train_norm="Linf",
                         train_steps=10, train_eps_warmup=0 if quick else 2, seed=0)
    dev = torch.device("cpu")
    fit = lambda cfg: (lambda m: train(m, xtr, ytr, cfg, dev))  # noqa: E731
    base = lambda: _trained(f"mlp{width}-erm-{tag}", mlp, fit(erm), cache, log)[0]  # noqa: E731
    front = lambda layer, after=False: (lambda: torch.nn.Sequential(  # noqa: E731
        *((base(), layer) if after else (layer, base()))).eval())
    build = {
        "mlp-erm": base,
        "mlp-pgdat": lambda: _trained(f"mlp{width}-pgdat0.1-{tag}", mlp, fit(at), cache, log)[0],
        "cnn-erm": lambda: _trained(f"cnn16-erm-{tag}", cnn, fit(cnn_erm), cache, log)[0],
        "cnn-pgdat": lambda: _trained(f"cnn16-pgdat0.2-{tag}", cnn, fit(cnn_at), cache, log)[0],
        "mlp-quantized": front(Quantize(8)),
        "mlp-scaled": front(Scale(1e4), after=True),
        "mlp-quant16": front(Quantize(16)),
        "mlp-quant256": front(Quantize(256)),
        "mlp-noisy": front(Noise(0.1)),
    }
    models = {name: make() for name, make in build.items()
              if any(fnmatch.fnmatch(name, p.strip()) for p in pattern.split(","))}
    return models, split.x_test, split.y_test


def reference(model, x, y, eps, seed, norm: str = "Linf"):
    """(robust mask, passes) of pyautoattack alone, as a user runs it: standard, or its rand version (EOT 20) for a
    randomized model with each example judged by the majority of VOTE_DRAWS draws (as ours); at eps·(1−2⁻²⁰) so that
    its float32 clipping stays inside the exact ball (an ulp outside, a quantizer rounds an example back). Its
    forward and backward passes are counted around the model (attacks.cost). A model whose forward cuts the autograd
    graph (a thermometer code of comparisons) crashes pyautoattack's APGD: it is shown the model with its logits kept
    attached to the input (exact zero gradients, attacks.autoattack._Connected), as a user would have to."""
    from pyautoattack import AutoAttack
    from lawbench.attacks import is_randomized
    from lawbench.attacks.autoattack import _Connected, _frozen
    from lawbench.attacks.cost import Counted
    from lawbench.attacks.randomized import Randomized
    from lawbench.attacks.threat import misclassified
    rand = is_randomized(model, x)
    net = Counted(_Connected(model))
    with torch.random.fork_rng(), _frozen(model):  # parameters frozen: _Connected sees an output cut from the input
        aa = AutoAttack(net, norm=norm, eps=eps * (1 - 2 ** -20), version="rand" if rand else "standard",
                        device=x.device, seed=seed)
        xa, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return ~misclassified(Randomized(net) if rand else net, xa, y), net.passes


def native(model, x, y, eps, seed):
    """(robust mask, passes) of our AutoAttack engine alone (attacks.standard), run as the reference is: standard, or
    the rand version on a randomized model, at the reference's radius eps·(1−2⁻²⁰). Our engine needs no such margin
    (its boxes are the exact ball's), but a comparison of algorithms is made at one radius: a quantizer's rounding
    edge lies exactly at eps."""
    from lawbench.attacks.randomized import is_randomized, randomized
    from lawbench.attacks.autoattack import run_autoattack
    from lawbench.attacks.cost import Passes
    net = randomized(model) if is_randomized(model, x) else model
    res = run_autoattack(net, x, y, eps * (1 - 2 ** -20), norm="Linf", version="standard", seed=seed,
                         batch_size=x.shape[0], impl="native")
    return res.robust, Passes(**res.info["passes"])


def _ours(model, x, y, eps, seed, suite, impl):
    """Our default pipeline (PGD sweep, the fast suite at every eps but the headline, AutoAttack standard at the
    headline) or the fast suite alone at every eps, over the sweep SWEEP with the headline `eps`."""
    from lawbench.attacks import SuiteStep, robust_eval
    sweep = sorted(set(SWEEP) | {eps})
    if suite == "pipeline":
        steps = [SuiteStep("fast", tuple(e for e in sweep if e != eps), {"steps": 0, "impl": impl}),  # as the CLI
                 SuiteStep("autoattack", (eps,), {"version": "standard", "impl": impl})]
    elif suite == "fast-headline":
        sweep = [eps]
        steps = [SuiteStep("fast", (eps,), {"impl": impl})]
    else:
        steps = [SuiteStep("fast", tuple(sweep), {"impl": impl})]
    return robust_eval(model, x, y, norm="Linf", eps=sweep, steps=100, restarts=1, seed=seed,
                       aa_batch_size=x.shape[0], pgd=suite == "pipeline", suite=steps)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _passes(ev) -> "Passes":
    """All passes a robust_eval spent, over its stages and eps."""
    from lawbench.attacks.cost import Passes
    total = Passes()
    for per_eps in ev.info["passes"].values():
        for p in per_eps.values():
            total = total + Passes(**p)
    return total


def bench_model(model, x, y, eps, seed, log, impl) -> dict:
    n = x.shape[0]
    acc = lambda mask: round(100 * float(mask.float().sum()) / n, 2)  # noqa: E731
    sweep = sorted(set(SWEEP) | {eps})
    ref, t_ref, p_ref, nat, t_nat, p_nat = {}, {}, {}, {}, {}, {}
    for e in sweep:
        log(f"  pyautoattack alone at {e} ...")
        t_ref[e], (ref[e], p_ref[e]) = _timed(lambda: reference(model, x, y, e, seed))
        log(f"  native AutoAttack alone at {e} ...")
        t_nat[e], (nat[e], p_nat[e]) = _timed(lambda: native(model, x, y, e, seed))
    log(f"  our pipeline (PGD sweep, fast at every other eps, AutoAttack standard at the headline; {impl}) ...")
    t_pipe, r_pipe = _timed(lambda: _ours(model, x, y, eps, seed, "pipeline", impl))
    log("  fast suite at every eps ...")
    t_sweep, r_fast = _timed(lambda: _ours(model, x, y, eps, seed, "fast", impl))
    log("  fast suite at the headline eps alone ...")
    t_fast, r_head = _timed(lambda: _ours(model, x, y, eps, seed, "fast-headline", impl))
    t_aa = t_ref[eps]
    native_eps = {str(e): {"native": acc(nat[e]), "native_gap": round(acc(nat[e]) - acc(ref[e]), 2),
                           "native_agreement": round(float((nat[e] == ref[e]).float().mean()), 4),
                           "native_misses": int((~ref[e] & nat[e]).sum())} for e in sweep}
    per_point = {"autoattack": p_ref[eps].per_point(n), "native": p_nat[eps].per_point(n),
                 "pipeline": _passes(r_pipe).per_point(n), "fast": _passes(r_head).per_point(n)}
    per_eps = {str(e): {"autoattack": acc(ref[e]), "pipeline": acc(r_pipe.robust[e]), "fast": acc(r_fast.robust[e]),
                        "pipeline_gap": round(acc(r_pipe.robust[e]) - acc(ref[e]), 2),
                        "fast_gap": round(acc(r_fast.robust[e]) - acc(ref[e]), 2),
                        "pipeline_verified": bool(r_pipe.info["verified"][e]),
                        "fast_misses": int((~ref[e] & r_fast.robust[e]).sum()), **native_eps[str(e)]} for e in sweep}
    gaps = [v[k] for v in per_eps.values() for k in ("pipeline_gap", "fast_gap")]
    gaps.append(round(acc(r_head.robust[eps]) - acc(ref[eps]), 2))
    return {
        "n": n, "clean": acc(r_pipe.clean), "eps": per_eps,
        "acc_autoattack": acc(ref[eps]), "acc_pipeline": acc(r_pipe.robust[eps]), "acc_fast": acc(r_fast.robust[eps]),
        "seconds_autoattack": round(t_aa, 2), "seconds_autoattack_sweep": round(sum(t_ref.values()), 2),
        "seconds_pipeline": round(t_pipe, 2), "seconds_fast": round(t_fast, 2), "seconds_fast_sweep": round(t_sweep, 2),
        "fast_time_ratio": round(t_fast / t_aa, 3), "pipeline_time_ratio": round(t_pipe / t_aa, 3),
        "fast_sweep_time_ratio": round(t_sweep / sum(t_ref.values()), 3),
        "acc_fast_headline": acc(r_head.robust[eps]),
        "fast_acc_gap": round(acc(r_head.robust[eps]) - acc(ref[eps]), 2),
        "pipeline_acc_gap": per_eps[str(eps)]["pipeline_gap"],
        "gap_max_all_eps": max(gaps),
        "fast_stages": r_fast.info["details"].get("fast", {}), "flags_fast": r_fast.aa_flags,
        "flags_pipeline": r_pipe.aa_flags,
        "fast_misses": per_eps[str(eps)]["fast_misses"],  # points AutoAttack breaks that fast keeps
        "impl": impl,
        "seconds_native_sweep": round(sum(t_nat.values()), 2),
        "native_time_ratio": round(sum(t_nat.values()) / sum(t_ref.values()), 3),
        "native_gap_max": max(v["native_gap"] for v in native_eps.values()),
        "native_agreement_min": min(v["native_agreement"] for v in native_eps.values()),
        "native_pass_ratio": {k: round(getattr(p_nat[eps], k) / max(getattr(p_ref[eps], k), 1), 3)
                              for k in ("forward", "backward")},
        "fast_backward_ratio": round(_passes(r_head).backward / max(p_ref[eps].backward, 1), 3),
        "passes_per_point": per_point,
    }


def measure(quick: bool, cache: Path, n_points: int, eps: float, log, pattern: str = "*",
            impl: str | None = None) -> dict:
    models, x_test, y_test = zoo(quick, cache, log, pattern)
    if not models:  # main refuses it in one line
        return {"models": {}}
    x, y = x_test[:n_points], y_test[:n_points]
    lg = logging.getLogger("auto-attack")
    old = lg.level
    lg.setLevel(logging.WARNING)
    from bench.spec import AUTOATTACK_IMPL
    impl = impl or AUTOATTACK_IMPL
    res = {"quick": quick, "n": n_points, "eps": eps, "sweep": sorted(set(SWEEP) | {eps}),
           "threads": torch.get_num_threads(), "impl": impl, "models": {}}
    try:
        for name, model in models.items():
            log(f"{name}:")
            res["models"][name] = bench_model(model, x, y, eps, 0, log, impl)
    finally:
        lg.setLevel(old)
    per = res["models"]
    masked = [m for k, m in per.items() if k in MASKED] or list(per.values())
    res["fast_acc_gap_max"] = max(m["fast_acc_gap"] for m in per.values())
    res["pipeline_acc_gap_max"] = max(m["pipeline_acc_gap"] for m in per.values())
    res["gap_max_all_eps"] = max(m["gap_max_all_eps"] for m in per.values())
    res["fast_time_ratio"] = max(m["fast_time_ratio"] for m in per.values())
    res["pipeline_time_ratio"] = max(m["pipeline_time_ratio"] for m in per.values())
    res["masked_pipeline_time_ratio"] = max(m["pipeline_time_ratio"] for m in masked)
    res["masked_fast_time_ratio"] = max(m["fast_time_ratio"] for m in masked)
    res["fast_sweep_time_ratio"] = max(m["fast_sweep_time_ratio"] for m in per.values())
    res["native_time_ratio"] = max(m["native_time_ratio"] for m in per.values())
    res["native_gap_max"] = max(m["native_gap_max"] for m in per.values())
    res["native_agreement_min"] = min(m["native_agreement_min"] for m in per.values())
    res["fast_backward_ratio"] = max(m["fast_backward_ratio"] for m in per.values())
    res["fast_gap_max"] = max(v["fast_gap"] for m in per.values() for v in m["eps"].values())
    # a randomized model's verdicts are draws (the reference's own two seeds differ by points there): apart
    steady = [m for m in per.values() if "randomized" not in m["flags_fast"]] or list(per.values())
    res["fast_gap_max_deterministic"] = max(v["fast_gap"] for m in steady for v in m["eps"].values())
    n_all = n_points * len(per)
    res["passes_per_point"] = {
        k: {d: round(sum(m["passes_per_point"][k][d] for m in per.values()) * n_points / n_all, 2)
            for d in ("forward", "backward")} for k in ("autoattack", "native", "pipeline", "fast")}
    from bench.equivalence import fingerprint, summary
    res["equivalence"] = summary(cache, list(per), quick, {name: fingerprint(m) for name, m in models.items()})
    pp = res["passes_per_point"]["fast"]
    res["targets"] = {"native_gap_max<=0.2": res["native_gap_max"] <= 0.2,
                      "native_agreement_min>=0.99": res["native_agreement_min"] >= 0.99,
                      "native_time_ratio<=0.75": res["native_time_ratio"] <= 0.75,
                      "passes_per_point.fast<=650+320": pp["forward"] <= 650 and pp["backward"] <= 320,
                      "fast_gap_max<=0.1": res["fast_gap_max"] <= 0.1,
                      "pipeline_time_ratio<=0.6": res["pipeline_time_ratio"] <= 0.6,
                      "fast_backward_ratio<=0.1": res["fast_backward_ratio"] <= 0.1,
                      "gap_max_all_eps<=0.5": res["gap_max_all_eps"] <= 0.5,
                      "masked_pipeline_time_ratio<=1.5": res["masked_pipeline_time_ratio"] <= 1.5,
                      "masked_fast_time_ratio<=0.5": res["masked_fast_time_ratio"] <= 0.5}
    if torch.cuda.is_available():
        res["gpu"] = gpu_section(models, x, y, eps, log)
    return res


def gpu_section(models, x, y, eps, log) -> dict:
    """Both engines at the headline eps with the model, the points and every row on the GPU."""
    import copy
    out = {"device": torch.cuda.get_device_name(0), "models": {}}
    xg, yg = x.cuda(), y.cuda()
    for name, model in models.items():
        log(f"{name} on the GPU ...")
        net = copy.deepcopy(model).cuda()
        t_ref, (r_ref, p_ref) = _timed(lambda: reference(net, xg, yg, eps, 0))
        t_nat, (r_nat, p_nat) = _timed(lambda: native(net, xg, yg, eps, 0))
        n = x.shape[0]
        out["models"][name] = {"autoattack": round(100 * float(r_ref.float().mean()), 2),
                               "native": round(100 * float(r_nat.float().mean()), 2),
                               "seconds_autoattack": round(t_ref, 2), "seconds_native": round(t_nat, 2),
                               "native_time_ratio": round(t_nat / t_ref, 3),
                               "passes_per_point": {"autoattack": p_ref.per_point(n), "native": p_nat.per_point(n)}}
    return out


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table
    sweep = res["sweep"]
    t = Table(title=f"bench perf --attacks: robust accuracy (%) per eps (pyautoattack / native / pipeline / fast), "
                    f"seconds and passes per point, Linf, headline {res['eps']}, {res['n']} points, pipeline and "
                    f"fast on {res['impl']}{', quick' if res['quick'] else ''}")
    for col in ("model", "clean", *[f"@{e:g}" for e in sweep], "AA s", "native/AA", "pipeline/AA", "fast/AA",
                "fwd+bwd per point: AA / native / fast", "flags"):
        t.add_column(col, justify="left" if col in ("model", "flags") else "right")
    for name, m in res["models"].items():
        cells = [f"{m['eps'][str(e)]['autoattack']:.1f} / {m['eps'][str(e)]['native']:.1f} / "
                 f"{m['eps'][str(e)]['pipeline']:.1f} / {m['eps'][str(e)]['fast']:.1f}" for e in sweep]
        pp = m["passes_per_point"]
        passes = " / ".join(f"{pp[k]['forward']:.0f}+{pp[k]['backward']:.0f}" for k in ("autoattack", "native", "fast"))
        t.add_row(name, f"{m['clean']:.1f}", *cells, f"{m['seconds_autoattack']:.1f}", f"{m['native_time_ratio']:.2f}",
                  f"{m['pipeline_time_ratio']:.2f}", f"{m['fast_time_ratio']:.2f}", passes,
                  ", ".join(m["flags_pipeline"]))
    Console(width=200).print(t)
    for key in ("native_time_ratio", "native_gap_max", "native_agreement_min", "fast_backward_ratio", "fast_gap_max",
                "fast_gap_max_deterministic",
                "passes_per_point", "gap_max_all_eps", "fast_acc_gap_max", "pipeline_acc_gap_max",
                "masked_pipeline_time_ratio",
                "masked_fast_time_ratio", "pipeline_time_ratio", "fast_time_ratio", "fast_sweep_time_ratio"):
        print(f"{key} = {res[key]}")
    for k, ok in res["targets"].items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")
    eq = res.get("equivalence") or {"models": {}}
    for name, per in eq["models"].items():
        print(f"equivalence {name}: " + ("not measured (python -m bench perf --attacks --equivalence)" if per is None
              else ", ".join(f"@{e} {'equivalent' if ok else 'NOT equivalent'}" for e, ok in per.items())))
    if "gpu" in res:
        g = Table(title=f"GPU ({res['gpu']['device']}): AutoAttack standard at {res['eps']}, both engines")
        for col in ("model", "robust % AA / native", "AA s", "native s", "native/AA"):
            g.add_column(col, justify="left" if col == "model" else "right")
        for name, m in res["gpu"]["models"].items():
            g.add_row(name, f"{m['autoattack']:.1f} / {m['native']:.1f}", f"{m['seconds_autoattack']:.2f}",
                      f"{m['seconds_native']:.2f}", f"{m['native_time_ratio']:.2f}")
        Console(width=200).print(g)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--masked" in argv:  # the adaptive stage on the masked zoo (bench.masked_perf)
        from bench.masked_perf import main as masked
        argv.remove("--masked")
        return masked(argv)
    if "--equivalence" in argv:  # our AutoAttack engine against the original's own seed spread (bench.equivalence)
        from bench.equivalence import main as equivalence
        argv.remove("--equivalence")
        return equivalence(argv)
    from bench.zoo import cache_dir as _cache_dir
    p = argparse.ArgumentParser(prog="python -m bench perf --attacks", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny models and points (a smoke test)")
    p.add_argument("--points", type=int, default=None, help="test points attacked (default 200)")
    p.add_argument("--eps", type=float, default=0.1, help="headline Linf eps (default 0.1)")
    p.add_argument("--models", default="*", help="only the zoo models matching these comma-separated patterns "
                   "(e.g. 'mlp-*' or 'mlp-scaled,mlp-quant16,mlp-noisy')")
    p.add_argument("--cache", default=None, help="folder for the trained zoo")
    from lawbench.attacks.autoattack import IMPLS
    p.add_argument("--impl", choices=IMPLS, default=None,
                   help="the engine our pipeline and fast suite run on (default: the spec's autoattack_impl)")
    args = p.parse_args(argv)
    n = args.points or (12 if args.quick else 200)
    res = measure(args.quick, _cache_dir(args.cache), n, args.eps, lambda m: print(m, file=sys.stderr, flush=True),
                  args.models, args.impl)
    if not res["models"]:
        print(f"bench perf --attacks: no zoo model matches --models {args.models!r}", file=sys.stderr)
        return 2
    _print(res)
    if args.json:
        from bench.zoo import write_json
        write_json(args.json, res)
    return 0
