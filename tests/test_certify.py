"""certify: upper bounds dominate every independently found Jacobian norm / secant, lower <= upper, certified points
survive PGD at their certified radius, and the whole-model walk handles every supported module type."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lawbench.certify import CertifyError, certified_accuracy, certified_radii, lipschitz_lower, lipschitz_upper
from lawbench.certify._linalg import lapack_threads
from lawbench.models.layers import Normalize, Residual


@pytest.fixture(autouse=True)
def _one_thread():
    with lapack_threads(1):
        yield


# ------------------------------------------------------------------ the suite's own layers (matched by class identity)

def Scaler():
    """A Normalize on 3-vectors with unequal stds."""
    return Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])


def bn(c, gen):
    m = nn.BatchNorm2d(c)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.2)
        m.weight.copy_(torch.randn(c, generator=gen))
        m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return m


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                             nn.Linear(32, 5)), (1, 4, 4)
    if name == "mlp-deep":
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                             nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4)), (12,)
    if name == "cnn":
        return nn.Sequential(
            Normalize([0.4, 0.6], [0.3, 0.2]), nn.Conv2d(2, 4, 3, padding=1), bn(4, gen), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6, 5)), (2, 8, 8)
    if name == "resnet":
        conv = lambda a, b, s=1: nn.Conv2d(a, b, 3, stride=s, padding=1, bias=False)  # noqa: E731
        return nn.Sequential(
            Normalize([0.5, 0.5], [0.25, 0.5]), conv(2, 4),
            nn.Sequential(Residual(nn.Sequential(bn(4, gen), nn.ReLU(), conv(4, 4), bn(4, gen), nn.ReLU(),
                                                 conv(4, 4)))),
            nn.Sequential(bn(4, gen), nn.ReLU(),
                          Residual(nn.Sequential(conv(4, 6, 2), bn(6, gen), nn.ReLU(), conv(6, 6)),
                                   nn.Conv2d(4, 6, 1, stride=2, bias=False))),
            bn(6, gen), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Identity(), nn.Linear(6, 3)), (2, 8, 8)
    if name == "vector-scaler":
        return nn.Sequential(Scaler(), nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)), (3,)
    raise KeyError(name)


MODELS = ["mlp", "mlp-deep", "cnn", "resnet", "vector-scaler"]


def jacobians(model64, X):
    """Exact per-point Jacobians (N, C, d) of a float64 model."""
    f = lambda x: model64(x[None])[0]  # noqa: E731
    J = torch.func.vmap(torch.func.jacrev(f))(X)
    return J.reshape(len(X), J.shape[1], -1)


def independent_search(model, in_shape, n_points=400, steps=150, seed=0):
    """Largest Jacobian norms and secants found by random sampling + secant hill climbing (not certify's code)."""
    m = model.double().eval()
    gen = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.rand(n_points, *in_shape, generator=gen, dtype=torch.float64),
                   0.5 + 2 * torch.randn(n_points, *in_shape, generator=gen, dtype=torch.float64)])
    J = jacobians(m, X)
    l2 = torch.linalg.svdvals(J)[:, 0]
    J, l2 = J.detach(), l2.detach()
    found = {"l2": float(l2.max()), "linf": float(J.abs().sum(2).max())}
    C = J.shape[1]
    diff = J[:, :, None, :] - J[:, None, :, :]                        # (N, C, C, d)
    found["pair"] = diff.norm(dim=3).amax(0)
    found["linf_pair"] = diff.abs().sum(3).amax(0)
    # secant ascent from the best points (plain normalised gradient steps)
    top = torch.topk(l2, 8).indices
    A = X[top].clone().requires_grad_(True)
    B = (X[top] + 0.05 * torch.randn(A.shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
    best = 0.0
    for _ in range(steps):
        num = (m(A) - m(B)).norm(dim=1)
        den = (A - B).reshape(len(A), -1).norm(dim=1)
        ratio = num / den
        best = max(best, float(ratio.max().detach()))
        ga, gb = torch.autograd.grad(ratio.sum(), (A, B))
        with torch.no_grad():
            for P, g in ((A, ga), (B, gb)):
                n = g.reshape(len(g), -1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
                P += 0.02 * g / n
    found["secant"] = best
    assert C >= 2
    return found


@pytest.mark.parametrize("name", MODELS)
def test_upper_dominates_independent_search_and_lower(name):
    model, in_shape = build(name)
    model.eval()
    ub = lipschitz_upper(model, in_shape)
    found = independent_search(model, in_shape)
    assert ub.value >= found["l2"] * (1 - 1e-9), (ub.value, found["l2"])
    assert ub.value >= found["secant"] * (1 - 1e-9)
    assert ub.linf >= found["linf"] * (1 - 1e-9)
    assert ub.pair is not None and ub.linf_pair is not None
    off = ~torch.eye(ub.pair.shape[0], dtype=torch.bool)
    assert bool((ub.pair[off] >= found["pair"][off] * (1 - 1e-9)).all())
    assert bool((ub.linf_pair[off] >= found["linf_pair"][off] * (1 - 1e-9)).all())
    assert bool((ub.pair <= math.sqrt(2) * ub.value * (1 + 1e-12)).all())
    assert ub.method and all(e["method"] for e in ub.per_layer)
    # the empirical lower bound (with pairs and the pair search) never exceeds the certified upper bound
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(64, *in_shape, generator=gen)
    pairs = [(pts[:16], pts[:16] + 0.05 * torch.randn(16, *in_shape, generator=gen))]
    lb = lipschitz_lower(model, [pts], pairs, power_points=64)
    assert 0 < lb.value <= ub.value
    # and the local power iteration reaches the exact Jacobian norm at the given points
    exact_local = float(torch.linalg.svdvals(jacobians(model.double(), pts.double()))[:, 0].max().detach())
    assert lb.value >= exact_local * (1 - 1e-3)


def test_linear_model_bounds_match_exact_spectral_norm():
    torch.manual_seed(3)
    lin = nn.Linear(30, 7)
    exact = float(torch.linalg.svdvals(lin.weight.detach().double())[0])
    ub = lipschitz_upper(lin, (30,))
    assert exact <= ub.value <= exact * (1 + 1e-4)
    lb = lipschitz_lower(lin, [torch.rand(20, 30)])
    assert exact * (1 - 1e-4) <= lb.value <= ub.value
    # merged Normalize + Flatten + Linear: the norm of W diag(1/std), not ||W|| / min std
    std = torch.tensor([0.2, 0.5, 1.0])
    model = nn.Sequential(Normalize([0.0, 0.1, 0.2], std.tolist()), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    W = model[2].weight.detach().double() / std.double().repeat_interleave(4)[None, :]
    exact = float(torch.linalg.svdvals(W)[0])
    ub = lipschitz_upper(model, (3, 2, 2))
    assert exact <= ub.value <= exact * (1 + 1e-4)
    assert ub.value < float(torch.linalg.svdvals(model[2].weight.detach().double())[0]) / 0.2
    lb = lipschitz_lower(model, [torch.rand(10, 3, 2, 2)])
    assert exact * (1 - 1e-4) <= lb.value <= ub.value
    # a linear model's pair bounds are exact: ||w_y - w_j||_2 and ||w_y - w_j||_1
    Wl = lin.weight.detach().double()
    D = Wl[:, None, :] - Wl[None, :, :]
    ub = lipschitz_upper(lin, (30,))
    assert torch.allclose(ub.pair, D.norm(dim=2), rtol=1e-6)
    assert torch.allclose(ub.linf_pair, D.abs().sum(dim=2), rtol=1e-6)
    assert ub.linf == pytest.approx(float(Wl.abs().sum(1).max()), rel=1e-6)


def test_hidden_layer_pair_bound_dominates_every_activation_pattern():
    """sup over all 2^h ReLU patterns D of ||W2 D W1|| (the exact sup over the box, by convexity) is below the
    one-hidden-layer bound, and the bound is tighter than the plain product."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    W1, W2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    ub = lipschitz_upper(model, (6,))
    sup2 = supinf = 0.0
    supk = torch.zeros(3, 3, dtype=torch.float64)
    supk1 = torch.zeros(3, 3, dtype=torch.float64)
    for bits in itertools.product([0.0, 1.0], repeat=10):
        J = W2 @ torch.diag(torch.tensor(bits, dtype=torch.float64)) @ W1
        sup2 = max(sup2, float(torch.linalg.svdvals(J)[0]))
        supinf = max(supinf, float(J.abs().sum(1).max()))
        Dj = J[:, None, :] - J[None, :, :]
        supk = torch.maximum(supk, Dj.norm(dim=2))
        supk1 = torch.maximum(supk1, Dj.abs().sum(dim=2))
    prod = float(torch.linalg.svdvals(W2)[0] * torch.linalg.svdvals(W1)[0])
    assert sup2 <= ub.value * (1 + 1e-12)
    assert ub.value < prod                                    # the pair bound improves on the product
    assert supinf <= ub.linf * (1 + 1e-12)
    assert bool((supk <= ub.pair * (1 + 1e-12)).all())
    assert bool((supk1 <= ub.linf_pair * (1 + 1e-12)).all())
    assert "pair-midpoint" in ub.method


def test_two_hidden_layers_dominate_every_activation_pattern():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    Ws = [model[i].weight.detach().double() for i in (0, 2, 4)]
    ub = lipschitz_upper(model, (4,))
    sup2 = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=10):
        d1 = torch.diag(torch.tensor(bits[:5], dtype=torch.float64))
        d2 = torch.diag(torch.tensor(bits[5:], dtype=torch.float64))
        sup2 = max(sup2, float(torch.linalg.svdvals(Ws[2] @ d2 @ Ws[1] @ d1 @ Ws[0])[0]))
    assert sup2 <= ub.value * (1 + 1e-12)


# ------------------------------------------------------------------------------------------ certification

def pgd(model, x, y, eps, norm, steps=100, restarts=3, seed=0):
    """Per-point-eps PGD on the margin loss (local, independent of the attacks package). Returns the worst margin
    f_y - max_{j != y} f_j found per point."""
    gen = torch.Generator().manual_seed(seed)
    eps = eps.view(-1, *([1] * (x.dim() - 1)))
    worst = torch.full((len(x),), float("inf"), dtype=x.dtype)

    def margin(z):
        f = model(z)
        fy = f.gather(1, y[:, None])[:, 0]
        other = f.clone()
        other[torch.arange(len(y)), y] = -float("inf")
        return fy - other.max(1).values

    for _ in range(restarts):
        if norm == "Linf":
            d = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps
        else:
            d = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            dn = d.reshape(len(x), -1).norm(dim=1).view_as(eps).clamp_min(1e-12)
            d = d / dn * eps * torch.rand(len(x), generator=gen, dtype=x.dtype).view_as(eps)
        for _ in range(steps):
            d.requires_grad_(True)
            m = margin(x + d)
            worst = torch.minimum(worst, m.detach())
            (g,) = torch.autograd.grad(m.sum(), d)
            with torch.no_grad():
                if norm == "Linf":
                    d = (d - 2.5 * eps / steps * g.sign()).clamp(-eps, eps)
                else:
                    gn = g.reshape(len(x), -1).norm(dim=1).clamp_min(1e-12).view_as(eps)
                    d = d - 2.5 * eps / steps * g / gn
                    dn = d.reshape(len(x), -1).norm(dim=1).view_as(eps).clamp_min(1e-12)
                    d = d * torch.clamp(eps / dn, max=1.0)
        with torch.no_grad():
            worst = torch.minimum(worst, margin(x + d))
    return worst


@pytest.mark.parametrize("name,norm", [("mlp", "L2"), ("mlp", "Linf"), ("cnn", "L2"), ("resnet", "Linf")])
def test_certified_points_survive_pgd_at_their_radius(name, norm):
    model, in_shape = build(name, seed=2)
    model = model.double().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(60, *in_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3                                         # a few misclassified points: radius 0
    ub = lipschitz_upper(model, in_shape)
    acc, r = certified_accuracy(model, x, y, ub, [0.0, 1e-3, 1e-2], norm, return_radii=True)
    assert bool((r[:5] == 0).all())
    assert bool((r[5:] > 0).all())
    assert acc[0.0] >= acc[1e-3] >= acc[1e-2]
    assert acc[0.0] == pytest.approx(55 / 60)
    cert = r > 0
    worst = pgd(model, x[cert], y[cert], r[cert].to(torch.float64), norm)
    assert bool((worst > 0).all()), float(worst.min())
    # certified accuracy never exceeds PGD robust accuracy at the same eps
    for e in (1e-3, 1e-2):
        w = pgd(model, x, y, torch.full((len(x),), e, dtype=torch.float64), norm, steps=50, restarts=1)
        assert acc[e] <= float((w > 0).double().mean()) + 1e-12


def test_pair_radius_is_exact_for_linear_models():
    """For a linear model GloRo's K_yj = ||w_y - w_j|| makes the certified radius the true distance to the decision
    boundary: just beyond it an adversarial example exists."""
    torch.manual_seed(7)
    lin = nn.Linear(8, 4).double()
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(40, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        f = lin(x)
    y = f.argmax(1)
    ub = lipschitz_upper(lin, (8,))
    W = lin.weight.detach()
    for norm in ("L2", "Linf"):
        r = certified_radii(lin, x, y, ub, norm)
        gap = f.gather(1, y[:, None]) - f                           # (N, C)
        D = W[y][:, None, :] - W[None, :, :]                        # (N, C, d): w_y - w_j
        dn = D.norm(dim=2) if norm == "L2" else D.abs().sum(dim=2)
        true = torch.where(dn > 0, gap / dn, torch.full_like(gap, float("inf"))).min(dim=1)
        assert torch.allclose(r, true.values, rtol=1e-3)
        assert bool((r <= true.values * (1 + 1e-9)).all())
        j = true.indices
        u = D[torch.arange(len(x)), j]
        step = u / u.norm(dim=1, keepdim=True) if norm == "L2" else u.sign()
        x_adv = x - (r * 1.01)[:, None] * step
        with torch.no_grad():
            assert bool((lin(x_adv).argmax(1) != y).all())


def test_linf_uses_the_better_of_linf_bound_and_l2_over_sqrt_d():
    model, in_shape = build("mlp", seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(30, *in_shape, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    ub = lipschitz_upper(model, in_shape)
    r2 = certified_radii(model, x, y, ub, "L2")
    rinf = certified_radii(model, x, y, ub, "Linf")
    assert bool((rinf >= r2 / math.sqrt(16) * (1 - 1e-12)).all())
    f = model.double()(x.double()).detach()
    top2 = f.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    assert bool((rinf >= margin / (2 * ub.linf) * (1 - 1e-3)).all())


# ------------------------------------------------------------------------------------------ walk and errors

def test_unsupported_modules_are_named():
    with pytest.raises(CertifyError, match=r"^certify: model\.1 \(GELU\) unsupported layer type nn\.GELU; supported: "):
        lipschitz_upper(nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 2)), (3,))
    with pytest.raises(CertifyError, match=r"^certify: model\.0 \(Conv2d\) has groups=2"):
        lipschitz_upper(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 2)), (2, 3, 3))
    with pytest.raises(CertifyError, match=r"in_shape"):
        lipschitz_upper(nn.Linear(3, 2), (0,))
    with pytest.raises(CertifyError, match="at least one point"):
        lipschitz_lower(nn.Linear(3, 2), [])


def test_callers_model_is_left_untouched():
    model, in_shape = build("cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ub = lipschitz_upper(model, in_shape)
    lb = lipschitz_lower(model, [torch.rand(8, *in_shape)], search_steps=3)
    certified_accuracy(model, torch.rand(4, *in_shape), torch.zeros(4, dtype=torch.long), ub, [0.1], "L2")
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(model.parameters()).dtype == torch.float32
    assert lb.value <= ub.value


def test_diagonal_scalings_move_across_activations_and_into_residuals():
    """diag S, ReLU, W: every Jacobian is W D S = (W S) D, so the bound is ||W S|| (tight, D = I), not ||W|| max|S|;
    diag S before a Residual is distributed into both paths."""
    torch.manual_seed(8)
    model = nn.Sequential(Scaler(), nn.ReLU(), nn.Linear(3, 2))
    S = torch.diag(1 / Scaler().std.double())
    W = model[2].weight.detach().double()
    ub = lipschitz_upper(model, (3,))
    exact = float(torch.linalg.svdvals(W @ S)[0])
    assert exact <= ub.value <= exact * (1 + 1e-6)
    assert ub.value < float(torch.linalg.svdvals(W)[0]) * 4 * (1 - 1e-3)      # max |S| = 4
    res = nn.Sequential(Scaler(), Residual(nn.Sequential(nn.Linear(3, 3))), nn.ReLU(), nn.Linear(3, 2))
    ub = lipschitz_upper(res, (3,))
    A = res[1].branch[0].weight.detach().double()
    W = res[3].weight.detach().double()
    for bits in itertools.product([0.0, 1.0], repeat=3):
        J = W @ torch.diag(torch.tensor(bits, dtype=torch.float64)) @ (A + torch.eye(3, dtype=torch.float64)) @ S
        assert float(torch.linalg.svdvals(J)[0]) <= ub.value * (1 + 1e-12)


def test_fast_path_of_certified_accuracy_matches_float64_radii():
    model, in_shape = build("cnn", seed=4)
    model.eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(80, *in_shape, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::7] = (y[::7] + 1) % 5
    ub = lipschitz_upper(model, in_shape)
    for norm in ("L2", "Linf"):
        r = certified_radii(model, x, y, ub, norm)
        eps = [float(torch.quantile(r[r > 0], q)) for q in (0.2, 0.5, 0.8)]
        acc = certified_accuracy(model, x, y, ub, eps, norm)          # float32 screening + float64 re-check
        assert acc == {e: float((r > e).double().mean()) for e in eps}
        assert 0 < acc[eps[2]] < acc[eps[0]] < 1
