"""The `fast` suite: AutoAttack standard's strength at a fraction of its cost.

AutoAttack standard spends most of its time on points it cannot break: APGD-T and FAB-T run 9 targets each and Square
5000 queries on every robust point. The fast suite keeps what breaks points and drops what measurement says rarely
does, stage by stage, each stage only on the points still standing:

A randomized model (two eval forwards differ) is detected first, before any budget is chosen: every gradient stage
then averages EOT_DRAWS draws, every verdict is a majority over VOTE_DRAWS draws (attacks.randomized), and the
stages follow AutoAttack's rand
version (a cross-entropy stage, then an untargeted DLR stage; Square gets its small budget: each of its queries sees
one noisy draw, which is why the rand version runs none).

0. points whose logits have an exactly zero input Jacobian (input quantization, non-differentiable steps) skip the
   gradient stages, which cannot move them, and raise AutoAttack's `zero_gradients` flag;
1. our batched PGD (cross-entropy, the margin where the softmax is saturated, 100 steps, early exit per point: a
   broken point leaves the batch); `steps = 0` skips it (the default suite does, after its own PGD sweep);
2. APGD-T (on the cell's engine, native by default) on the `targets` (4) most promising wrong classes of each
   point instead of 9. The ranking follows MALT's argument (Melamed et al. 2023): near a point the model is almost
   linear, so the class whose decision boundary is nearest, margin over the dual norm of the margin's gradient, is
   the one a targeted attack reaches first; AutoAttack's own order (by logit) ignores the gradient. Four, not
   three: on the PGD-trained MLP at 0.2 a point AutoAttack breaks falls to the 4th ranked target only. On a
   randomized model: APGD-DLR with EOT instead (the rand version's second stage);
3. Square with an adaptive budget: `square_queries` (1000) from one start where the white-box stages
   look trustworthy; where the gradients are masked (zero gradients), its 5000 queries from MASKED_STARTS random
   starts per point, run as rows of one batch (on the few points left late in a run, Square's time is its
   per-iteration overhead, so two starts cost little more than one). Square beating the white-box stages raises
   AutoAttack's flag and buys AutoAttack's masking restarts on the points left. On the native engine Square drops
   the rows its own statistics give up on (attacks.square.discard, A3's point: the budget goes where the margin says
   it can pay): on the zoo at 0.1 the same points fall for about half the forwards.

FAB-T is left out (the cost AutoAttack spends on it goes to the ranked targets instead; `bench perf --attacks`
compares the result with AutoAttack standard on the zoo). The flags of AutoAttack's
checks are raised by the same code AutoAttack runs (its checks run inside stages 2 and 3), so masking is reported as
AutoAttack would report it. Every example goes through the one validation path (attacks.threat.check_attack).
"""
from __future__ import annotations

import time

import torch

from lawbench.base.modes import eval_mode

from .autoattack import DEFAULT_IMPL, MASKING_FLAGS, get_engine, masking_restarts, run_autoattack, square_starts
from .pgd import pgd_sweep
from .standard import NATIVE
from .randomized import Randomized, is_randomized, randomized
from .threat import check_attack, misclassified


# Square's random starts per point where the gradients are masked (each start a row of one batch)
MASKED_STARTS = 2
# Square's discarding factor on an engine that has it (attacks.square.discard): rows whose margin says they will not
# break leave early (0 = every row its whole budget)
SQUARE_DISCARD = 2.0


def rank_targets(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, k: int) -> torch.Tensor:
    """(N, k) wrong classes per point, nearest linearised decision boundary first: margin z_y - z_t over the dual
    norm of its input gradient (L1 for Linf, L2 for L2)."""
    x = x.detach().clone().requires_grad_(True)
    z = model.mean_logits(x) if isinstance(model, Randomized) else model(x)
    n, c = z.shape
    dist = torch.full((n, c), float("inf"), device=x.device)
    zy = z.gather(1, y[:, None]).squeeze(1)
    for t in range(c):
        other = y != t
        if not bool(other.any()):
            continue
        margin = zy - z[:, t]
        (g,) = torch.autograd.grad(margin.sum(), x, retain_graph=t < c - 1)
        g = g.reshape(n, -1)
        dual = g.abs().sum(1) if norm == "Linf" else g.norm(dim=1)
        d = margin.detach() / dual.clamp_min(1e-12)
        dist[:, t] = torch.where(other, d, dist[:, t])
    return dist.argsort(dim=1)[:, :max(1, min(k, c - 1))]


def zero_jacobian(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Bool (N,): the logits' input Jacobian is exactly zero at x (checked through a random projection of the logits,
    zero for a non-zero Jacobian with probability 0). A gradient attack cannot move such a point: input quantization,
    non-differentiable steps. Cross-entropy alone would also flag saturated softmax points, which DLR still attacks."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    xx = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(xx)
        if not z.requires_grad:  # the forward cut the graph: no gradient reaches the input
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        v = torch.randn(z.shape, generator=gen, device=x.device, dtype=z.dtype)
        (g,) = torch.autograd.grad((z * v).sum(), xx, allow_unused=True)
    if g is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return (g.reshape(g.shape[0], -1) == 0).all(1)


def run_fast(model, x, y, eps, *, norm, seed=0, log=None, steps=100, targets=4, square_queries=1000,
             batch_size=1000, n_total=None, impl: str = DEFAULT_IMPL):
    """The fast suite on (x, y) at eps: (robust mask, validated examples, info). impl: the AutoAttack engine its
    APGD and Square stages run on ("native": attacks.standard's, targets and starts as rows; "original")."""
    t0 = time.perf_counter()
    n = x.shape[0]
    n_total = n_total or n
    flags: set = set()
    if isinstance(model, Randomized) or is_randomized(model, x):  # known before any budget is chosen
        model = randomized(model)
        flags.add("randomized")
    robust = ~misclassified(model, x, y)
    x_adv = x.detach().clone()
    info = {"stages": {}, "flags": []}

    def record(stage, idx, res_robust, res_x, seconds, extra=None):
        broke = idx[~res_robust]
        robust[broke] = False
        x_adv[broke] = res_x[~res_robust]
        info["stages"][stage] = {"attacked": int(idx.numel()), "broke": int(broke.numel()),
                                 "seconds": round(seconds, 4), **(extra or {})}

    # 0. points no gradient stage can move (AutoAttack's zero_gradients flag, on the logits' Jacobian)
    flat = _flat_points(model, x, robust, seed)
    if bool(flat.any()):
        flags.add("zero_gradients")
        if log:
            log(f"fast: {int(flat.sum())} point(s) with an exactly zero input Jacobian skip PGD and APGD-T")
    # 1. PGD with early exit (steps = 0: skipped, e.g. after a suite's own PGD sweep at this eps)
    idx = (robust & ~flat).nonzero().flatten()
    if idx.numel() and steps > 0:
        t = time.perf_counter()
        pr = pgd_sweep(model, x[idx], y[idx], [eps], norm=norm, steps=steps, restarts=1, seed=seed, log=log)
        ck = check_attack(model, x[idx], y[idx], pr.x_adv[0], eps, norm, log=log)
        record("pgd", idx, ~ck.broken, ck.x_adv, time.perf_counter() - t)
    # 2. APGD-T on the ranked targets
    idx = (robust & ~flat).nonzero().flatten()
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    if idx.numel() and "randomized" in flags and n_classes >= NATIVE["apgd-dlr"].min_classes:  # rand's 2nd stage
        t = time.perf_counter()
        res = run_autoattack(model, x[idx], y[idx], eps, norm=norm, version=["apgd-dlr"], seed=seed,
                             batch_size=batch_size, log=log, n_total=n_total, impl=impl)
        record("apgd-dlr", idx, res.robust, res.x_adv, time.perf_counter() - t, {"eot": model.eot})
    elif idx.numel() and n_classes >= NATIVE["apgd-t"].min_classes:  # AutoAttack skips it below too
        t = time.perf_counter()
        with eval_mode(model):  # the ranking in eval mode: no dropout draw, no batch statistics
            ranked = rank_targets(model, x[idx], y[idx], norm, targets)
        res = get_engine(impl).apgd_targeted(model, x[idx], y[idx], eps, norm, seed, log, ranked, batch_size)
        flags.update(res.flags)
        record("apgd-t", idx, res.robust, res.x_adv, time.perf_counter() - t, {"targets": targets})
    # 3. Square, its budget set by what the checks saw
    idx = robust.nonzero().flatten()
    if idx.numel():
        record("square", idx, *_square(model, x[idx], y[idx], eps, norm, seed, flags, square_queries, batch_size,
                                       log, n_total, impl))
    info["flags"] = sorted(flags)
    info["seconds"] = round(time.perf_counter() - t0, 4)
    return robust, x_adv, info


def _flat_points(model, x, robust, seed) -> torch.Tensor:
    """Bool (N,): clean-correct points whose logits have an exactly zero input Jacobian (model in eval mode)."""
    flat = torch.zeros_like(robust)
    idx = robust.nonzero().flatten()
    if idx.numel():
        with eval_mode(model):
            flat[idx] = zero_jacobian(model, x[idx], seed)
    return flat


def _square(model, x, y, eps, norm, seed, flags: set, square_queries, batch_size, log, n_total, impl):
    """Square on the survivors: `square_queries` from one start where the white-box stages look trustworthy, and on
    a randomized model (AutoAttack's rand version runs no Square: each query sees one noisy draw); where the
    gradients are masked (zero gradients, Square beating the white-box stages), its 5000 queries from MASKED_STARTS
    random starts per point (one batch, see square_starts). Square beating the white-box stages raises AutoAttack's
    flag and buys the extra starts on the points still standing. Returns record()'s (robust, examples, seconds,
    extra)."""
    t = time.perf_counter()
    masked = bool(flags & set(MASKING_FLAGS) - {"randomized"})
    queries, starts = (5000, MASKED_STARTS) if masked else (square_queries, 1)
    engine = get_engine(impl)
    discard = SQUARE_DISCARD if engine.square_discard else 0.0
    res = square_starts(model, x, y, eps, norm, starts=starts, queries=queries, seed=seed, batch_size=batch_size,
                        log=log, n_total=n_total, impl=engine, discard=discard)
    extra = {"queries": queries, "starts": starts, "discard": discard, "masking_restarts": {}}
    # AutoAttack's own Square check; a randomized model's noisy Square is no sign of masking
    escalate = not masked and "randomized" not in flags
    if int((~res.robust).sum()) > 0.002 * n_total and escalate:
        flags.add("square_beats_whitebox")
        res.flags = sorted(set(res.flags) | flags)  # what masking_restarts reads
        extra["masking_restarts"] = masking_restarts(model, x, y, eps, norm, res, seed, batch_size, log, impl)
    flags.update(res.flags)
    return res.robust, res.x_adv, time.perf_counter() - t, extra
