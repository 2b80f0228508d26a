"""`python -m bench perf --attacks [--json FILE] [--quick] [--models PATTERN]`: pyautoattack alone, our default
pipeline and the fast suite on a zoo of nine models trained here, at every eps of the default sweep, in one run.

The zoo (MNIST-5k, cached like `bench perf`'s models): an undefended MLP, a PGD-trained MLP, a small CNN, a
PGD-trained CNN, and five models built to fool evaluations, all the undefended MLP behind a front end: input
quantization to 8, 16 and 256 levels (zero gradient almost everywhere), logits multiplied by 1e4 (cross-entropy
saturates) and Gaussian input noise at every forward pass (randomized). Per model, on the same points and seed, at
every eps of the sweep: robust accuracy of pyautoattack alone (standard; rand for the randomized model, its examples
judged by the majority of VOTE_DRAWS (25) draws, as ours are; at eps·(1−2⁻²⁰), inside the exact ball), of our default
pipeline (PGD sweep, the fast suite at every eps but the headline, AutoAttack standard at the headline) and of the
fast suite at every eps. Times: pyautoattack at the headline eps alone against each of ours over the whole sweep.

JSON keys: ``gap_max_all_eps`` (max over models, eps and both of ours of ours − pyautoattack, in points),
``masked_pipeline_time_ratio`` (max over the scaled, 16- and 256-level and noisy models of our pipeline over the
whole sweep against pyautoattack at the headline eps alone), ``masked_fast_time_ratio`` (the same for the fast suite
at the headline eps alone), ``pipeline_time_ratio``, ``fast_time_ratio`` (the same over every model),
``fast_sweep_time_ratio`` (fast over the sweep against pyautoattack at every eps of it), the headline gaps
``fast_acc_gap_max``, ``pipeline_acc_gap_max``, and per model the details.
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import sys
import time
from pathlib import Path

import torch


class Quantize(torch.nn.Module):
    """Input rounded to `levels` grey levels: a classic gradient-masking defence (the gradient is zero a.e.)."""

    def __init__(self, levels: int = 8):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class Scale(torch.nn.Module):
    """Logits multiplied by a constant: the prediction is unchanged, cross-entropy saturates (its gradient vanishes)."""

    def __init__(self, factor: float = 1e4):
        super().__init__()
        self.factor = factor

    def forward(self, z):
        return z * self.factor


class Noise(torch.nn.Module):
    """Gaussian input noise at every forward pass, eval mode too: a randomized defence."""

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return x + self.sigma * torch.randn_like(x)


SWEEP = (0.05, 0.1, 0.2, 0.3)  # the default Linf sweep: every eps is compared with the reference
# built to fool evaluations: the cost targets are theirs
MASKED = ("mlp-scaled", "mlp-quant16", "mlp-quant256", "mlp-noisy")


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


def reference(model, x, y, eps, seed) -> torch.Tensor:
    """Robust mask of pyautoattack alone, as a user runs it: standard, or its rand version (EOT 20) for a randomized
    model with each example judged by the majority of VOTE_DRAWS draws (as ours); at eps·(1−2⁻²⁰) so that its float32
    clipping stays inside the exact ball (an ulp outside, a quantizer rounds an example back)."""
    from pyautoattack import AutoAttack
    from lawbench.attacks import is_randomized
    from lawbench.attacks.randomized import Randomized
    from lawbench.attacks.threat import misclassified
    rand = is_randomized(model, x)
    with torch.random.fork_rng():
        aa = AutoAttack(model, norm="Linf", eps=eps * (1 - 2 ** -20), version="rand" if rand else "standard",
                        device=x.device, seed=seed)
        xa, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return ~misclassified(Randomized(model) if rand else model, xa, y)


def _ours(model, x, y, eps, seed, suite):
    """Our default pipeline (PGD sweep, the fast suite at every eps but the headline, AutoAttack standard at the
    headline) or the fast suite alone at every eps, over the sweep SWEEP with the headline `eps`."""
    from lawbench.attacks import SuiteStep, robust_eval
    sweep = sorted(set(SWEEP) | {eps})
    if suite == "pipeline":
        steps = [SuiteStep("fast", tuple(e for e in sweep if e != eps), {"steps": 0}),  # as the CLI's default
                 SuiteStep("autoattack", (eps,), {"version": "standard"})]
    elif suite == "fast-headline":
        sweep = [eps]
        steps = [SuiteStep("fast", (eps,), {})]
    else:
        steps = [SuiteStep("fast", tuple(sweep), {})]
    return robust_eval(model, x, y, norm="Linf", eps=sweep, steps=100, restarts=1, seed=seed,
                       aa_batch_size=x.shape[0], pgd=suite == "pipeline", suite=steps)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_model(model, x, y, eps, seed, log) -> dict:
    n = x.shape[0]
    acc = lambda mask: round(100 * float(mask.float().sum()) / n, 2)  # noqa: E731
    sweep = sorted(set(SWEEP) | {eps})
    ref, t_ref = {}, {}
    for e in sweep:
        log(f"  pyautoattack alone at {e} ...")
        t_ref[e], ref[e] = _timed(lambda: reference(model, x, y, e, seed))
    log("  our pipeline (PGD sweep, fast at every other eps, AutoAttack standard at the headline) ...")
    t_pipe, r_pipe = _timed(lambda: _ours(model, x, y, eps, seed, "pipeline"))
    log("  fast suite at every eps ...")
    t_sweep, r_fast = _timed(lambda: _ours(model, x, y, eps, seed, "fast"))
    log("  fast suite at the headline eps alone ...")
    t_fast, r_head = _timed(lambda: _ours(model, x, y, eps, seed, "fast-headline"))
    t_aa = t_ref[eps]
    per_eps = {str(e): {"autoattack": acc(ref[e]), "pipeline": acc(r_pipe.robust[e]), "fast": acc(r_fast.robust[e]),
                        "pipeline_gap": round(acc(r_pipe.robust[e]) - acc(ref[e]), 2),
                        "fast_gap": round(acc(r_fast.robust[e]) - acc(ref[e]), 2),
                        "pipeline_verified": bool(r_pipe.info["verified"][e]),
                        "fast_misses": int((~ref[e] & r_fast.robust[e]).sum())} for e in sweep}
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
    }


def measure(quick: bool, cache: Path, n_points: int, eps: float, log, pattern: str = "*") -> dict:
    models, x_test, y_test = zoo(quick, cache, log, pattern)
    x, y = x_test[:n_points], y_test[:n_points]
    lg = logging.getLogger("auto-attack")
    old = lg.level
    lg.setLevel(logging.WARNING)
    res = {"quick": quick, "n": n_points, "eps": eps, "sweep": sorted(set(SWEEP) | {eps}),
           "threads": torch.get_num_threads(), "models": {}}
    try:
        for name, model in models.items():
            log(f"{name}:")
            res["models"][name] = bench_model(model, x, y, eps, 0, log)
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
    res["targets"] = {"gap_max_all_eps<=0.5": res["gap_max_all_eps"] <= 0.5,
                      "masked_pipeline_time_ratio<=1.5": res["masked_pipeline_time_ratio"] <= 1.5,
                      "masked_fast_time_ratio<=0.5": res["masked_fast_time_ratio"] <= 0.5}
    return res


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table
    sweep = res["sweep"]
    t = Table(title=f"bench perf --attacks: robust accuracy (%) per eps (pyautoattack / pipeline / fast) and seconds, "
                    f"Linf, headline {res['eps']}, {res['n']} points{', quick' if res['quick'] else ''}")
    for col in ("model", "clean", *[f"@{e:g}" for e in sweep], "AA s", "pipeline s", "fast s", "pipeline/AA",
                "fast/AA", "flags"):
        t.add_column(col, justify="left" if col in ("model", "flags") else "right")
    for name, m in res["models"].items():
        cells = [f"{m['eps'][str(e)]['autoattack']:.1f} / {m['eps'][str(e)]['pipeline']:.1f} / "
                 f"{m['eps'][str(e)]['fast']:.1f}" for e in sweep]
        t.add_row(name, f"{m['clean']:.1f}", *cells, f"{m['seconds_autoattack']:.1f}", f"{m['seconds_pipeline']:.1f}",
                  f"{m['seconds_fast']:.1f}", f"{m['pipeline_time_ratio']:.2f}", f"{m['fast_time_ratio']:.2f}",
                  ", ".join(m["flags_pipeline"]))
    Console(width=200).print(t)
    for key in ("gap_max_all_eps", "fast_acc_gap_max", "pipeline_acc_gap_max", "masked_pipeline_time_ratio",
                "masked_fast_time_ratio", "pipeline_time_ratio", "fast_time_ratio", "fast_sweep_time_ratio"):
        print(f"{key} = {res[key]}")
    for k, ok in res["targets"].items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")


def main(argv=None) -> int:
    from bench.zoo import cache_dir as _cache_dir
    p = argparse.ArgumentParser(prog="python -m bench perf --attacks", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny models and points (a smoke test)")
    p.add_argument("--points", type=int, default=None, help="test points attacked (default 200)")
    p.add_argument("--eps", type=float, default=0.1, help="headline Linf eps (default 0.1)")
    p.add_argument("--models", default="*", help="only the zoo models matching these comma-separated patterns "
                   "(e.g. 'mlp-*' or 'mlp-scaled,mlp-quant16,mlp-noisy')")
    p.add_argument("--cache", default=None, help="folder for the trained zoo")
    args = p.parse_args(argv)
    n = args.points or (12 if args.quick else 200)
    res = measure(args.quick, _cache_dir(args.cache), n, args.eps, lambda m: print(m, file=sys.stderr, flush=True),
                  args.models)
    if not res["models"]:
        print(f"bench perf --attacks: no zoo model matches --models {args.models!r}", file=sys.stderr)
        return 2
    _print(res)
    if args.json:
        from bench.zoo import write_json
        write_json(args.json, res)
    return 0
