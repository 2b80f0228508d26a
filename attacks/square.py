"""Square (Andriushchenko et al., ECCV 2020), AutoAttack's black-box attack, with a square of its own for every row.

The algorithm is the original's: a start of vertical stripes (Linf: ±eps per column and channel) or of Square's L2
pattern tiled over the image, then ``n_queries`` iterations; each proposes a change on one random square whose side
follows the schedule p_init = 0.8 halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (of 10000, rescaled to
the query budget) and keeps it where the margin loss decreases or the point becomes misclassified. Linf: the square
gets ±2·eps per channel. L2: the mass of the square and of a second random window is redistributed with the
pattern of the original.

What differs: the original draws one square position per iteration for the whole batch, and runs its loop in Python
over iterations with a host sync each; here every row draws its own position (the rows explore independently, so
restarts as rows are real restarts), the squares are built as masks in one tensor operation, and a row leaves the
batch as soon as its point is misclassified (the original keeps points until the batch is done, then stops).
Inputs are (N, C, H, W) images with H == W (attacks.autoattack shows vector data as images).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .rows import Found, compaction, keep, rows_of, sync_every
from .threat import box_bounds

P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


@dataclass(frozen=True)
class SquareConfig:
    """discard: 0 runs every row its whole budget (the original); k > 0 drops, at 1/5, 2/5 and 4/5 of the budget, a
    row whose margin is above k times what it would still lose if it kept its last stretch's pace (see discard)."""
    n_queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    discard: float = 0.0


def checkpoints(n_queries: int) -> dict[int, int]:
    """{query: the query of its mark}: the discard rule looks at 1/5, 2/5 and 4/5 of the budget, each against the
    margin at half that many queries (the square schedule is rescaled with the budget, so are these)."""
    return {c: c // 2 for c in (n_queries // 5, 2 * n_queries // 5, 4 * n_queries // 5) if c >= 2}


def discard(m_mark: torch.Tensor, m_now: torch.Tensor, now: int, n_queries: int, k: float) -> torch.Tensor:
    """Rows that will not break in the budget left, by the statistics of their own run (A3's point, Liu et al. 2022:
    spend queries where the margin says they can pay): Square's margin falls by about the same amount per doubling
    of queries while a row is on its way to breaking, and by less and less once it stalls, so a row whose margin is
    above k times (its fall over the last doubling) x (the doublings left) is dropped. Measured on the quantized zoo
    models at eps 0.1 (5000 queries, two starts): with k = 2 no row that would break was dropped, and the rows
    that never break stop at about half their budget."""
    doublings = math.log2(n_queries / now)
    return m_now > k * (m_mark - m_now).clamp_min(0.0) * doublings


def p_at(it: int, n_queries: int, p_init: float) -> float:
    """The share of the image a square covers at iteration ``it`` (the original's schedule, rescaled)."""
    it = int(it / n_queries * 10000)
    for bound, div in P_SCHEDULE:
        if it <= bound:
            return p_init / div
    return p_init / 512


def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j: negative where the point is misclassified."""
    zy = z.gather(1, y[:, None])[:, 0]
    return zy - z.scatter(1, y[:, None], float("-inf")).amax(1)


@functools.lru_cache(maxsize=64)
def _windows(h: int, s: int, device) -> torch.Tensor:
    """(positions, 1, h, h) bool: every s x s square of an h x h image, position = top * (h - s + 1) + left."""
    k = h - s + 1
    ar = torch.arange(h, device=device)
    top = torch.arange(k, device=device).repeat_interleave(k)
    left = torch.arange(k, device=device).repeat(k)
    in_h = (ar[None, :] >= top[:, None]) & (ar[None, :] < top[:, None] + s)
    in_w = (ar[None, :] >= left[:, None]) & (ar[None, :] < left[:, None] + s)
    return (in_h[:, :, None] & in_w[:, None, :])[:, None]


def _window(rows: int, h: int, s: int, gen, device):
    """(position, mask): one random s x s square per row and its (rows, 1, h, h) mask."""
    table = _windows(h, s, device)
    pos = torch.randint(0, table.shape[0], (rows,), generator=gen, device=device)
    return pos, table[pos]


def _window_sides(rows: int, h: int, s: int, gen, device, dtype):
    """_window's draw as two 0/1 factors, (rows, 1, h, 1) and (rows, 1, 1, h), whose product is its mask. Why: the
    Linf proposal multiplies them into its step without building (or converting) an h x h mask per query."""
    k = h - s + 1
    pos = torch.randint(0, k * k, (rows,), generator=gen, device=device)
    ar = torch.arange(h, device=device)
    side = lambda lo: ((ar >= lo[:, None]) & (ar < lo[:, None] + s)).to(dtype)  # noqa: E731
    return side(pos // k).view(rows, 1, h, 1), side(pos % k).view(rows, 1, 1, h)


def _signs(shape, gen, device, dtype):
    return torch.where(torch.rand(shape, generator=gen, device=device) > 0.5, 1.0, -1.0).to(dtype)


def square(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, cfg: SquareConfig = SquareConfig(), *,
           seed: int = 0, found: Found | None = None) -> Found:
    """Square on every point of x (N, C, H, H) not already broken in ``found``, ``cfg.restarts`` rows per point.
    Returns ``found`` updated with the points some row misclassified."""
    found = found if found is not None else Found.start(x)
    todo = (~found.broken).nonzero().flatten()
    if todo.numel() == 0:
        return found
    c, h, w = x.shape[1:]
    pid = todo.repeat(cfg.restarts)
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    x0 = x.detach()[pid]
    yy = y[pid]
    lo, hi = box_bounds(x.detach(), eps, norm)
    lo, hi = lo[pid], hi[pid]
    with torch.no_grad():
        xb = _start(x0, lo, hi, eps, norm, gen)
        m_best = margin(model(xb), yy)
        every = sync_every(x.device)
        hit = m_best <= 0
        marks = checkpoints(cfg.n_queries) if cfg.discard > 0 else {}
        m_mark = m_best.clone()
        for i in range(cfg.n_queries):
            live = None
            if i in marks:  # rows the statistics give up on leave unbroken (settled first: a hit row is kept)
                live = found.settle(pid, hit, xb) & ~discard(m_mark, m_best, i, cfg.n_queries, cfg.discard)
            elif i % every == 0 and bool(hit.any()):  # the one host sync: rows of broken points leave
                live = found.settle(pid, hit, xb)
            idx = None if live is None else compaction(live)
            if idx is not None:
                pid, x0, yy, lo, hi, xb, m_best, hit, m_mark = keep(idx, pid, x0, yy, lo, hi, xb, m_best, hit,
                                                                      m_mark)
                if pid.numel() == 0:
                    break
            if i in marks.values():  # after the rule: a checkpoint is the next one's mark
                m_mark = m_best.clone()
            p = p_at(i, cfg.n_queries, cfg.p_init)
            if norm == "Linf":
                x_new = _propose_linf(x0, xb, lo, hi, eps, p, gen)
            else:
                x_new = _propose_l2(x0, xb, eps, p, gen)
            m = margin(model(x_new), yy)
            take = (m < m_best) & ~hit
            xb = _take(take, x_new, xb)
            m_best = torch.where(take, m, m_best)
            hit = hit | (m_best <= 0)
        found.settle(pid, hit, xb)
    return found


def _take(take: torch.Tensor, x_new: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """xb, in place, with the rows ``take`` marks replaced by x_new's: only those rows are copied where
    rows.rows_of chooses them (a few per query)."""
    rows = rows_of(take)
    xb[rows] = torch.where(take[rows][:, None, None, None], x_new[rows], xb[rows])
    return xb


def _start(x0, lo, hi, eps, norm, gen):
    rows, c, h, w = x0.shape
    if norm == "Linf":  # vertical stripes: one sign per row, channel and column
        return torch.clamp(x0 + eps * _signs((rows, c, 1, w), gen, x0.device, x0.dtype), lo, hi)
    s = h // 5
    start = (h - 5 * s) // 2
    delta = torch.zeros_like(x0)
    for vh in range(start, start + s * (h // s), s):
        for vw in range(start, start + s * (w // s), s):
            if vh + s > h or vw + s > w:
                continue
            delta[:, :, vh:vh + s, vw:vw + s] += eta(s, x0.device, x0.dtype)[None, None] * \
                _signs((rows, c, 1, 1), gen, x0.device, x0.dtype)
    delta = delta / (delta.reshape(rows, -1).norm(dim=1).reshape(rows, 1, 1, 1) + 1e-12)
    return torch.clamp(x0 + eps * delta, 0.0, 1.0)


def _propose_linf(x0, xb, lo, hi, eps, p, gen):
    rows, c, h, w = x0.shape
    s = min(max(int(round(math.sqrt(p * h * w))), 1), h)
    in_h, in_w = _window_sides(rows, h, s, gen, x0.device, x0.dtype)
    step = 2.0 * eps * _signs((rows, c, 1, 1), gen, x0.device, x0.dtype)
    return torch.clamp(torch.addcmul(xb, step * in_h, in_w), lo, hi)  # xb + mask * step (exact products)


def _rectangles(a: int, b: int, device, dtype) -> torch.Tensor:
    """Square's L2 building block: nested rectangles weighted 1/(k+1)^2 around the centre, unit norm."""
    out = torch.zeros(a, b, device=device, dtype=dtype)
    ca, cb = a // 2, b // 2
    for k in range(max(ca + 1, cb + 1)):
        top, left = max(ca - k, 0), max(cb - k, 0)
        out[top:min(ca - k + 2 * k + 1, a), left:min(cb - k + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
    return out / out.norm().clamp_min(1e-30)


@functools.lru_cache(maxsize=64)
def eta(s: int, device, dtype) -> torch.Tensor:
    """Square's s x s L2 pattern: the upper half positive, the lower half negative, unit norm (cached: the schedule
    visits a handful of sides; callers never write into it)."""
    d = torch.zeros(s, s, device=device, dtype=dtype)
    d[: s // 2] = _rectangles(s // 2, s, device, dtype)
    d[s // 2:] = -_rectangles(s - s // 2, s, device, dtype)
    return d / d.norm().clamp_min(1e-30)


@functools.lru_cache(maxsize=64)
def _placed(h: int, s: int, device, dtype) -> torch.Tensor:
    """(2, positions, 1, h, h): the L2 pattern eta(s) and its transpose at every position of _windows(h, s)."""
    k = h - s + 1
    out = torch.zeros(2, k * k, 1, h, h, device=device, dtype=dtype)
    pat = eta(s, device, dtype)
    for i, p in enumerate((pat, pat.T)):
        for top in range(k):
            for left in range(k):
                out[i, top * k + left, 0, top:top + s, left:left + s] = p
    return out


def _propose_l2(x0, xb, eps, p, gen):
    rows, c, h, w = x0.shape
    s = max(int(round(math.sqrt(p * h * w))), 3)
    s = min(s + (s % 2 == 0), h)
    delta = xb - x0
    pos, mask1 = _window(rows, h, s, gen, x0.device)
    _, mask2 = _window(rows, h, s, gen, x0.device)
    norm_w1 = ((delta * mask1) ** 2).sum((-2, -1), keepdim=True).sqrt()           # (rows, c, 1, 1)
    norm_img = (delta ** 2).reshape(rows, -1).sum(1).sqrt().reshape(rows, 1, 1, 1)
    both = mask1 | mask2
    norm_ws = ((delta * both) ** 2).sum((-2, -1), keepdim=True).sqrt()
    flip = torch.randint(0, 2, (rows,), generator=gen, device=x0.device)      # the pattern or its transpose
    new = _placed(h, s, x0.device, x0.dtype)[flip, pos] * _signs((rows, c, 1, 1), gen, x0.device, x0.dtype)
    new = new + delta * mask1 / (1e-12 + norm_w1)
    new_norm = ((new * mask1) ** 2).sum((-2, -1), keepdim=True).sqrt()
    scale = ((eps ** 2 - norm_img ** 2).clamp_min(0.0) / c + norm_ws ** 2).sqrt()
    new = new * mask1 / (1e-12 + new_norm) * scale
    delta = torch.where(mask2, torch.zeros_like(delta), delta)
    delta = torch.where(mask1, new, delta)
    dn = (delta ** 2).reshape(rows, -1).sum(1).sqrt().reshape(rows, 1, 1, 1)
    return torch.clamp(x0 + delta / (dn + 1e-12) * eps, 0.0, 1.0)
