"""`python -m bench perf --attacks [--json FILE] [--quick]`: AutoAttack standard alone, our default pipeline and the
fast suite on a zoo of five models trained here, in one run.

The zoo (MNIST-5k, cached like `bench perf`'s models): an undefended MLP, a PGD-trained MLP, a small CNN, a
PGD-trained CNN, and a gradient-masked model (the undefended MLP behind an input quantization to 8 levels: its
gradient is zero almost everywhere, so gradient attacks stall and only a black-box attack breaks it). Per model, on
the same points and seed: robust accuracy and wall time of pyautoattack standard alone (its raw examples, judged as a
user would), of our pipeline (PGD sweep, then AutoAttack standard on the survivors) and of `attacks = ["fast"]`.

JSON keys: ``fast_acc_gap_max`` (max over models of fast − AutoAttack robust accuracy, in points),
``fast_time_ratio`` (max over models of fast time / AutoAttack time), ``pipeline_time_ratio`` (max over models of
ours / AutoAttack), ``pipeline_acc_gap_max``, and per model the details.
"""
from __future__ import annotations

import argparse
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


def zoo(quick: bool, cache: Path, log) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The five models and the test points they are attacked on."""
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
    models = {
        "mlp-erm": _trained(f"mlp{width}-erm-{tag}", mlp, fit(erm), cache, log)[0],
        "mlp-pgdat": _trained(f"mlp{width}-pgdat0.1-{tag}", mlp, fit(at), cache, log)[0],
        "cnn-erm": _trained(f"cnn16-erm-{tag}", cnn, fit(cnn_erm), cache, log)[0],
        "cnn-pgdat": _trained(f"cnn16-pgdat0.2-{tag}", cnn, fit(cnn_at), cache, log)[0],
    }
    models["mlp-quantized"] = torch.nn.Sequential(Quantize(8), models["mlp-erm"]).eval()
    return models, split.x_test, split.y_test


def _aa_alone(model, x, y, eps, seed):
    """pyautoattack standard alone, as a user runs it."""
    from pyautoattack import AutoAttack
    with torch.random.fork_rng():
        aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=x.device, seed=seed)
        xa, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    with torch.no_grad():
        return model(xa).argmax(1) == y


def _ours(model, x, y, eps, seed, suite):
    from lawbench.attacks import SuiteStep, robust_eval
    steps = None if suite == "pipeline" else [SuiteStep("fast", (eps,), {})]
    return robust_eval(model, x, y, norm="Linf", eps=[eps], steps=100, restarts=1, autoattack="standard",
                       aa_eps=[eps], seed=seed, aa_batch_size=x.shape[0], pgd=suite == "pipeline", suite=steps)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_model(model, x, y, eps, seed, log) -> dict:
    log("  AutoAttack standard alone ...")
    t_aa, r_aa = _timed(lambda: _aa_alone(model, x, y, eps, seed))
    log("  our pipeline (PGD, then AutoAttack standard on the survivors) ...")
    t_pipe, r_pipe = _timed(lambda: _ours(model, x, y, eps, seed, "pipeline"))
    log("  fast suite ...")
    t_fast, r_fast = _timed(lambda: _ours(model, x, y, eps, seed, "fast"))
    n = x.shape[0]
    acc = lambda mask: round(100 * float(mask.float().sum()) / n, 2)  # noqa: E731
    clean = r_pipe.clean
    return {
        "n": n, "clean": acc(clean),
        "acc_autoattack": acc(r_aa), "acc_pipeline": acc(r_pipe.robust[eps]), "acc_fast": acc(r_fast.robust[eps]),
        "seconds_autoattack": round(t_aa, 2), "seconds_pipeline": round(t_pipe, 2), "seconds_fast": round(t_fast, 2),
        "fast_time_ratio": round(t_fast / t_aa, 3), "pipeline_time_ratio": round(t_pipe / t_aa, 3),
        "fast_acc_gap": round(acc(r_fast.robust[eps]) - acc(r_aa), 2),
        "pipeline_acc_gap": round(acc(r_pipe.robust[eps]) - acc(r_aa), 2),
        "fast_stages": r_fast.info["details"].get("fast", {}).get(eps), "flags_fast": r_fast.aa_flags,
        "flags_pipeline": r_pipe.aa_flags,
        "fast_misses": int((~r_aa & r_fast.robust[eps]).sum()),  # points AutoAttack breaks that fast keeps
    }


def measure(quick: bool, cache: Path, n_points: int, eps: float, log) -> dict:
    models, x_test, y_test = zoo(quick, cache, log)
    x, y = x_test[:n_points], y_test[:n_points]
    lg = logging.getLogger("auto-attack")
    old = lg.level
    lg.setLevel(logging.WARNING)
    res = {"quick": quick, "n": n_points, "eps": eps, "threads": torch.get_num_threads(), "models": {}}
    try:
        for name, model in models.items():
            log(f"{name}:")
            res["models"][name] = bench_model(model, x, y, eps, 0, log)
    finally:
        lg.setLevel(old)
    per = res["models"].values()
    res["fast_acc_gap_max"] = max(m["fast_acc_gap"] for m in per)
    res["fast_time_ratio"] = max(m["fast_time_ratio"] for m in per)
    res["pipeline_time_ratio"] = max(m["pipeline_time_ratio"] for m in per)
    res["pipeline_acc_gap_max"] = max(m["pipeline_acc_gap"] for m in per)
    res["targets"] = {"fast_acc_gap_max<=0.2": res["fast_acc_gap_max"] <= 0.2,
                      "fast_time_ratio<=0.33": res["fast_time_ratio"] <= 0.33,
                      "pipeline_time_ratio<=0.8": res["pipeline_time_ratio"] <= 0.8,
                      "pipeline never above AutoAttack": res["pipeline_acc_gap_max"] <= 0}
    return res


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"bench perf --attacks: robust accuracy (%) and seconds, Linf {res['eps']}, {res['n']} points"
                    f"{', quick' if res['quick'] else ''}")
    for col in ("model", "clean", "AutoAttack", "pipeline", "fast", "AA s", "pipeline s", "fast s", "fast/AA",
                "pipeline/AA", "fast flags"):
        t.add_column(col, justify="left" if col in ("model", "fast flags") else "right")
    for name, m in res["models"].items():
        t.add_row(name, f"{m['clean']:.1f}", f"{m['acc_autoattack']:.1f}", f"{m['acc_pipeline']:.1f}",
                  f"{m['acc_fast']:.1f}", f"{m['seconds_autoattack']:.1f}", f"{m['seconds_pipeline']:.1f}",
                  f"{m['seconds_fast']:.1f}", f"{m['fast_time_ratio']:.2f}", f"{m['pipeline_time_ratio']:.2f}",
                  ", ".join(m["flags_fast"]))
    Console(width=170).print(t)
    for key in ("fast_acc_gap_max", "fast_time_ratio", "pipeline_time_ratio", "pipeline_acc_gap_max"):
        print(f"{key} = {res[key]}")
    for k, ok in res["targets"].items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")


def main(argv=None) -> int:
    from bench.zoo import cache_dir as _cache_dir
    p = argparse.ArgumentParser(prog="python -m bench perf --attacks", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny models and points (a smoke test)")
    p.add_argument("--points", type=int, default=None, help="test points attacked (default 200)")
    p.add_argument("--eps", type=float, default=0.1, help="Linf eps (default 0.1)")
    p.add_argument("--cache", default=None, help="folder for the trained zoo")
    args = p.parse_args(argv)
    n = args.points or (12 if args.quick else 200)
    res = measure(args.quick, _cache_dir(args.cache), n, args.eps, lambda m: print(m, file=sys.stderr, flush=True))
    _print(res)
    if args.json:
        from bench.zoo import write_json
        write_json(args.json, res)
    return 0
