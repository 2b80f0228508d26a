"""Cost of the certified Lipschitz upper bound per registered family and size:
``python -m bench perf --certify [--json FILE] [--quick]``.

The models are the registry's own, with trained-looking BatchNorm statistics so that no layer is the identity.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

# (model, width, in_shape, classes): the sizes the runner meets, up to and past 2M parameters.
CASES = [
    ("mlp", 160, (1, 28, 28), 10), ("mlp", 2560, (1, 28, 28), 10), ("mlp", 5120, (1, 28, 28), 10),
    ("mlp", 4096, (64,), 2), ("mlp-deep", 1024, (1, 28, 28), 10), ("mlp-deep", 2048, (1, 28, 28), 10),
    ("cnn", 4, (1, 28, 28), 10), ("cnn", 16, (1, 28, 28), 10),
    ("wrn16", 1, (3, 32, 32), 10), ("wrn16", 2, (3, 32, 32), 10), ("wrn16", 4, (3, 32, 32), 10),
]


def _trained_looking_batchnorm(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
                m.weight.uniform_(0.5, 1.5)


def main(argv=None) -> int:
    from lawbench.certify import lipschitz_upper
    from lawbench.models import count_params, get_model
    ap = argparse.ArgumentParser(prog="python -m bench perf --certify", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the measurements to this file")
    ap.add_argument("--quick", action="store_true", help="only models under 300k parameters")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case (the best is reported)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{'model':9s} {'width':>6s} {'input':>12s} {'params':>10s} {'seconds':>8s} {'L2 bound':>11s}  method")
    for name, width, shape, classes in CASES:
        model = get_model(name, in_shape=shape, num_classes=classes, width=width).eval()
        _trained_looking_batchnorm(model)
        p = count_params(model)
        if args.quick and p > 300_000:
            continue
        best, ub = math.inf, None
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            ub = lipschitz_upper(model, shape)
            best = min(best, time.perf_counter() - t0)
        rows.append({"model": name, "width": width, "in_shape": list(shape), "params": p, "seconds": round(best, 4),
                     "l2": ub.value, "linf": ub.linf, "method": ub.method})
        print(f"{name:9s} {width:6d} {str(shape):>12s} {p:10d} {best:8.3f} {ub.value:11.4g}  {ub.method}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0
