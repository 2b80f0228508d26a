"""Local certificates (IBP and CROWN, lawbench.certify.local) against the truth: on tiny ReLU MLPs every margin lower
bound is at or below the exact minimum over the ball, found by a mixed-integer program and, for one hidden layer,
by every activation pattern's linear program (which agree); on a CNN with normalization, max-pools, an average pool
and a residual block, no point of a strong attack's path lies below a bound; a linear model's bounds are exact; a
refused layer is named."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import digits_split, train_digits_mlp
from exact_margin import milp_margins, pattern_margins
from lawbench.certify import CertifyError
from lawbench.certify.local import local_certify, margin_lower, program
from lawbench.models.layers import Normalize, Residual

F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    return digits_split(800, slice(1300, 1500))


def _mlp(digits, widths, seed=0):
    xtr, ytr, _, _ = digits
    if len(widths) == 1:
        return nn.Sequential(nn.Flatten(), *train_digits_mlp(seed, xtr, ytr, width=widths[0]))
    torch.manual_seed(seed)
    layers, fan = [nn.Flatten()], 64
    for w in widths:
        layers += [nn.Linear(fan, w), nn.ReLU()]
        fan = w
    m = nn.Sequential(*layers, nn.Linear(fan, 10))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(m(xtr), ytr).backward()
        opt.step()
    return m.eval()


def _exact(model, x, y, eps, how):
    xi = x.double().numpy()
    return how(model, xi, int(y), np.clip(xi - eps, 0, 1), np.clip(xi + eps, 0, 1))


@pytest.mark.parametrize("widths, eps", [((5,), 0.03), ((5,), 0.08), ((8, 6), 0.02), ((8, 6), 0.05)])
def test_margin_bounds_are_at_or_below_the_exact_minimum(digits, widths, eps):
    """Every margin f_y - f_j of 6 points: IBP's and CROWN's lower bounds <= the MILP's exact minimum over the Linf
    ball in [0,1]; for one hidden layer the MILP equals the minimum over every activation pattern (2^5 LPs). The gap
    of CROWN's to the exact value is printed."""
    _, _, x, y = digits
    model = _mlp(digits, widths)
    prog = program(model, (64,))
    got = margin_lower(prog, x[:6].double(), y[:6], torch.full((6,), eps, dtype=F64), "Linf")
    gaps = []
    for i in range(6):
        exact = _exact(model, x[i], y[i], eps, milp_margins)
        if len(widths) == 1:
            assert np.allclose(exact, _exact(model, x[i], y[i], eps, pattern_margins), atol=1e-7, equal_nan=True)
        fin = np.isfinite(exact)
        crown, ibp = got.crown[i].numpy()[fin], got.ibp[i].numpy()[fin]
        assert (crown <= exact[fin] + 1e-7).all(), (crown, exact[fin])
        assert (ibp <= exact[fin] + 1e-7).all(), (ibp, exact[fin])
        gaps += list(exact[fin] - crown)
    print(f"widths {widths} eps {eps}: exact - CROWN over {len(gaps)} margins: median {np.median(gaps):.2e}, "
          f"max {np.max(gaps):.3f}")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize(0.5, 0.25), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)),
                 nn.Conv2d(4, 4, 1)),
        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


@pytest.mark.parametrize("norm, eps", [("Linf", 0.02), ("L2", 0.1)])
def test_no_attack_iterate_lies_below_a_cnn_bound(digits, norm, eps):
    """A CNN with every supported kind of layer on 8x8 digits: 200-step PGD with 10 restarts minimising each point's
    worst margin never goes below the bound's minimum over j (IBP's or CROWN's)."""
    _, _, x, y = digits
    x, y = x[:40].reshape(-1, 1, 8, 8), y[:40]
    model = _cnn()
    with torch.no_grad():
        y = model(x).argmax(1)  # bounds hold for any label: the model's own
    got = margin_lower(program(model, (1, 8, 8)), x.double(), y, torch.full((40,), eps, dtype=F64), norm)
    bound = torch.minimum(got.crown.amin(1), got.ibp.amin(1)).float()
    worst = _pgd_worst_margin(model, x, y, eps, norm)
    assert bool((worst >= bound - 1e-5).all()), float((bound - worst).max())
    assert bool((got.crown.amin(1) > got.ibp.amin(1)).any())  # CROWN tighter somewhere: the test reaches it


def _margin(model, v, y):
    z = model(v)
    other = z.masked_fill(nn.functional.one_hot(y, 10).bool(), -float("inf")).amax(1)
    return z.gather(1, y[:, None])[:, 0] - other


def _project(x, v, eps, norm):
    """Into each point's ball (eps: broadcast over the point's shape) and [0,1]."""
    d = v - x
    if norm == "Linf":
        d = torch.maximum(torch.minimum(d, eps), -eps)
    else:
        n = d.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (d.dim() - 1)))
        d = d * (eps / n).clamp(max=1)
    return (x + d).clamp(0, 1)


def _pgd_worst_margin(model, x, y, eps, norm, steps=200, restarts=10):
    """The smallest margin f_y - max_j f_j a PGD with random restarts finds in each point's ball (eps: a float or one
    radius per point), along its whole path."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.as_tensor(eps, dtype=x.dtype).expand(len(x)).reshape(-1, *([1] * (x.dim() - 1)))
    worst = _margin(model, x, y).detach()
    for _ in range(restarts):
        v = _project(x, x + eps * (2 * torch.rand(x.shape, generator=gen) - 1), eps, norm)
        for t in range(steps):
            v.requires_grad_(True)
            m = _margin(model, v, y)
            (g,) = torch.autograd.grad(m.sum(), v)
            worst = torch.minimum(worst, m.detach())
            step = eps / 4 * (1 - t / steps) + 1e-4
            if norm == "Linf":
                v = v.detach() - step * g.sign()
            else:
                v = v.detach() - step * g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (g.dim() - 1)))
            v = _project(x, v, eps, norm)
        worst = torch.minimum(worst, _margin(model, v, y).detach())
    return worst


def _affine_models():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    conv = nn.Sequential(Normalize([0.4], [0.3]), nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3),
                         Residual(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(12, 4))
    conv[2].running_mean.uniform_(-0.5, 0.5)
    conv[2].running_var.uniform_(0.5, 2)
    return {"dense": (dense.eval(), (12,)), "conv": (conv.eval(), (1, 4, 4))}


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_an_affine_models_bounds_are_exact(norm, kind):
    """A model without activations is f(x) = J x + f(0): the minimum of each margin over the ball is known in closed
    form (L2: the ball alone, away from the box's faces). CROWN's bounds are it, through normalization, convolution,
    batch norm, a residual block with a convolution shortcut, average pooling and a dense layer; IBP's are it on a
    dense layer (it folds the margins into the affine layers after the last nonlinearity) and below it elsewhere."""
    model, shape = _affine_models()[kind]
    x = 0.3 + 0.4 * torch.rand(5, *shape)
    y = torch.tensor([0, 1, 2, 3, 0])
    eps = 0.05
    got = margin_lower(program(model, shape), x.double(), y, torch.full((5,), eps, dtype=F64), norm)
    m64 = model.double()
    with torch.no_grad():
        z = m64(x.double())
    J = torch.autograd.functional.jacobian(lambda v: m64(v.reshape(1, *shape))[0], x[0].double().flatten())
    diff = J[y][:, None, :] - J[None]                                  # (N, C, d)
    centre = z.gather(1, y[:, None]) - z
    exact = centre - eps * (diff.abs().sum(2) if norm == "Linf" else diff.norm(dim=2))
    mask = torch.ones_like(exact, dtype=torch.bool)
    mask[torch.arange(5), y] = False
    assert torch.allclose(got.crown[mask], exact[mask], atol=1e-9)
    if kind == "dense":  # IBP folds the margins into the affine layers after the last nonlinearity (here: all)
        assert torch.allclose(got.ibp[mask], exact[mask], atol=1e-9)
    assert bool((got.ibp[mask] <= exact[mask] + 1e-9).all())  # a residual block is an interval there


@pytest.mark.parametrize("stride", [2, 1])
def test_a_max_pool_layers_bounds_are_exact_where_known(stride):
    """MaxPool then Linear on a box: with disjoint windows (stride 2) each pooled value ranges over [max lo, max hi]
    on its own, so the minimum of c·pool(x) is c⁺·max lo + c⁻·max hi, and CROWN's relaxation reaches it; with
    overlapping windows (stride 1) it stays at or below every corner of the box (the minimum of a max of linear
    pieces... sampled at 4,096 corners)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.MaxPool2d(2, stride=stride), nn.Flatten(), nn.Linear(4 if stride == 2 else 9, 3)).eval()
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0])
    eps = 0.15
    got = margin_lower(program(model, (1, 4, 4)), x.double(), y, torch.full((4,), eps, dtype=F64), "Linf")
    lo, hi = (x.double() - eps).clamp(0, 1), (x.double() + eps).clamp(0, 1)
    W, b = model[2].weight.double(), model[2].bias.double()
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[torch.arange(4), y] = False
    if stride == 2:
        plo, phi = nn.functional.max_pool2d(lo, 2).flatten(1), nn.functional.max_pool2d(hi, 2).flatten(1)
        c = W[y][:, None, :] - W[None]                                  # (N, C, 4)
        exact = (c.clamp(min=0) * plo[:, None]).sum(2) + (c.clamp(max=0) * phi[:, None]).sum(2) + b[y][:, None] - b
        assert torch.allclose(got.crown[mask], exact[mask], atol=1e-10)
        assert torch.allclose(got.ibp[mask], exact[mask], atol=1e-10)
    gen = torch.Generator().manual_seed(0)
    corner = torch.where(torch.rand(4096, 4, 1, 4, 4, generator=gen) < 0.5, lo, hi)
    with torch.no_grad():
        z = model.double()(corner.flatten(0, 1)).reshape(4096, 4, 3)
    margins = (z.gather(2, y[None, :, None].expand(4096, -1, 1)) - z).amin(0)
    assert bool((got.crown[mask] <= margins[mask] + 1e-10).all())
    assert bool((got.ibp[mask] <= margins[mask] + 1e-10).all())


def test_certified_points_are_correct_and_unbroken(digits):
    """A certified point is classified correctly and survives PGD (200 steps, 10 restarts) at its certified radius
    (certify_points: the best of the three certificates); a misclassified point is certified by nothing, at any
    radius."""
    from lawbench.certify import certify_points, lipschitz_upper
    _, _, x, y = digits
    model = _mlp(digits, (16,))
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    y_bad = torch.where(wrong, y, (y + 1) % 10)  # every point mislabelled
    assert not any(v.any() for v in local_certify(model, x, y_bad, 0.0, "Linf").values())
    got = certify_points(model, x, y, [0.02, 0.05], "Linf", upper=lipschitz_upper(model, (64,)))
    r = got.radii.clamp(max=got.top).float() * (1 - 1e-6)
    cert = r > 0
    assert int(cert.sum()) > 100 and not bool((cert & wrong).any())
    assert bool((_pgd_worst_margin(model, x[cert], y[cert], r[cert], "Linf") > 0).all())


class Swish(nn.Module):
    def forward(self, v):
        return v * torch.sigmoid(v)


def test_a_refused_layer_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), Swish(), nn.Linear(8, 10))
    with pytest.raises(CertifyError, match=r"model\.2 \(Swish\) unsupported layer type"):
        local_certify(model, torch.rand(3, 64), torch.zeros(3, dtype=torch.long), 0.1, "Linf")


def test_the_certified_radius_is_sound_and_bisected_to_its_bracket(digits):
    """certify_points' radius per point: at least the global certificate's; the exact minimum margin (MILP) over
    the ball of that radius is positive (sound); CROWN and IBP certify nothing a bracket-width past it (the
    bisection converged: 8 halvings of a bracket of at most 0.05, from the largest eps to twice it); a
    misclassified point has radius 0."""
    from lawbench.certify import certified_radii, certify_points, lipschitz_upper, radius_quartiles
    _, _, x, y = digits
    model = _mlp(digits, (5,))
    x, y = x[:12], y[:12]
    upper = lipschitz_upper(model, (64,))
    got = certify_points(model, x, y, [0.02, 0.05], "Linf", upper=upper)
    glob = certified_radii(model, x, y, upper, "Linf")
    assert bool((got.radii >= glob).all())
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert bool((got.radii[wrong] == 0).all())
    checked = 0
    for i in range(len(y)):
        r = float(got.radii[i])
        if r == 0 or r == float("inf"):
            continue
        checked += 1
        assert np.nanmin(_exact(model, x[i], y[i], r, milp_margins)) > 0
        past = local_certify(model, x[i:i + 1], y[i:i + 1], r + 0.05 / 2 ** 8 + 1e-9, "Linf")
        assert not (past["crown"] | past["ibp"]).any()
    assert checked >= 5
    q = radius_quartiles(got.radii, got.top)
    assert q["q1"] <= q["median"] <= q["q3"]
