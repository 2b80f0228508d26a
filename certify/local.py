"""Local certificates per point: interval bound propagation (IBP, Gowal et al. 2018) and backward linear relaxation
(CROWN, Zhang et al. 2018, with the adaptive ReLU lower slope) of the margins f_y - f_j over a ball around x.

A point is certified at eps when the lower bound of every margin f_y - f_j (j != y) over the ball is positive. The
ball, Linf or L2, is intersected with the pixel box [0, 1], where every attack searches and every example is
validated: in L2 a bound is the larger of the ball's and the box's. Both methods run on the program ``_walk`` makes
of a float64 copy of the model (the same admission and refusals as the Lipschitz bounds).

IBP pushes an interval per neuron through every layer (exact for one affine layer on a box) and folds the margins
into the affine layers after the last nonlinearity. CROWN bounds each
margin by a linear function of the input, built backwards: affine layers are composed exactly, a ReLU between
pre-activation bounds [l, u] is replaced by its upper chord and a lower line of slope 1 where u > -l else 0 (for a
LeakyReLU of slope a: 1 or a), a max-pool by its window's element of largest lower bound (below) and that element or
its window's largest upper bound (above), a residual block by the sum of its branches' relaxations, a Tanh or
Sigmoid by constant bounds. The linear function is then minimised over the ball in closed form (Linf box:
Λ⁺·lo + Λ⁻·hi; L2: Λ·x − eps·‖Λ‖₂). Pre-activation bounds: exact for an activation after affine layers only;
deeper, CROWN's own backward bounds where they fit a work budget (``CROWN_WORK``), else IBP's (CROWN-IBP);
always intersected with IBP's. Exact after affine layers alone: IBP's on a Linf box; centre ± eps·(row norm) in L2.

Floating point: everything in float64; each margin bound is reduced by ``fp_margin * (1 + max |f|)`` so that the
float32 model's rounding cannot break a certified point (the global certificate's rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._walk import Act, CertifyError, MaxPool, Op, Res, check_model, float64_copy, walk

__all__ = ["LocalBounds", "margin_lower", "local_certify", "logit_intervals", "METHODS"]

METHODS = ("ibp", "crown")
# intermediate CROWN bounds of a layer of h neurons cost 2h backward rows per point through every earlier layer: run
# when 2h x (the earlier layers' multiply-adds and sizes) stays under this per point, else IBP's bounds there. A
# budget of elements alone let a CNN of width 4 (its 256-unit dense layer behind two convolutions) spend minutes per
# cell in certification; at 5e7 that layer takes IBP's bounds, the digits MLPs and small CNNs of the tests CROWN's
CROWN_WORK = 5e7
CHUNK_ELEMS = 20_000_000  # elements of one chunk of backward rows (points x rows x layer size)


@dataclass
class Ball:
    """Per point (N,) radius around x (N, *shape), in 'Linf' (with the [0,1] box) or 'L2'."""
    x: torch.Tensor
    eps: torch.Tensor
    norm: str

    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A box holding the ball (the ball itself for Linf)."""
        e = self.eps.view(-1, *([1] * (self.x.dim() - 1)))
        return (self.x - e).clamp(0, 1), (self.x + e).clamp(0, 1)

    def take(self, idx) -> "Ball":
        return Ball(self.x[idx], self.eps[idx], self.norm)

    def minimum(self, lam: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """min over the ball of lam·x' + bias per point and row: lam (N, m, *shape), bias (N, m) -> (N, m)."""
        box = box_minimum(lam, bias, *self.box())
        if self.norm == "Linf":
            return box
        lam = lam.flatten(2)
        ball = bias + (lam @ self.x.flatten(1)[:, :, None])[..., 0] - self.eps[:, None] * lam.norm(dim=2)
        return torch.maximum(box, ball)


def box_minimum(lam: torch.Tensor, bias: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min over the box [lo, hi] (N, *shape) of lam·x + bias per point and row: Λ⁺·lo + Λ⁻·hi + bias."""
    lam = lam.flatten(2)
    return bias + (lam.clamp(min=0) @ lo.flatten(1)[:, :, None] + lam.clamp(max=0) @ hi.flatten(1)[:, :, None])[..., 0]


# ----------------------------------------------------------------------------------------------- IBP

def _abs_apply(op: Op, r: torch.Tensor) -> torch.Tensor:
    """|A| r for the linear part A of op (r >= 0): the radius of A's image of a box."""
    if op.kind == "linear":
        return r @ op.data["weight"].abs().T
    if op.kind == "conv":
        d = op.data
        pt, pb, pl, pr = d["pads"]
        return F.conv2d(F.pad(r, (pl, pr, pt, pb)), d["weight"].abs(), None, stride=d["stride"], dilation=d["dilation"])
    if op.kind == "diag":
        return r * op.data["diag"].abs()
    return op.fn(r)  # reshape, identity, average pool: non-negative already


def _affine(op: Op, x: torch.Tensor) -> torch.Tensor:
    off = op.data.get("offset")
    y = op.fn(x)
    return y if off is None else y + off


def ibp(prog: list, lo: torch.Tensor, hi: torch.Tensor, record: dict | None = None):
    """Interval (lo, hi) of the program's output; ``record[id(node)]`` = the input interval of every activation and
    max-pool (CROWN's relaxations need them)."""
    for node in prog:
        if isinstance(node, Op):
            c, r = (hi + lo) / 2, (hi - lo) / 2
            c, r = _affine(node, c), _abs_apply(node, r)
            lo, hi = c - r, c + r
        elif isinstance(node, Res):
            bl, bh = ibp(node.branch, lo, hi, record)
            sl, sh = ibp(node.shortcut, lo, hi, record)
            lo, hi = bl + sl, bh + sh
        else:
            if record is not None:
                record.setdefault(id(node), (lo, hi))
            f = node.fn if isinstance(node, Act) else node.module
            lo, hi = f(lo), f(hi)
    return lo, hi


# ----------------------------------------------------------------------------------------------- CROWN

def _adjoint(op: Op, lam: torch.Tensor) -> torch.Tensor:
    """lam (N, m, *out) -> lam A (N, m, *in) for the linear part A of op."""
    n, m = lam.shape[:2]
    if op.kind == "linear" and len(op.in_shape) == 1:
        return lam @ op.data["weight"]
    if op.kind == "diag":
        return lam * op.data["diag"]
    if op.kind in ("reshape", "identity"):
        return lam.reshape(n, m, *op.in_shape)
    z = torch.zeros(n * m, *op.in_shape, dtype=lam.dtype, requires_grad=True)
    with torch.enable_grad():
        out = op.fn(z)
        (g,) = torch.autograd.grad(out, z, lam.reshape(n * m, *op.out_shape))
    return g.reshape(n, m, *op.in_shape)


def _act_lines(node: Act, lo: torch.Tensor, hi: torch.Tensor):
    """(lower slope, lower intercept, upper slope, upper intercept) per neuron of an activation on [lo, hi]."""
    if node.type in ("ReLU", "LeakyReLU"):
        a = float(node.fn.negative_slope) if node.type == "LeakyReLU" else 0.0
        flo, fhi = node.fn(lo), node.fn(hi)
        width = hi - lo
        chord = torch.where(width > 0, (fhi - flo) / width.clamp(min=1e-300), torch.ones_like(lo))
        up_b = flo - chord * lo
        # a line through the kink: slope 1 where the interval leans positive, a where it leans negative (adaptive)
        low_s = torch.where(hi > -lo, torch.ones_like(lo), torch.full_like(lo, a))
        stable_pos, stable_neg = lo >= 0, hi <= 0
        low_s = torch.where(stable_pos, torch.ones_like(lo), torch.where(stable_neg, torch.full_like(lo, a), low_s))
        up_s = torch.where(stable_pos, torch.ones_like(lo), torch.where(stable_neg, torch.full_like(lo, a), chord))
        up_b = torch.where(stable_pos | stable_neg, torch.zeros_like(lo), up_b)
        return low_s, torch.zeros_like(lo), up_s, up_b
    zero = torch.zeros_like(lo)  # any other monotone activation: its constant bounds
    return zero, node.fn(lo), zero, node.fn(hi)


def _windows(node: MaxPool) -> torch.Tensor:
    """(out_dim, k) flat input index of every element of every window (-1 for padding)."""
    m = node.module
    c, h, w = node.in_shape
    idx = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w) + 1  # 0 marks padding
    k, s, p, d = (torch.nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding,
                                                               m.dilation))
    if m.ceil_mode:
        raise CertifyError(f"certify: model.{node.path} (MaxPool2d) has ceil_mode=True; CROWN does not bound it")
    cols = F.unfold(idx.reshape(c, 1, h, w), k, dilation=d, padding=p, stride=s)  # (c, k, L)
    cols = cols.permute(0, 2, 1).reshape(-1, cols.shape[1])  # (c*L, k) in (channel, position) order
    return cols.long() - 1


def _maxpool_backward(node: MaxPool, lam, bias, lo, hi):
    win = _windows(node)
    n, m = lam.shape[:2]
    flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
    safe = win.clamp(min=0)
    pad = (win < 0)[None]
    wl = flat_lo[:, safe].masked_fill(pad, -float("inf"))  # (N, out, k)
    wh = flat_hi[:, safe].masked_fill(pad, -float("inf"))
    best = wl.argmax(2)  # (N, out)
    best_lo = wl.gather(2, best[..., None])[..., 0]
    others = wh.scatter(2, best[..., None], -float("inf")).amax(2)
    exact = best_lo >= others
    top = wh.amax(2)
    src = safe[None].expand(n, -1, -1).gather(2, best[..., None])[..., 0]  # (N, out) input index
    lam = lam.flatten(2)
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    through = pos + torch.where(exact[:, None], neg, torch.zeros_like(neg))
    bias = bias + (torch.where(exact[:, None], torch.zeros_like(neg), neg) * top[:, None]).sum(2)
    out = torch.zeros(n, m, flat_lo.shape[1], dtype=lam.dtype)
    out.scatter_add_(2, src[:, None].expand(-1, m, -1), through)
    return out.reshape(n, m, *node.in_shape), bias


def backward(prog: list, lam: torch.Tensor, bias: torch.Tensor, bounds: dict):
    """(Λ', b') with Λ·out + b >= Λ'·in + b' for every input of the program in the region ``bounds`` came from:
    lam (N, m, *out_shape) -> (N, m, *in_shape)."""
    for node in reversed(prog):
        if isinstance(node, Op):
            off = node.data.get("offset")
            if off is not None:
                bias = bias + (lam.flatten(2) * off.flatten()).sum(2)
            lam = _adjoint(node, lam)
        elif isinstance(node, Res):
            lb, bb = backward(node.branch, lam, torch.zeros_like(bias), bounds)
            ls, bs = backward(node.shortcut, lam, torch.zeros_like(bias), bounds)
            lam, bias = lb + ls, bias + bb + bs
        elif isinstance(node, Act):
            lo, hi = bounds[id(node)]
            ls, lb, us, ub = _act_lines(node, lo[:, None], hi[:, None])
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            bias = bias + (pos * lb + neg * ub).flatten(2).sum(2)
            lam = pos * ls + neg * us
        else:
            lo, hi = bounds[id(node)]
            lam, bias = _maxpool_backward(node, lam, bias, lo, hi)
    return lam, bias


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _size(node) -> int:
    return _numel(node.shape if isinstance(node, Act) else node.in_shape)


def _input_shape(node) -> tuple:
    return node.shape if isinstance(node, Act) else node.in_shape


def _row_norms(prefix: list, shape: tuple) -> torch.Tensor:
    """L2 norm of each row of the linear part of an affine-only ``prefix`` (the same for every point), by backward
    passes of identity rows in chunks."""
    if not prefix:
        return torch.ones(shape, dtype=torch.float64)
    kept = prefix[-1].data.get("row_norms")  # a program is walked once and bounded at many radii
    if kept is not None:
        return kept
    h, d = _numel(shape), _size(prefix[0])
    step = max(1, CHUNK_ELEMS // max(h, d))
    out = []
    for s in range(0, h, step):
        k = min(step, h - s)
        rows = torch.zeros(k, h, dtype=torch.float64)
        rows[torch.arange(k), torch.arange(s, s + k)] = 1
        rows = rows.reshape(1, k, *shape)
        lam, _ = backward(prefix, rows, torch.zeros(1, rows.shape[1], dtype=torch.float64), {})
        out.append(lam.flatten(2).norm(dim=2)[0])
    prefix[-1].data["row_norms"] = torch.cat(out).reshape(shape)
    return prefix[-1].data["row_norms"]


def _flat(prog: list) -> list:
    """Every node of a program, residual blocks' branches included."""
    return [leaf for nd in prog for leaf in (_flat(nd.branch) + _flat(nd.shortcut) if isinstance(nd, Res) else [nd])]


def _crown_bounds(prog: list, i: int, ball: Ball, bounds: dict):
    """CROWN's (lo, hi) of the input of top-level node i (N, *shape), or None where it does not fit the budget: 2h
    rows per point of a layer of h neurons, backwards through every earlier layer."""
    shape = _input_shape(prog[i])
    h = _numel(shape)
    sizes = [h] + [_size(nd) for nd in prog[:i]]
    per_point = 2 * h * max(sizes)
    work = 2 * h * sum(nd.flops if isinstance(nd, Op) else _size(nd) for nd in _flat(prog[:i]))
    if work > CROWN_WORK or per_point > CHUNK_ELEMS:
        return None
    n = ball.x.shape[0]
    eye = torch.eye(h, dtype=torch.float64)
    spec = torch.cat([eye, -eye]).reshape(2 * h, *shape)
    step = max(1, CHUNK_ELEMS // per_point)
    out = []
    for s in range(0, n, step):
        part = ball.take(slice(s, s + step))
        lam = spec[None].expand(part.x.shape[0], -1, *([-1] * len(shape)))
        sub = {k: (v[0][s:s + step], v[1][s:s + step]) for k, v in bounds.items()}
        lam, b = backward(prog[:i], lam, torch.zeros(part.x.shape[0], 2 * h, dtype=torch.float64), sub)
        out.append(part.minimum(lam, b))
    m = torch.cat(out)
    return m[:, :h].reshape(n, *shape), (-m[:, h:]).reshape(n, *shape)


def _first_nonlinear(prog: list) -> int:
    """Index of the first top-level node that is not affine (len(prog) for an affine program)."""
    return next((i for i, nd in enumerate(prog) if not isinstance(nd, Op)), len(prog))


def ibp_bounds(prog: list, ball: Ball, record: dict | None = None):
    """IBP's output interval over the ball: from the box holding it (Linf: the ball), except that in L2 the affine
    layers before the first nonlinearity are bounded exactly, centre ± eps·(row norm) (the dual norm of the first
    layer's rows, as IBP does for Lp balls)."""
    lo, hi = ball.box()
    if ball.norm == "L2":
        i = _first_nonlinear(prog)
        shape = _input_shape(prog[i]) if i < len(prog) else tuple(ibp(prog, lo[:1], hi[:1])[0].shape[1:])
        centre = ibp(prog[:i], ball.x, ball.x)[0]
        r = ball.eps.view(-1, *([1] * (centre.dim() - 1))) * _row_norms(prog[:i], shape)
        plo, phi = ibp(prog[:i], lo, hi)
        lo, hi, prog = torch.maximum(plo, centre - r), torch.minimum(phi, centre + r), prog[i:]
    return ibp(prog, lo, hi, record)


def _pre_bounds(prog: list, ball: Ball, use_crown: bool) -> dict:
    """Input interval of every activation and max-pool: IBP's, tightened at top level by CROWN's where it fits
    (after affine layers alone IBP's are exact already)."""
    bounds: dict = {}
    ibp_bounds(prog, ball, bounds)
    if not use_crown:
        return bounds
    for i in range(_first_nonlinear(prog) + 1, len(prog)):
        node = prog[i]
        if isinstance(node, (Act, MaxPool)):
            got = _crown_bounds(prog, i, ball, bounds)
            if got is not None:
                il, ih = bounds[id(node)]
                bounds[id(node)] = (torch.maximum(il, got[0]), torch.minimum(ih, got[1]))
                _refresh(prog, i, bounds, ball)
    return bounds


def _refresh(prog: list, i: int, bounds: dict, ball: Ball) -> None:
    """IBP again from node i on, starting from its tightened input interval (later intervals shrink too)."""
    lo, hi = bounds[id(prog[i])]
    later: dict = {}
    ibp(prog[i:], lo, hi, later)
    for k, (l2, h2) in later.items():
        if k != id(prog[i]) and k in bounds:
            l1, h1 = bounds[k]
            bounds[k] = (torch.maximum(l1, l2), torch.minimum(h1, h2))


# ----------------------------------------------------------------------------------------------- margins

@dataclass
class LocalBounds:
    """Lower bounds of the margins f_y - f_j (j != y) over each point's ball: (N, C) with +inf at j == y."""
    ibp: torch.Tensor
    crown: torch.Tensor


def _spec(y: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, C, C): row j is e_y - e_j (row y is zero)."""
    eye = torch.eye(classes, dtype=torch.float64)
    return eye[y][:, None, :] - eye[None]


def margin_lower(prog: list, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: str,
                 methods=METHODS) -> LocalBounds:
    """Margin lower bounds of both methods for points x (N, *shape) at per-point radii eps (N,)."""
    ball = Ball(x, eps, norm)
    n, classes = x.shape[0], _numel(_output_shape(prog))
    spec, zero = _spec(y, classes), torch.zeros(n, classes, dtype=torch.float64)
    rows = torch.arange(n)
    out = {m: torch.full((n, classes), float("inf"), dtype=torch.float64) for m in METHODS}
    if "ibp" in methods:
        out["ibp"] = _ibp_margins(prog, ball, spec, zero)
    if "crown" in methods:
        lam, b = backward(prog, spec, zero, _pre_bounds(prog, ball, True))
        out["crown"] = ball.minimum(lam, b)
    for m in out.values():
        m[rows, y] = float("inf")
    return LocalBounds(out["ibp"], out["crown"])


def _output_shape(prog: list) -> tuple:
    last = prog[-1]
    return last.shape if isinstance(last, Act) else last.out_shape


def _ibp_margins(prog: list, ball: Ball, spec: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """IBP's margin bounds with the margins folded into the affine layers after the last nonlinearity (Gowal et al.
    2018's elision of the last layer): each margin's own weights meet the interval there, instead of the low end of
    f_y minus the high end of f_j (looser by up to the sum of both ranges)."""
    k = max((i + 1 for i, nd in enumerate(prog) if not isinstance(nd, Op)), default=0)
    lam, b = backward(prog[k:], spec, zero, {})  # affine layers only: exact
    if k == 0:
        return ball.minimum(lam, b)
    return box_minimum(lam, b, *ibp_bounds(prog[:k], ball))


def logit_intervals(model, x: torch.Tensor, eps: float, in_shape: tuple):
    """IBP's (lo, hi) of every logit over the Linf ball of radius eps around each point (in [0,1]), differentiable in
    the model's weights: what certified training (the ibp recipe) minimises through. The model is walked as it is
    (its dtype and device), so a layer certification refuses is refused here too."""
    prog = walk(model, tuple(in_shape), live=True)  # walked afresh: the weights move between steps
    return ibp_bounds(prog, Ball(x, torch.full((len(x),), float(eps), dtype=x.dtype, device=x.device), "Linf"))


def program(model, in_shape) -> list:
    """The walked float64 program of ``model`` for inputs of ``in_shape`` (CertifyError naming a refused layer)."""
    check_model(model)
    return walk(float64_copy(model), tuple(in_shape))


def local_certify(model, x: torch.Tensor, y: torch.Tensor, eps, norm: str, *, methods=METHODS,
                  fp_margin: float = 1e-5, batch_size: int = 256, prog: list | None = None) -> dict:
    """Per point (N,) booleans: certified by each method at radius eps (a float or per-point (N,) tensor).
    A misclassified point is certified by nothing."""
    from .certified import parse_norm
    nm = parse_norm(norm)
    prog = prog if prog is not None else program(model, tuple(x.shape[1:]))
    n = x.shape[0]
    eps = torch.as_tensor(eps, dtype=torch.float64).expand(n) if not torch.is_tensor(eps) or eps.dim() == 0 \
        else eps.to(torch.float64)
    out = {m: torch.zeros(n, dtype=torch.bool) for m in methods}
    with torch.no_grad():
        for s in range(0, n, batch_size):
            xb = x[s:s + batch_size].to("cpu", torch.float64)
            yb = y[s:s + batch_size].to("cpu").long()
            f = ibp(prog, xb, xb)[0]  # the walked float64 program at the point itself: its logits
            slack = fp_margin * (1 + f.abs().amax(1))
            correct = f.argmax(1) == yb
            got = margin_lower(prog, xb, yb, eps[s:s + batch_size], nm, methods)
            for meth in methods:
                lower = getattr(got, meth).amin(1)
                out[meth][s:s + batch_size] = correct & (lower - slack > 0)
    return out
