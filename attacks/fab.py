"""FAB-T (Croce & Hein, ICML 2020), AutoAttack's targeted minimum-norm attack, with its targets as rows of one batch.

Each iteration linearises the margin z_t - z_y at the current iterate, projects both the iterate and the clean point
onto that hyperplane within [0, 1] (the minimal Linf or L2 step, :func:`project_to_hyperplane`), and moves to a
convex combination of the two overshot projections (eta 1.05) that leans towards the clean point by at most
alpha_max (0.1). An iterate that is misclassified is kept when it is the closest so far, and the search steps back
towards the clean point (beta 0.9). AutoAttack standard runs 100 iterations from the clean point (no random start)
for each of the 9 targets (2nd..10th largest clean logit).

A point is broken when one of its rows found a misclassified iterate within eps; such a point drops all its rows
(attacks.rows), since a minimum-norm search below eps cannot change the verdict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rows import Found, compaction, keep, rows_of, sync_every


@dataclass(frozen=True)
class FABConfig:
    n_iter: int = 100
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9


# Rows per piece of a projection on the CPU: about 2**18 floats (1 MB) per tensor, so that the ~30 passes of a
# projection over its piece run in cache. On 3,400 x 784 rows at 2 threads: 39 ms against 79 ms whole.
PIECE_FLOATS = 1 << 18


def project_to_hyperplane(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """_project on pieces of rows on the CPU (each row's step is its own: the same steps bit for bit), whole on an
    accelerator."""
    rows = max(1, PIECE_FLOATS // max(1, t.shape[1]))
    if t.device.type != "cpu" or t.shape[0] <= rows:
        return _project(t, w, b, norm)
    return torch.cat([_project(t[i:i + rows], w[i:i + rows], b[i:i + rows], norm)
                      for i in range(0, t.shape[0], rows)])


def _project(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """The smallest step d (Linf or L2) with w·(t + d) = b and 0 <= t + d <= 1, per row (t, w: (R, d); b: (R,)).
    Where the box cannot reach the hyperplane, the step goes as far towards it as the box allows.

    Both norms reduce to one problem. Orient w so that the hyperplane lies ahead (c = b - w·t >= 0). Moving
    coordinate i in w_i's direction by at most its room (1 - t_i or t_i) gains w·d = sum_i a_i min(r, rho_i), where
    Linf: r is the step's norm, a_i = |w_i|, rho_i = room_i; L2: d_i = w_i min(r, rho_i) (the KKT form), a_i = w_i^2,
    rho_i = room_i / |w_i|. The gain is piecewise linear and increasing in r: sorting rho gives r exactly."""
    c = b - (w * t).sum(1)
    s = torch.where(c >= 0, 1.0, -1.0).to(w.dtype)
    w, c = w * s[:, None], c * s
    room = torch.where(w > 0, 1.0 - t, t).clamp_min(0.0)
    nz = w != 0
    aw = w.abs()
    if norm == "Linf":
        a, rho = aw, room
    else:
        a, rho = w * w, torch.where(nz, room / aw.clamp_min(1e-30), 0.0)
    r = _solve_rows(a, rho, c, nz.any(1))  # a is exactly 0 where w is (|0| = 0 * 0 = 0)
    if norm == "Linf":
        return torch.where(nz, torch.sign(w) * torch.minimum(r[:, None], room), 0.0)
    return torch.where(nz, w * torch.minimum(r[:, None], rho), 0.0)


def _solve_rows(a: torch.Tensor, rho: torch.Tensor, c: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
    """_solve on the rows whose step can move (some w_i != 0); r = 0 elsewhere, where the step is zero whatever r
    is. Why: behind a quantizer or a step most gradients are exactly zero, and the sort is most of FAB's own work.
    The same rows' r bit for bit (each row's sort and sums are its own). On an accelerator every row is solved
    (choosing them is a host sync)."""
    if a.device.type != "cpu" or bool(moves.all()):
        return _solve(a, rho, c)
    rows = moves.nonzero().flatten()
    r = torch.zeros_like(c)
    if rows.numel():
        r[rows] = _solve(a[rows], rho[rows], c[rows])
    return r


def _solve(a: torch.Tensor, rho: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Smallest r >= 0 with sum_i a_i min(r, rho_i) >= c (a, rho >= 0); the largest rho where no r reaches c."""
    rs, order = _ascending(rho)
    as_ = a.gather(1, order)
    ars = as_ * rs
    below = torch.cumsum(ars, 1) - ars                      # sum over j < k of a_j rho_j
    above = as_.flip(1).cumsum(1).flip(1)                   # sum over j >= k of a_j
    reach = below + rs * above                              # gain at r = rho_(k), nondecreasing in k
    k = (reach < c[:, None]).sum(1)
    d = rs.shape[1]
    kk = k.clamp_max(d - 1)[:, None]
    r = (c - below.gather(1, kk)[:, 0]) / above.gather(1, kk)[:, 0].clamp_min(1e-30)
    r = torch.where(k >= d, rs[:, -1], r)
    return r.clamp_min(0.0)


def _ascending(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rho.sort(1) (rho >= 0, no NaN), the same permutation. Why: on the CPU, torch sorts int32 keys with the
    same comparison sort as floats, 1.5x as fast (a float compare also orders NaNs), and for non-negative floats the
    order of the bit patterns is the order of the values. -0.0 is made +0.0 first (its pattern is negative); ties
    compare equal in both, so even their order is the float sort's."""
    if rho.device.type != "cpu" or rho.dtype != torch.float32:
        return rho.sort(1)
    keys, order = (rho + 0.0).view(torch.int32).sort(1)
    return keys.view(torch.float32), order


def _keep_misclassified(adv, x0, x1, best, hit, x_hit, eps: float, norm: str, beta: float) -> None:
    """In place, on the rows whose iterate is misclassified: keep the closest one so far (its distance in float64),
    mark it a hit within eps, and step back towards the clean point; only those rows are computed where
    rows.rows_of chooses them (most rows of a robust point never are), with the same result as every row."""
    rows = rows_of(adv)
    if isinstance(rows, torch.Tensor) and rows.numel() == 0:
        return
    xa, x0a, adv_r = x1[rows], x0[rows], adv[rows]
    dist = _norm(xa.double() - x0a.double(), norm)
    closer = adv_r & (dist < best[rows])
    best[rows] = torch.where(closer, dist, best[rows])
    inside = closer & (dist <= eps)
    x_hit[rows] = torch.where((inside & ~hit[rows])[:, None], xa, x_hit[rows])
    hit[rows] = hit[rows] | inside
    x1[rows] = torch.where(adv_r[:, None], x0a + (xa - x0a) * beta, xa)


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


def fab_targeted(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, targets: torch.Tensor,
                 cfg: FABConfig = FABConfig(), *, found: Found | None = None) -> Found:
    """FAB-T on every point of x not already broken in ``found``, one row per target (``targets``: (N, k)).
    Returns ``found`` updated with the points some row misclassified within eps (norm measured in float64 against
    the clean point; attacks.threat.check_attack validates the examples against the exact ball afterwards)."""
    n = x.shape[0]
    found = found if found is not None else Found.start(x)
    todo = (~found.broken).nonzero().flatten()
    if todo.numel() == 0:
        return found
    k = targets.shape[1]
    pid = todo.repeat(k)
    tgt = targets[todo].T.reshape(-1)
    shape = x.shape[1:]
    fwd = lambda xf: model(xf.view(xf.shape[0], *shape))  # noqa: E731
    x0 = x.detach().reshape(n, -1)[pid]
    yy = y[pid]
    x1 = x0.clone()
    best = torch.full((x0.shape[0],), float("inf"), device=x.device, dtype=torch.float64)
    every = sync_every(x.device)
    hit = torch.zeros_like(yy, dtype=torch.bool)
    x_hit = x0.clone()
    for i in range(cfg.n_iter):
        if x1.shape[0] == 0:
            break
        xr = x1.detach().requires_grad_(True)
        with torch.enable_grad():
            z = fwd(xr)
            u = torch.arange(z.shape[0], device=z.device)
            diff = z[u, tgt] - z[u, yy]
            g = torch.autograd.grad(diff.sum(), xr)[0] if diff.requires_grad else torch.zeros_like(xr)
        with torch.no_grad():
            w = g
            b = -diff.detach() + (w * x1).sum(1)
            d = project_to_hyperplane(torch.cat([x1, x0]), torch.cat([w, w]), torch.cat([b, b]), norm)
            m = x1.shape[0]
            d1, d2 = d[:m], d[m:]
            a1 = _norm(d1, norm).clamp_min(1e-8)
            a2 = _norm(d2, norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0.0, cfg.alpha_max)[:, None]
            x1 = ((x1 + cfg.eta * d1) * (1 - alpha) + (x0 + cfg.eta * d2) * alpha).clamp(0.0, 1.0)
            adv = fwd(x1).argmax(1) != yy
            _keep_misclassified(adv, x0, x1, best, hit, x_hit, eps, norm, cfg.beta)
        if (i + 1) % every == 0 or i == cfg.n_iter - 1:
            idx = compaction(found.settle(pid, hit, x_hit))
            if idx is not None:
                pid, tgt, x0, yy, x1, best, hit, x_hit = keep(idx, pid, tgt, x0, yy, x1, best, hit, x_hit)
    return found
