"""The exact minimum of a ReLU MLP's margins over an Linf box, two independent ways, for the local bounds' tests:
a mixed-integer program (scipy's milp, HiGHS; one binary per hidden unit, big-M from valid interval bounds) and, for
one hidden layer, every activation pattern's linear program (the minimum over the patterns a point of the box can
take)."""
from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, linprog, milp


def layers(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) of each Linear of a Flatten/Linear/ReLU Sequential, in float64."""
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
            for m in model if isinstance(m, torch.nn.Linear)]


def _intervals(lay, lo, hi):
    """Pre-activation intervals of every hidden layer (valid big-M bounds)."""
    out = []
    for W, b in lay[:-1]:
        c, r = (lo + hi) / 2, (hi - lo) / 2
        zl, zh = W @ c + b - np.abs(W) @ r, W @ c + b + np.abs(W) @ r
        out.append((zl, zh))
        lo, hi = np.maximum(zl, 0), np.maximum(zh, 0)
    return out


def milp_margins(model, x: np.ndarray, y: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min over the box [lo, hi] of f_y - f_j for every class j (inf at y), by one MILP per j."""
    lay = layers(model)
    pre = _intervals(lay, lo, hi)
    d = x.size
    sizes = [W.shape[0] for W, _ in lay[:-1]]
    # variables: x, then per hidden layer: z (pre), a (post), delta (binary)
    offs, n = [], d
    for h in sizes:
        offs.append(n)
        n += 3 * h
    rows, lb, ub = [], [], []

    def row(entries, lo_, hi_):
        r = np.zeros(n)
        for i, v in entries:
            r[i] += v
        rows.append(r), lb.append(lo_), ub.append(hi_)

    prev = list(range(d))
    for k, ((W, b), (zl, zh)) in enumerate(zip(lay[:-1], pre)):
        o, h = offs[k], sizes[k]
        for i in range(h):
            z, a, t = o + i, o + h + i, o + 2 * h + i
            row([(z, 1.0)] + [(p, -W[i, j]) for j, p in enumerate(prev)], b[i], b[i])   # z = W prev + b
            row([(a, 1.0), (z, -1.0)], 0, np.inf)                                          # a >= z
            row([(a, 1.0), (z, -1.0), (t, -zl[i])], -np.inf, -zl[i])                      # a <= z - l (1 - t)
            row([(a, 1.0), (t, -max(zh[i], 0.0))], -np.inf, 0)                            # a <= u t
        prev = [o + h + i for i in range(h)]
    var_lo = np.concatenate([lo] + [np.concatenate([zl, np.zeros(h), np.zeros(h)]) for (zl, _), h in zip(pre, sizes)])
    var_hi = np.concatenate([hi] + [np.concatenate([zh, np.maximum(zh, 0), np.ones(h)])
                                    for (_, zh), h in zip(pre, sizes)])
    integrality = np.zeros(n)
    for o, h in zip(offs, sizes):
        integrality[o + 2 * h:o + 3 * h] = 1
    cons = LinearConstraint(np.array(rows), lb, ub)
    Wo, bo = lay[-1]
    out = np.full(Wo.shape[0], np.inf)
    for j in range(Wo.shape[0]):
        if j == y:
            continue
        c = np.zeros(n)
        c[prev] = Wo[y] - Wo[j]
        res = milp(c, constraints=cons, integrality=integrality, bounds=Bounds(var_lo, var_hi),
                   options={"mip_rel_gap": 0, "presolve": True})
        assert res.status == 0, res.message
        out[j] = res.fun + bo[y] - bo[j]
    return out


def pattern_margins(model, x: np.ndarray, y: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The same minimum for a one-hidden-layer MLP by enumeration: for each activation pattern s, the linear program
    min (w_y - w_j)^T (s * (W x + b)) over the box where W x + b has the signs s."""
    (W, b), (Wo, bo) = layers(model)
    h = W.shape[0]
    out = np.full(Wo.shape[0], np.inf)
    for s in itertools.product((0.0, 1.0), repeat=h):
        s = np.array(s)
        sign = np.where(s > 0, -1.0, 1.0)               # active: -(Wx+b) <= 0; inactive: Wx+b <= 0
        A, ub = sign[:, None] * W, -sign * b
        for j in range(Wo.shape[0]):
            if j == y:
                continue
            v = (Wo[y] - Wo[j]) * s
            res = linprog(v @ W, A_ub=A, b_ub=ub, bounds=list(zip(lo, hi)), method="highs")
            if res.status == 0:
                out[j] = min(out[j], res.fun + v @ b + bo[y] - bo[j])
    return out
