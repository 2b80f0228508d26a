"""Cost of the certified upper bound per model family and size: ``python -m certify.cost [--json FILE] [--quick]``.

The models are local look-alikes of the registered families (same module types and shapes; certify never imports the
models package): mlp (Flatten, Linear, ReLU, Linear), mlp-deep (3 hidden layers), the Madry et al. MNIST CNN at scale
s, and the pre-activation WideResNet-16-k with Normalize and Residual blocks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch import nn

from .upper import lipschitz_upper


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


class Residual(nn.Module):
    def __init__(self, branch, shortcut=None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


def mlp(d, width, classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(), nn.Linear(width, classes))


def mlp_deep(d, width, classes=10, depth=3):
    layers = [nn.Flatten()]
    fan = d
    for _ in range(depth):
        layers += [nn.Linear(fan, width), nn.ReLU()]
        fan = width
    return nn.Sequential(*layers, nn.Linear(fan, classes))


def cnn(s, c=1, hw=28, classes=10):
    h2 = hw // 4
    return nn.Sequential(
        nn.Conv2d(c, 2 * s, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * s, 4 * s, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * s * h2 * h2, 64 * s), nn.ReLU(), nn.Linear(64 * s, classes))


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():                       # trained-looking running statistics
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_(0, 0.1)
        bn.weight.uniform_(0.5, 1.5)
    return bn


def _wrn_block(cin, cout, stride):
    conv = lambda a, b, s=1: nn.Conv2d(a, b, 3, stride=s, padding=1, bias=False)  # noqa: E731
    if cin == cout and stride == 1:
        return Residual(nn.Sequential(_bn(cin), nn.ReLU(), conv(cin, cout), _bn(cout), nn.ReLU(), conv(cout, cout)))
    branch = nn.Sequential(conv(cin, cout, stride), _bn(cout), nn.ReLU(), conv(cout, cout))
    return nn.Sequential(_bn(cin), nn.ReLU(),
                         Residual(branch, nn.Conv2d(cin, cout, 1, stride=stride, bias=False)))


def wrn16(k, c=3, classes=10):
    widths = (16 * k, 32 * k, 64 * k)
    layers = [Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)), nn.Conv2d(c, 16, 3, padding=1,
                                                                                         bias=False)]
    cin = 16
    for g, cout in enumerate(widths):
        layers.append(nn.Sequential(_wrn_block(cin, cout, 1 if g == 0 else 2), _wrn_block(cout, cout, 1)))
        cin = cout
    layers += [_bn(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


CASES = [
    ("mlp", "784-160-10", lambda: mlp(784, 160), (1, 28, 28)),
    ("mlp", "784-2500-10", lambda: mlp(784, 2500), (1, 28, 28)),
    ("mlp", "784-5120-10", lambda: mlp(784, 5120), (1, 28, 28)),
    ("mlp", "gauss 64-4096-2", lambda: mlp(64, 4096, 2), (64,)),
    ("mlp-deep", "784-1024x3-10", lambda: mlp_deep(784, 1024), (1, 28, 28)),
    ("mlp-deep", "784-2048x3-10", lambda: mlp_deep(784, 2048), (1, 28, 28)),
    ("cnn", "s=4", lambda: cnn(4), (1, 28, 28)),
    ("cnn", "s=16 (Madry)", lambda: cnn(16), (1, 28, 28)),
    ("wrn", "WRN-16-1", lambda: wrn16(1), (3, 32, 32)),
    ("wrn", "WRN-16-2", lambda: wrn16(2), (3, 32, 32)),
    ("wrn", "WRN-16-4", lambda: wrn16(4), (3, 32, 32)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the measurements to this file")
    ap.add_argument("--quick", action="store_true", help="only the small cases")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case (the best is reported)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{'family':9s} {'size':18s} {'params':>10s} {'seconds':>8s} {'L2 bound':>11s} {'linf':>11s}  method")
    for fam, size, build, shape in CASES:
        model = build().eval()
        p = sum(q.numel() for q in model.parameters() if q.requires_grad)
        if args.quick and p > 300_000:
            continue
        best = math.inf
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            ub = lipschitz_upper(model, shape)
            best = min(best, time.perf_counter() - t0)
        rows.append({"family": fam, "size": size, "params": p, "seconds": round(best, 4), "l2": ub.value,
                     "linf": ub.linf, "method": ub.method})
        print(f"{fam:9s} {size:18s} {p:10d} {best:8.3f} {ub.value:11.4g} {ub.linf:11.4g}  {ub.method}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
