"""Certified global Lipschitz upper bounds (L2 and Linf) of a model's logit map, with per-class-pair (GloRo) bounds.

Proof sketch of the whole bound
-------------------------------
The model is walked into a chain of factors: linear operators (the linear parts of Normalize, BatchNorm (eval),
Flatten, Linear, Conv2d, AvgPool2d, AdaptiveAvgPool2d), elementwise activations (ReLU; derivative in [0, 1]),
max-pools and residual sums. The logit map is Lipschitz, so its L2 constant is the supremum of the operator norm
of its Jacobian over the points where it is differentiable (Rademacher's theorem + mean-value inequality). At such
points the Jacobian is the product of the factors' Jacobians: linear operators contribute themselves, a ReLU
layer contributes a diagonal D with entries in [0, 1], a max-pool a selection matrix whose norm is at most
sqrt(#windows covering one input) <= ceil(k/s), a residual block the *sum* of its branch and shortcut Jacobians.
Submultiplicativity and the triangle inequality then bound ||J|| by products (sums for residual blocks) of bounds
of groups of consecutive factors; every group bound below is certified:

* consecutive linear operators with no nonlinearity between them are merged into one operator before taking the
  norm (Normalize/BatchNorm scalings are folded into the adjacent convolution's kernel channels; small merged
  operators are built explicitly); explicit matrices get exact spectral norms (LAPACK eigvalsh of the smaller-side
  Gram in float64, or a Lanczos candidate certified by a Cholesky factorisation of c I - G), see ``_linalg``;
* convolutions get the exact norm of a circular convolution that contains the layer (zero padding, stride and
  dilation handled by an isometric embedding + polyphase rearrangement), see ``_linalg.conv_l2_bound``;
* average pools: exact norm of the per-channel operator (or Schur's test for very large images);
* a pattern  B . act . A  (two explicit linear operators around an elementwise activation with derivative in
  [lo, hi]) gets  sup_D ||B D A|| <= min( amax * min(||B|| ||A||, || |B||A| ||, sum_k ||b_k|| ||a_k||),
  |mid| ||B A|| + rad * min(...) )  with mid = (lo+hi)/2, rad = (hi-lo)/2, amax = max(|lo|, |hi|): write
  D = mid I + rad E with E diagonal in [-1, 1]; |B E A| <= |B||A| entrywise and the spectral norm is monotone on
  non-negative matrices; B E A = sum_k e_k b_k a_k^T gives the triangle bound. The grouping of the chain into
  single factors and such pairs is chosen by dynamic programming (smallest product).

Per class pair (GloRo, Leino et al. 2021): f_y - f_j = (e_y - e_j)^T J, so K_yj <= ||(w_y - w_j)^T ...|| times the
bound of the rest of the chain (with the same pair refinement applied to the last hidden layer), and never more
than sqrt(2) * L. Linf: the same chain with ||.||_{inf->inf} norms (largest absolute row sums; ReLU and max-pool
are 1-Lipschitz in Linf, overlapping or not); ``linf`` bounds |f_i(x) - f_i(x')| <= linf * ||x - x'||_inf for every
i, and ``linf_pair`` bounds |(f_y - f_j)(x) - (f_y - f_j)(x')| <= K_yj * ||x - x'||_inf.

Floating point: weights are copied to float64; each certified norm carries an explicit rounding slack, and the final
product is inflated by a relative 1e-9.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ._linalg import UNIT_ROUNDOFF, conv_l2_bound, conv_linf, lapack_threads, pool_norms, spectral_norm
from ._walk import Act, CertifyError, MaxPool, Op, Res, check_model, float64_copy, walk

__all__ = ["UpperBound", "lipschitz_upper"]

# Budgets (elements / flops) that decide when an operator is built explicitly; chosen so a 2M-parameter model
# stays well under a second on a 2-core CPU.
DIRECT_ELEMS = 25_000_000
BASIS_ELEMS = 4_000_000
BASIS_FLOPS = 2e9
BASIS_SIDE = 1200
PAIR_FLOPS = 4e9
PAIR_ELEMS = 25_000_000
PAIR_SIDE = 2048
FINAL_SLACK = 1e-9


@dataclass
class UpperBound:
    """A certified upper bound on the Lipschitz constant of the logit map x -> f(x) (inputs in pixel units).

    value:    L2 bound, ||f(x) - f(x')||_2 <= value * ||x - x'||_2 for all x, x'.
    method:   how ``value`` was obtained (the grouping and the per-group methods).
    linf:     ||.||_{inf->inf} bound: |f_i(x) - f_i(x')| <= linf * ||x - x'||_inf for every class i.
    pair:     (C, C) tensor, K[y, j] bounds the L2 Lipschitz constant of f_y - f_j (GloRo); None if unavailable.
    seconds:  wall-clock time of the computation.
    per_layer: one dict per factor (path, type, method, l2, linf, seconds).
    linf_pair: (C, C) tensor, Linf analogue of ``pair`` (bounds f_y - f_j against ||.||_inf); None if unavailable.
    in_shape: the input shape (without batch) the bound was computed for; it holds for that shape only (a
              convolution's norm depends on the image size), so certified_radii refuses data of another shape.
    """
    value: float
    method: str
    linf: float | None
    pair: torch.Tensor | None
    seconds: float
    per_layer: list = field(default_factory=list)
    linf_pair: torch.Tensor | None = None
    linf_method: str = ""
    pair_method: str = ""
    in_dim: int = 0
    num_classes: int = 0
    in_shape: tuple = ()

    def to_dict(self) -> dict:
        """JSON-friendly summary (pair matrices as nested lists)."""
        return {
            "value": self.value, "method": self.method, "linf": self.linf, "linf_method": self.linf_method,
            "pair": None if self.pair is None else self.pair.tolist(), "pair_method": self.pair_method,
            "linf_pair": None if self.linf_pair is None else self.linf_pair.tolist(),
            "seconds": self.seconds, "per_layer": self.per_layer, "in_dim": self.in_dim,
            "num_classes": self.num_classes, "in_shape": list(self.in_shape),
        }


# ------------------------------------------------------------------------------------ explicit operators
# An explicit operator is either a dense float64 matrix (out x in) or a 1-D tensor meaning a square diagonal.

def _is_diag(A) -> bool:
    return A.dim() == 1


def _abs(A):
    return A.abs()


def _mul(B, A):
    """B @ A for dense/diag operands."""
    if _is_diag(B) and _is_diag(A):
        return B * A
    if _is_diag(B):
        return B[:, None] * A
    if _is_diag(A):
        return B * A[None, :]
    return B @ A


def _norm2(A) -> tuple[float, str]:
    if _is_diag(A):
        return (float(A.abs().max()) if A.numel() else 0.0), "diag-max"
    return spectral_norm(A)


def _norm_inf(A) -> float:
    if _is_diag(A):
        return float(A.abs().max()) if A.numel() else 0.0
    return float(A.abs().sum(dim=1).max()) * (1 + A.shape[1] * UNIT_ROUNDOFF) if A.numel() else 0.0


def _col_norms(A):
    return A.abs() if _is_diag(A) else A.norm(dim=0)


def _row_norms(A):
    return A.abs() if _is_diag(A) else A.norm(dim=1)


def _row_l1(A):
    return A.abs() if _is_diag(A) else A.abs().sum(dim=1)


def _shape(A):
    return (A.shape[0], A.shape[0]) if _is_diag(A) else tuple(A.shape)


def _mul_cost(B, A) -> float:
    (ob, h), (_, ia) = _shape(B), _shape(A)
    if _is_diag(B) or _is_diag(A):
        return float(ob * ia)
    return float(ob) * h * ia


# ------------------------------------------------------------------------------------------ factors

@dataclass
class Factor:
    kind: str                 # "lin" | "act" | "maxpool" | "res"
    l2: float
    linf: float
    method: str
    paths: list
    mat: object = None        # explicit operator (dense / diag) for "lin", else None
    lo: float = 0.0
    hi: float = 1.0
    seconds: float = 0.0
    type: str = ""


def _per_channel(d: torch.Tensor, shape: tuple):
    """Per-channel scale vector (C,) if the diagonal over (C, H, W) is constant per channel, else None."""
    if len(shape) != 3:
        return None
    v = d.reshape(shape[0], -1)
    if bool((v == v[:, :1]).all()):
        return v[:, 0].clone()
    return None


def _fold(ops: list[Op]) -> list[Op]:
    """Fold per-channel diagonal scalings (Normalize, eval BatchNorm) into the adjacent convolution kernels."""
    ops = list(ops)
    out: list[Op] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if op.kind != "conv":
            out.append(op)
            i += 1
            continue
        W = op.data["weight"].to(torch.float64).clone()
        paths = [op.path]
        types = [op.type]
        # preceding diagonals (already appended to out) -> input channels
        while out and out[-1].kind == "diag" and out[-1].out_shape == op.in_shape:
            s = _per_channel(out[-1].data["diag"], op.in_shape)
            if s is None:
                break
            W = W * s[None, :, None, None]
            prev = out.pop()
            paths.insert(0, prev.path)
            types.insert(0, prev.type)
        j = i + 1
        while j < len(ops) and ops[j].kind == "diag" and ops[j].in_shape == op.out_shape:
            s = _per_channel(ops[j].data["diag"], op.out_shape)
            if s is None:
                break
            W = W * s[:, None, None, None]
            paths.append(ops[j].path)
            types.append(ops[j].type)
            j += 1
        data = dict(op.data)
        data["weight"] = W
        pads, stride, dil = data["pads"], data["stride"], data["dilation"]

        def fn(x, W=W, pads=pads, stride=stride, dil=dil):
            pt, pb, pl, pr = pads
            return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (pl, pr, pt, pb)), W, None,
                                              stride=stride, padding=0, dilation=dil)
        out.append(Op("conv", "+".join(paths), "+".join(types), op.in_shape, op.out_shape, fn, data))
        i = j
    return out


def _direct_ok(seg: list[Op]) -> bool:
    return all(o.kind in ("diag", "reshape") or (o.kind == "linear" and len(o.in_shape) == 1) for o in seg)


def _feasible(seg: list[Op]) -> str | None:
    """'direct' | 'basis' | None: how (and whether) the merged operator of `seg` is built explicitly."""
    n_in, n_out = seg[0].in_dim, seg[-1].out_dim
    if _direct_ok(seg):
        n_lin = sum(o.kind == "linear" for o in seg)
        if n_lin <= 1 or n_in * n_out <= DIRECT_ELEMS:
            return "direct"
        return None
    if n_in * n_out > BASIS_ELEMS or min(n_in, n_out) > BASIS_SIDE:
        return None
    passes = min(n_in, n_out) * (1 if n_in <= n_out else 3)
    if passes * sum(o.flops for o in seg) > BASIS_FLOPS:
        return None
    return "basis"


def _explicit(seg: list[Op], how: str):
    """The merged linear operator of `seg`: dense (out x in) float64 matrix, or a diag vector."""
    if how == "direct":
        cur = None
        col = None
        for o in seg:
            if o.kind == "diag":
                v = o.data["diag"].reshape(-1)
                if cur is None:
                    col = v if col is None else col * v
                else:
                    cur = v[:, None] * cur
            elif o.kind == "linear":
                W = o.data["weight"].to(torch.float64)
                cur = W if cur is None else W @ cur
        if cur is None:
            return col if col is not None else torch.ones(seg[0].in_dim, dtype=torch.float64)
        if col is not None:
            cur = cur * col[None, :]
        return cur

    def fn(x):
        for o in seg:
            x = o.fn(x)
        return x
    n_in, n_out = seg[0].in_dim, seg[-1].out_dim
    in_shape = seg[0].in_shape
    chunk = 256
    if n_in <= n_out:
        cols = []
        with torch.no_grad():
            for s in range(0, n_in, chunk):
                e = torch.zeros(min(chunk, n_in - s), n_in, dtype=torch.float64)
                e[torch.arange(e.shape[0]), torch.arange(s, s + e.shape[0])] = 1.0
                cols.append(fn(e.reshape(-1, *in_shape)).reshape(e.shape[0], n_out))
        return torch.cat(cols, 0).T.contiguous()
    rows = []
    for s in range(0, n_out, chunk):
        b = min(chunk, n_out - s)
        y = torch.zeros(b, n_out, dtype=torch.float64)
        y[torch.arange(b), torch.arange(s, s + b)] = 1.0
        x = torch.zeros(b, *in_shape, dtype=torch.float64, requires_grad=True)
        out = fn(x).reshape(b, n_out)
        (g,) = torch.autograd.grad((out * y).sum(), x)
        rows.append(g.reshape(b, n_in))
    return torch.cat(rows, 0)


def _single(op: Op) -> tuple[float, float, str]:
    if op.kind == "conv":
        d = op.data
        l2 = conv_l2_bound(d["weight"], d["stride"], d["pads"], d["dilation"], op.in_shape[1:])
        linf = conv_linf(d["weight"], d["stride"], d["pads"], d["dilation"], op.in_shape)
        return l2, linf, "conv-fft-circular-embedding"
    if op.kind == "pool":
        return pool_norms(op.data["module"], op.in_shape)
    if op.kind == "diag":
        v = float(op.data["diag"].abs().max())
        return v, v, "diag-max"
    if op.kind == "reshape":
        return 1.0, 1.0, "reshape"
    if op.kind == "linear":                          # linear on a multi-axis tensor: I (x) W has norm ||W||
        W = op.data["weight"].to(torch.float64)
        l2, m = spectral_norm(W)
        return l2, _norm_inf(W), m
    raise CertifyError(f"internal: no bound for op kind {op.kind}")


def _linear_factors(ops: list[Op]) -> list[Factor]:
    """Bound a maximal run of linear operators: fold, then greedily merge into explicit segments."""
    ops = _fold(ops)
    out: list[Factor] = []
    i = 0
    while i < len(ops):
        t0 = time.perf_counter()
        best_j, best_how = None, None
        for j in range(i, len(ops)):
            how = _feasible(ops[i:j + 1])
            if how is not None:
                best_j, best_how = j, how
        seg = ops[i:(best_j if best_j is not None else i) + 1]
        paths = [o.path for o in seg]
        types = "+".join(o.type for o in seg)
        if best_j is not None:
            A = _explicit(seg, best_how)
            l2, m = _norm2(A)
            linf = _norm_inf(A)
            method = ("merged-" if len(seg) > 1 else "") + m
            out.append(Factor("lin", l2, linf, method, paths, mat=A, seconds=time.perf_counter() - t0, type=types))
        else:
            op = seg[0]
            l2, linf, m = _single(op)
            out.append(Factor("lin", l2, linf, m, paths, seconds=time.perf_counter() - t0, type=types))
        i += len(seg)
    return out


def _reorder(prog: list) -> list:
    """Rewrite the program into one with the same *set of possible Jacobians*, better suited to merging.

    (a) ``diag S, act`` -> ``act, diag S`` when S cannot be folded backwards (nothing linear before it in its run):
        the Jacobian of x -> act(S x + b) is D S = S D with D diagonal, so every bound on the reordered chain's
        Jacobians holds for the original one. S then folds into the next convolution / joins the next merged
        linear operator (pre-activation ResNets: BatchNorm, ReLU, conv).
    (b) ``diag S, Residual(branch, shortcut)`` -> ``Residual(S + branch, S + shortcut)``, an identity of functions.
    Residual sub-programs are rewritten recursively.
    """
    prog = [Res(_reorder(n.branch), _reorder(n.shortcut), n.path, n.in_shape, n.out_shape) if isinstance(n, Res)
            else n for n in prog]
    changed = True
    while changed:
        changed = False
        for i in range(1, len(prog)):
            node, prev = prog[i], prog[i - 1]
            if (isinstance(node, Act) and isinstance(prev, Op) and prev.kind == "diag"
                    and tuple(prev.out_shape) == tuple(node.shape)
                    and not (i >= 2 and isinstance(prog[i - 2], Op) and prog[i - 2].kind in ("conv", "linear"))):
                prog[i - 1], prog[i] = node, prev
                changed = True
                break
            if (isinstance(node, Res) and isinstance(prev, Op) and prev.kind == "diag"
                    and tuple(prev.out_shape) == tuple(node.in_shape)):
                prog[i - 1:i + 1] = [Res(_reorder([prev] + node.branch), _reorder([prev] + node.shortcut),
                                         node.path, node.in_shape, node.out_shape)]
                changed = True
                break
    return prog


def _factors(prog: list) -> list[Factor]:
    out: list[Factor] = []
    run: list[Op] = []
    for node in prog + [None]:
        if isinstance(node, Op):
            run.append(node)
            continue
        if run:
            out.extend(_linear_factors(run))
            run = []
        if node is None:
            break
        if isinstance(node, Act):
            out.append(Factor("act", max(abs(node.lo), abs(node.hi)), max(abs(node.lo), abs(node.hi)),
                              f"{node.type.lower()}-slope[{node.lo:g},{node.hi:g}]", [node.path],
                              lo=node.lo, hi=node.hi, type=node.type))
        elif isinstance(node, MaxPool):
            out.append(Factor("maxpool", node.l2, 1.0, "maxpool-window-overlap", [node.path], type=node.type))
        elif isinstance(node, Res):
            t0 = time.perf_counter()
            b = _chain(_factors(node.branch))
            s = _chain(_factors(node.shortcut))
            f = Factor("res", b["l2"] + s["l2"], b["linf"] + s["linf"], "residual-sum", [node.path],
                       seconds=time.perf_counter() - t0, type="Residual")
            f.sub = b["entries"] + s["entries"]  # type: ignore[attr-defined]
            f.submethods = b["methods"] | s["methods"]  # type: ignore[attr-defined]
            out.append(f)
    return out


def _pair_bound(B, act: Factor, A, l2_B: float, l2_A: float, linf_B: float, linf_A: float):
    """sup over D diagonal with entries in [lo, hi] of ||B D A|| (L2) and ||B D A||_inf; see the module doc."""
    lo, hi = act.lo, act.hi
    mid, rad, amax = (lo + hi) / 2, (hi - lo) / 2, max(abs(lo), abs(hi))
    P = _mul(B, A)
    absP = _mul(_abs(B), _abs(A))
    s_prod = l2_B * l2_A
    s_abs, _ = _norm2(absP)
    s_tri = float((_col_norms(B) * _row_norms(A)).sum()) * (1 + 1e-12)
    base = min(s_prod, s_abs, s_tri)
    nP, _ = _norm2(P)
    l2 = min(amax * base, abs(mid) * nP + rad * base)
    inf_abs = _norm_inf(absP)
    linf = min(amax * inf_abs, abs(mid) * _norm_inf(P) + rad * inf_abs, amax * linf_B * linf_A)
    return l2, linf


def _pair_ok(B, A) -> bool:
    (ob, _), (_, ia) = _shape(B), _shape(A)
    if _is_diag(B) and _is_diag(A):
        return True
    return (_mul_cost(B, A) <= PAIR_FLOPS and ob * ia <= PAIR_ELEMS and min(ob, ia) <= PAIR_SIDE)


def _chain(f: list[Factor]) -> dict:
    """Dynamic programming over single factors and (lin, act, lin) pairs; returns bounds and bookkeeping."""
    n = len(f)
    b2 = [1.0] * (n + 1)
    binf = [1.0] * (n + 1)
    used_pair = [False] * (n + 1)
    methods: set[str] = set()
    entries = []
    for i, fac in enumerate(f):
        b2[i + 1] = b2[i] * fac.l2
        binf[i + 1] = binf[i] * fac.linf
        if (i >= 2 and fac.kind == "lin" and fac.mat is not None and f[i - 1].kind == "act"
                and f[i - 2].kind == "lin" and f[i - 2].mat is not None and _pair_ok(fac.mat, f[i - 2].mat)):
            t0 = time.perf_counter()
            p2, pinf = _pair_bound(fac.mat, f[i - 1], f[i - 2].mat, fac.l2, f[i - 2].l2, fac.linf, f[i - 2].linf)
            fac.pair_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
            if b2[i - 2] * p2 < b2[i + 1]:
                b2[i + 1] = b2[i - 2] * p2
                used_pair[i + 1] = True
            binf[i + 1] = min(binf[i + 1], binf[i - 2] * pinf)
        entries.append({"path": ",".join(fac.paths), "type": fac.type, "kind": fac.kind, "method": fac.method,
                        "l2": fac.l2, "linf": fac.linf, "seconds": round(fac.seconds, 6)})
        methods.add(fac.method)
        if fac.kind == "res":
            entries.extend(fac.sub)  # type: ignore[attr-defined]
            methods |= fac.submethods  # type: ignore[attr-defined]
    if any(used_pair):
        methods.add("pair-midpoint(lin,act,lin)")
    return {"l2": b2[n], "linf": binf[n], "b2": b2, "binf": binf, "entries": entries, "methods": methods,
            "used_pair": any(used_pair)}


def _gloro(f: list[Factor], ch: dict, value: float, linf: float):
    """Per-class-pair bounds (L2 and Linf) from the last explicit linear factor; None when not available."""
    if not f or f[-1].kind != "lin" or f[-1].mat is None or _is_diag(f[-1].mat):
        return None, None, ""
    M = f[-1].mat
    C = M.shape[0]
    if C < 2:
        return None, None, ""
    n = len(f)
    iy, ij = torch.triu_indices(C, C, 1)
    V = M[iy] - M[ij]                                                     # (P, h)
    K2 = V.norm(dim=1) * ch["b2"][n - 1]
    Kinf = V.abs().sum(dim=1) * ch["binf"][n - 1]
    method = "gloro-row-norm x rest"
    if (n >= 3 and f[-2].kind == "act" and f[-3].kind == "lin" and f[-3].mat is not None
            and float(V.shape[0]) * _shape(f[-3].mat)[0] * _shape(f[-3].mat)[1] <= PAIR_FLOPS):
        A = f[-3].mat
        act = f[-2]
        lo, hi = act.lo, act.hi
        mid, rad, amax = (lo + hi) / 2, (hi - lo) / 2, max(abs(lo), abs(hi))
        VA = _mul(V, A)
        absVA = _mul(V.abs(), _abs(A))
        s_prod = V.norm(dim=1) * f[-3].l2
        s_abs = absVA.norm(dim=1)
        s_tri = V.abs() @ _row_norms(A)
        base = torch.minimum(torch.minimum(s_prod, s_abs), s_tri * (1 + 1e-12))
        kb = torch.minimum(amax * base, abs(mid) * VA.norm(dim=1) + rad * base) * ch["b2"][n - 3]
        sinf = V.abs() @ _row_l1(A)
        kbinf = torch.minimum(amax * sinf, abs(mid) * VA.abs().sum(dim=1) + rad * sinf) * ch["binf"][n - 3]
        if bool((kb < K2).any()):
            method = "gloro-row-norm x rest, with pair-midpoint on the last hidden layer"
        K2 = torch.minimum(K2, kb)
        Kinf = torch.minimum(Kinf, kbinf)
    K2 = torch.minimum(K2 * (1 + FINAL_SLACK + 1e-12), torch.full_like(K2, math.sqrt(2) * value))
    Kinf = torch.minimum(Kinf * (1 + FINAL_SLACK + 1e-12), torch.full_like(Kinf, 2 * linf))
    P2 = torch.zeros(C, C, dtype=torch.float64)
    Pinf = torch.zeros(C, C, dtype=torch.float64)
    P2[iy, ij] = K2
    P2[ij, iy] = K2
    Pinf[iy, ij] = Kinf
    Pinf[ij, iy] = Kinf
    return P2, Pinf, method


def lipschitz_upper(model: nn.Module, in_shape, *, pairs: bool = True, threads: int = 1) -> UpperBound:
    """Certified global L2 (and Linf) Lipschitz upper bound of the logit map of ``model`` on inputs of ``in_shape``
    (without the batch axis, e.g. (1, 28, 28) or (64,)).

    The model is copied to float64 in eval mode (BatchNorm uses its running statistics); the caller's model is not
    modified. Only modules whose forward certify can vouch for are bounded: exact classes of the table
    ``certify.supported_layers()`` (or subclasses that redefine nothing of theirs), with no forward / forward-pre
    hooks (module or global) and no method replaced on the instance. Anything else raises CertifyError, one line
    naming the module's path and why, before the model is run. See the module docstring for the proof sketch.

    threads: torch threads used meanwhile (default 1: on a shared CPU, threaded LAPACK/complex kernels can be two
    orders of magnitude slower under contention; the previous setting is restored afterwards).
    """
    t0 = time.perf_counter()
    with lapack_threads(threads):
        ub = _upper(model, in_shape, pairs)
    ub.seconds = time.perf_counter() - t0
    return ub


def _upper(model: nn.Module, in_shape, pairs: bool) -> UpperBound:
    t0 = time.perf_counter()
    try:
        in_shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise CertifyError(f"in_shape must be a tuple of ints, got {in_shape!r}") from None
    if not in_shape or any(s <= 0 for s in in_shape):
        raise CertifyError(f"in_shape must be a non-empty tuple of positive ints, got {in_shape!r}")
    check_model(model)
    m64 = float64_copy(model)
    with torch.no_grad():
        try:
            out = m64(torch.zeros(1, *in_shape, dtype=torch.float64))
        except CertifyError:
            raise
        except Exception as exc:
            raise CertifyError(f"model does not accept inputs of shape {in_shape}: {type(exc).__name__}: {exc}") \
                from None
    prog = _reorder(walk(m64, in_shape))
    f = _factors(prog)
    ch = _chain(f)
    value = ch["l2"] * (1 + FINAL_SLACK)
    linf = ch["linf"] * (1 + FINAL_SLACK)
    P2 = Pinf = None
    pair_method = ""
    if pairs and out.dim() == 2:                      # per-class pairs only for (N, C) logits
        P2, Pinf, pair_method = _gloro(f, ch, value, linf)
    methods = sorted(ch["methods"])
    method = "layer-product[" + ", ".join(methods) + "]"
    return UpperBound(value=float(value), method=method, linf=float(linf), pair=P2, seconds=time.perf_counter() - t0,
                      per_layer=ch["entries"], linf_pair=Pinf,
                      linf_method="inf-norm layer-product (max abs row sums" + (", pair-midpoint" if ch["used_pair"]
                                                                                else "") + ")",
                      pair_method=pair_method, in_dim=int(math.prod(in_shape)), num_classes=int(out.shape[-1]),
                      in_shape=in_shape)
