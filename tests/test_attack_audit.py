"""Audit of three promises of the attack code, each checked against an independent route:

* ``rank_targets`` (attacks/fast.py): per point, the wrong classes by linearised distance to the decision boundary,
  (z_y - z_t) / dual norm of grad_x (z_y - z_t), nearest first (dual of Linf: L1, of L2: L2), at most min(k, C-1);
  checked against closed forms for a linear model (float64 numpy) and per-point Jacobians for a ReLU MLP;
* ``square_starts`` (attacks/autoattack.py): starts as rows of one batch, a point is broken when ANY start broke it,
  and its example comes from a start that broke it;
* ``masking_restarts``: on a masking flag it really runs Square on the survivors and records exactly what that run
  broke (and does nothing without a flag).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lawbench.attacks.autoattack as aa_mod
from lawbench.attacks.autoattack import (MASKING_FLAGS, MASKING_SQUARE_RESTARTS, AAResult, masking_restarts,
                                         square_starts)
from lawbench.attacks.fast import rank_targets
from lawbench.attacks.threat import inside, misclassified
from conftest import digits_split, train_digits_mlp

REL_TIE = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# rank_targets


def ref_distances(margins: np.ndarray, grads: np.ndarray, y: np.ndarray, norm: str) -> np.ndarray:
    """(N, C) float64 linearised distances; margins (N, C) = z_y - z_t, grads (N, C, d) = grad_x (z_y - z_t);
    inf on the label column."""
    dual = np.abs(grads).sum(-1) if norm == "Linf" else np.sqrt((grads ** 2).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = margins / dual
    dist[np.arange(len(y)), y] = np.inf
    return dist


def assert_ranking(ranked: torch.Tensor, dist: np.ndarray, y: np.ndarray, k: int):
    """ranked (N, min(k, C-1)): distinct wrong classes whose reference distances are the smallest ones, in order;
    two classes may swap only where their distances agree within REL_TIE (relative)."""
    n, c = dist.shape
    kk = min(k, c - 1)
    r = ranked.cpu().numpy()
    assert r.shape == (n, kk)
    for i in range(n):
        assert y[i] not in r[i], (i, y[i], r[i])
        assert len(set(r[i].tolist())) == kk, r[i]
        got = dist[i, r[i]]
        want = np.sort(dist[i][np.arange(c) != y[i]])[:kk]
        tol = REL_TIE * np.maximum(np.abs(want), 1e-12)
        assert np.all(np.abs(got - want) <= tol), (i, r[i], got, want)


def linear_case(seed, n=40, d=12, c=7, shape=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c, d, generator=g)
    b = torch.randn(c, generator=g) * 0.5
    x = torch.rand(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)  # random labels: many points misclassified (negative margins)
    lin = torch.nn.Linear(d, c)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    model = lin if shape is None else torch.nn.Sequential(torch.nn.Flatten(), lin)
    xin = x if shape is None else x.reshape(n, *shape)
    # closed form in float64: z_y - z_t = (W_y - W_t) x + b_y - b_t, gradient W_y - W_t
    Wd, bd, xd, yn = W.double().numpy(), b.double().numpy(), x.double().numpy(), y.numpy()
    z = xd @ Wd.T + bd
    margins = z[np.arange(n), yn][:, None] - z
    grads = Wd[yn][:, None, :] - Wd[None, :, :]
    return model.eval(), xin, y, margins, grads


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("shape", [None, (3, 2, 2)], ids=["flat", "image"])
def test_rank_targets_linear_model_matches_closed_form(norm, shape):
    model, x, y, margins, grads = linear_case(0, shape=shape)
    yn = y.numpy()
    dist = ref_distances(margins, grads, yn, norm)
    c = dist.shape[1]
    ranked = rank_targets(model, x, y, norm, c - 1)
    assert_ranking(ranked, dist, yn, c - 1)
    # the case discriminates: the logit order (AutoAttack's) and the other norm's order differ from the reference
    wrong = np.where(np.arange(c)[None] == yn[:, None], np.inf, margins)
    other = ref_distances(margins, grads, yn, "L2" if norm == "Linf" else "Linf")
    ref_order = np.argsort(dist, 1)[:, : c - 1]
    assert (np.argsort(wrong, 1)[:, : c - 1] != ref_order).any(1).sum() >= 5
    assert (np.argsort(other, 1)[:, : c - 1] != ref_order).any(1).sum() >= 5
    assert (margins[np.arange(len(yn))[:, None], ref_order] < 0).any()  # misclassified points are in the test


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_rank_targets_caps_at_k_and_never_returns_the_label(norm):
    c = 5
    model, x, y, margins, grads = linear_case(1, n=25, d=6, c=c)
    yn = y.numpy()
    dist = ref_distances(margins, grads, yn, norm)
    full = rank_targets(model, x, y, norm, c - 1)
    for k in (1, 2, c - 1, c, c + 3, 100):
        ranked = rank_targets(model, x, y, norm, k)
        assert ranked.shape == (x.shape[0], min(k, c - 1))
        assert_ranking(ranked, dist, yn, k)
        assert torch.equal(ranked, full[:, : ranked.shape[1]])
    # two classes: the only wrong class, whatever k
    model2, x2, y2, m2, g2 = linear_case(2, n=10, d=4, c=2)
    for k in (1, 3):
        r = rank_targets(model2, x2, y2, norm, k)
        assert r.shape == (10, 1) and torch.equal(r[:, 0], 1 - y2)


def test_rank_targets_exact_ties_are_either_order():
    """Two identical classes (same weight row and bias) tie exactly at every point: either order is right, both
    must appear, and every other class keeps its place."""
    model, x, y, _, _ = linear_case(3, n=30, d=8, c=6)
    with torch.no_grad():
        model.weight[4] = model.weight[2]
        model.bias[4] = model.bias[2]
    y = torch.where((y == 2) | (y == 4), torch.zeros_like(y), y)
    W, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    xd, yn = x.double().numpy(), y.numpy()
    z = xd @ W.T + b
    margins = z[np.arange(len(yn)), yn][:, None] - z
    grads = W[yn][:, None, :] - W[None, :, :]
    for norm in ("Linf", "L2"):
        dist = ref_distances(margins, grads, yn, norm)
        ranked = rank_targets(model, x, y, norm, 5)
        assert_ranking(ranked, dist, yn, 5)
        pos = {t: (ranked == t).nonzero()[:, 1] for t in (2, 4)}
        assert bool(((pos[2] - pos[4]).abs() == 1).all())  # adjacent everywhere


def mlp_reference(model, x, y, norm):
    """Per point: the float64 Jacobian of the logits (torch.func.jacrev, one point at a time), then the pair
    gradients J_y - J_t and margins z_y - z_t."""
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    margins, grads = [], []
    for i in range(x.shape[0]):
        xi = x64[i]
        J = torch.func.jacrev(lambda v: m64(v[None])[0])(xi).reshape(-1, xi.numel())  # (C, d)
        z = m64(xi[None])[0].detach()
        yi = int(y[i])
        margins.append((z[yi] - z).numpy())
        grads.append((J[yi][None] - J).detach().numpy())
    return np.stack(margins), np.stack(grads)


@pytest.fixture(scope="module")
def digits_mlp():
    xtr, ytr, x, y = digits_split(300, slice(1000, 1040))
    model = train_digits_mlp(0, xtr, ytr, width=24, epochs=25)
    return model, x, y


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_rank_targets_relu_mlp_matches_per_point_jacobian(digits_mlp, norm):
    model, x, y = digits_mlp
    # a few wrong labels so that negative margins are ranked too
    y = y.clone()
    y[:5] = (y[:5] + 3) % 10
    margins, grads = mlp_reference(model, x, y, norm)
    yn = y.numpy()
    dist = ref_distances(margins, grads, yn, norm)
    for k in (3, 9):
        assert_ranking(rank_targets(model, x, y, norm, k), dist, yn, k)
    # discriminating: the per-point gradient matters (a margin-only order differs), as does the norm
    wrong = np.where(np.arange(10)[None] == yn[:, None], np.inf, margins)
    ref_order = np.argsort(dist, 1)[:, :9]
    assert (np.argsort(wrong, 1)[:, :9] != ref_order).any(1).sum() >= 5
    other = ref_distances(margins, grads, yn, "L2" if norm == "Linf" else "Linf")
    assert (np.argsort(other, 1)[:, :9] != ref_order).any(1).sum() >= 5


# ---------------------------------------------------------------------------------------------------------------
# square_starts


def rows_to_points(xb: torch.Tensor, x: torch.Tensor):
    """For each row of the batch: (point index in x, which occurrence of that point it is = its start), found by
    content, so the test does not assume how the starts are laid out in the batch."""
    xb = xb.reshape(xb.shape[0], -1)
    xf = x.reshape(x.shape[0], -1)
    seen = {}
    out = []
    for r in range(xb.shape[0]):
        (hit,) = (xb[r][None] == xf).all(1).nonzero()[:, 0].tolist()
        s = seen.get(hit, 0)
        seen[hit] = s + 1
        out.append((hit, s))
    return out


def test_square_starts_fold_any_start_counts_with_its_own_example(monkeypatch):
    """A fake AutoAttack decides per (point, start): the fold must call a point broken when any start broke it and
    hand back that start's example (never a failed start's), the clean input for robust points."""
    starts, n, d = 3, 5, 6
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(n, d, generator=g)
    y = torch.arange(n) % 3
    broken_in = {0: {2}, 1: {1}, 2: set(), 3: {0, 2}, 4: {0, 1, 2}}
    calls = []

    def example(i, s):
        return x[i] + 0.01 * (s + 1) * (1 if i % 2 else -1)

    def fake(model, xb, yb, eps, *, norm, version, seed, batch_size, log, n_total, n_queries, **kw):
        assert xb.shape == (starts * n, d) and yb.shape == (starts * n,)
        ids = rows_to_points(xb, x)
        assert sorted(ids) == [(i, s) for i in range(n) for s in range(starts)]
        assert all(int(yb[r]) == int(y[i]) for r, (i, _) in enumerate(ids))
        calls.append(dict(version=list(version), seed=seed, n_queries=n_queries, eps=eps, norm=norm))
        robust = torch.tensor([s not in broken_in[i] for i, s in ids])
        x_adv = torch.stack([example(i, s) for i, s in ids])
        return AAResult(robust=robust, x_adv=x_adv, flags=[], info={"attacks": ["square"]})

    monkeypatch.setattr(aa_mod, "run_autoattack", fake)
    res = square_starts(torch.nn.Identity(), x, y, 0.05, "Linf", starts=starts, queries=123, seed=7, batch_size=50,
                        log=None)
    assert calls == [dict(version=["square"], seed=7, n_queries=123, eps=0.05, norm="Linf")]
    assert res.robust.tolist() == [False, False, True, False, False]
    assert res.x_adv.shape == x.shape
    assert torch.equal(res.x_adv[0], example(0, 2))
    assert torch.equal(res.x_adv[1], example(1, 1))
    assert torch.equal(res.x_adv[2], x[2])
    assert any(torch.equal(res.x_adv[3], example(3, s)) for s in (0, 2))
    assert any(torch.equal(res.x_adv[4], example(4, s)) for s in (0, 1, 2))
    assert res.info["starts"] == starts and res.info["n_attacked"] == n


class QuantIn(torch.nn.Module):
    """Input quantized to 16 grey levels in front of an MLP: torch.round has a zero gradient, so every input
    gradient is exactly zero (gradient masking); only black-box Square can move it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x.reshape(x.shape[0], -1) * 15) / 15)


@pytest.fixture(scope="module")
def quant():
    xtr, ytr, x, y = digits_split(500, slice(1000, 1030))
    inner = train_digits_mlp(0, torch.round(xtr * 15) / 15, ytr, width=32, epochs=60)
    return QuantIn(inner).eval(), x, y


def test_square_starts_real_run_folds_the_starts_it_ran(quant, monkeypatch):
    """Real Square, two starts: the fold agrees with the per-row verdicts of the run it made (some points broken
    only by the second start), and every broken point's example is a valid one."""
    model, x, y = quant
    eps = 0.2
    real = aa_mod.run_autoattack
    seen = []

    def spy(*a, **k):
        r = real(*a, **k)
        seen.append((a[1].clone(), r.robust.clone()))
        return r

    monkeypatch.setattr(aa_mod, "run_autoattack", spy)
    res = square_starts(model, x, y, eps, "Linf", starts=2, queries=100, seed=0, batch_size=1000, log=None)
    ((xb, rob_rows),) = seen
    per = torch.ones(2, x.shape[0], dtype=torch.bool)
    for r, (i, s) in enumerate(rows_to_points(xb, x)):
        per[s, i] = rob_rows[r]
    only_second = per[0] & ~per[1]
    assert int(only_second.sum()) > 0  # the case where counting the first start alone goes wrong
    assert torch.equal(res.robust, per.all(0))
    broken = ~res.robust
    assert 0 < int(broken.sum()) < x.shape[0]
    assert bool(inside(x, res.x_adv, eps, "Linf").all())
    assert bool(misclassified(model, res.x_adv[broken], y[broken]).all())
    assert torch.equal(res.x_adv[res.robust], x[res.robust])


# ---------------------------------------------------------------------------------------------------------------
# masking_restarts


def spy_square(monkeypatch, fake=None):
    """Replaces square_starts as masking_restarts sees it: records every call (points passed, starts, queries, the
    verdict returned) and delegates to the real one or to `fake`."""
    real = aa_mod.square_starts
    calls = []

    def spy(model, x, y, eps, norm, *, starts, queries, seed, batch_size, log, n_total=None, impl="original"):
        fn = fake or real
        r = fn(model, x, y, eps, norm, starts=starts, queries=queries, seed=seed, batch_size=batch_size, log=log,
               n_total=n_total, impl=impl)
        calls.append(dict(x=x.clone(), y=y.clone(), starts=starts, queries=queries, eps=eps, norm=norm,
                          robust=r.robust.clone(), x_adv=r.x_adv.clone(), impl=impl))
        return r

    monkeypatch.setattr(aa_mod, "square_starts", spy)
    return calls


def start_result(n=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, d, generator=g)
    y = torch.arange(n) % 4
    robust = torch.tensor([True, False, True, True, False, True, True, False][:n])
    x_adv = x.clone()
    x_adv[~robust] = x[~robust] + 0.03  # examples of earlier attacks: must be left alone
    return x, y, robust, x_adv


@pytest.mark.parametrize("flag", MASKING_FLAGS)
@pytest.mark.parametrize("pattern", [[False, True, False, True, True], [True] * 5, [False] * 5],
                         ids=["some", "none", "all"])
def test_masking_restarts_runs_square_on_survivors_and_records_its_breaks(flag, pattern, monkeypatch):
    x, y, robust, x_adv = start_result()
    alive = robust.nonzero().flatten()
    verdict = torch.tensor(pattern)  # per survivor, what the (fake) Square run returns as robust

    def fake(model, xs, ys, eps, norm, **kw):
        ex = xs + 0.02
        ex[verdict] = -7.0  # whatever Square leaves for a robust row must not be copied
        return AAResult(robust=verdict.clone(), x_adv=ex, flags=[], info={"attacks": ["square"]})

    calls = spy_square(monkeypatch, fake)
    res = AAResult(robust.clone(), x_adv.clone(), flags=sorted({flag, "softmax_output"}),
                   info={"attacks": ["apgd-ce", "square"]})
    done = masking_restarts(torch.nn.Identity(), x, y, 0.1, "Linf", res, 0, 100, None)
    assert len(calls) == 1
    (c,) = calls
    assert torch.equal(c["x"], x[alive]) and torch.equal(c["y"], y[alive])  # the survivors, and only them
    assert c["starts"] == MASKING_SQUARE_RESTARTS and c["eps"] == 0.1 and c["norm"] == "Linf"
    got = alive[~verdict]
    assert done["restarts"] == c["starts"]
    assert done["broken"] == int(got.numel()) == int((~c["robust"]).sum())
    expect_robust = robust.clone()
    expect_robust[got] = False
    assert torch.equal(res.robust, expect_robust)
    expect_x = x_adv.clone()
    expect_x[got] = x[got] + 0.02
    assert torch.equal(res.x_adv, expect_x)


@pytest.mark.parametrize("flags, attacks, robust_any", [
    ([], ["apgd-ce", "square"], True),
    (["softmax_output", "n_classes", "dynamic"], ["apgd-ce", "apgd-t", "fab-t", "square"], True),
    (["zero_gradients"], ["apgd-ce", "apgd-t"], True),  # no Square in the run: nothing to restart
    (["zero_gradients", "randomized"], ["apgd-ce", "square"], False),  # no survivor
])
def test_masking_restarts_does_nothing_without_cause(flags, attacks, robust_any, monkeypatch):
    x, y, robust, x_adv = start_result()
    if not robust_any:
        robust[:] = False
    calls = spy_square(monkeypatch, lambda *a, **k: pytest.fail("square_starts called"))
    res = AAResult(robust.clone(), x_adv.clone(), flags=flags, info={"attacks": attacks})
    done = masking_restarts(torch.nn.Identity(), x, y, 0.1, "Linf", res, 0, 100, None)
    assert calls == []
    assert done == {"restarts": 0, "broken": 0}
    assert torch.equal(res.robust, robust) and torch.equal(res.x_adv, x_adv)


def test_masking_restarts_real_square_breaks_a_quantized_model(quant, monkeypatch):
    """Zero-gradient model: the restarts really run Square (5000 queries, two starts) on the survivors, the points
    it broke, and only those, become broken with valid examples; the others keep their state."""
    model, x, y = quant
    x, y = x[:14], y[:14]
    eps = 0.16
    robust = ~misclassified(model, x, y)
    x_adv = x.clone()
    pre = robust.nonzero().flatten()[:2]  # "broken" by an earlier attack: must stay so
    robust[pre] = False
    x_adv[pre] = torch.clamp(x[pre] + 0.05, 0, 1)
    alive = robust.nonzero().flatten()
    calls = spy_square(monkeypatch)
    res = AAResult(robust.clone(), x_adv.clone(), flags=["zero_gradients"], info={"attacks": ["apgd-ce", "square"]})
    done = masking_restarts(model, x, y, eps, "Linf", res, 0, 1000, None)
    (c,) = calls
    assert torch.equal(c["x"], x[alive]) and c["starts"] == MASKING_SQUARE_RESTARTS and c["queries"] == 5000
    got = alive[~c["robust"]]
    assert 0 < got.numel() < alive.numel()  # Square broke some survivors, not all
    assert done == {"restarts": c["starts"], "broken": int(got.numel())}
    expect = robust.clone()
    expect[got] = False
    assert torch.equal(res.robust, expect)
    assert bool(inside(x[got], res.x_adv[got], eps, "Linf").all())
    assert bool(misclassified(model, res.x_adv[got], y[got]).all())
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[got] = False
    assert torch.equal(res.x_adv[keep], x_adv[keep])
