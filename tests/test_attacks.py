"""PGD engine: exact eps balls, strength against torchattacks, early exit, sweeps, restarts, targeted, losses,
multi-model layouts, max_batch and out-of-memory back-off. Small MLPs trained on sklearn digits in seconds."""
import math

import pytest
import torch

from lawbench import attacks
from lawbench.attacks.threat import attack_loss, box_bounds
from conftest import digits_split, train_digits_mlp

EPS_LINF = [0.1, 0.05, 0.2]
EPS_L2 = [0.5, 1.0]




@pytest.fixture(scope="module")
def data():
    return digits_split(600, slice(1200, 1400))


@pytest.fixture(scope="module")
def model(data):
    xtr, ytr, xt, yt = data
    m = train_digits_mlp(0, xtr, ytr)
    assert (m(xt).argmax(1) == yt).float().mean() > 0.85
    return m


def _inside(x_adv, x, eps, norm):
    d = (x_adv - x).reshape(x.shape[0], -1)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if norm == "Linf":
        assert float(d.abs().max()) <= eps  # exact, in python doubles
        assert bool((d.abs() <= eps).all())  # exact, in float32
    else:
        assert float(d.norm(dim=1).max()) <= eps * (1 + 1e-5)


@pytest.mark.parametrize("schedule", ["sequential", "joint"])
@pytest.mark.parametrize("norm,eps", [("Linf", EPS_LINF), ("L2", EPS_L2)])
def test_examples_inside_ball_and_box(model, data, norm, eps, schedule):
    _, _, x, y = data
    r = attacks.pgd_sweep(model, x, y, eps, norm=norm, steps=20, restarts=2, seed=3, schedule=schedule)
    assert r.info["schedule"] == schedule
    assert r.robust.shape == (len(eps), x.shape[0]) and r.x_adv.shape == (len(eps), *x.shape)
    for i, e in enumerate(eps):
        _inside(r.x_adv[i], x, e, norm)
        # every point counted as broken has a misclassified example (or is clean-misclassified)
        pred = model(r.x_adv[i]).argmax(1)
        assert bool((pred[~r.robust[i]] != y[~r.robust[i]]).all())
        assert bool((pred[r.robust[i]] == y[r.robust[i]]).all())
    xa = attacks.pgd_perturb(model, x, y, max(eps), norm=norm, steps=7)
    _inside(xa, x, max(eps), norm)


def test_box_bounds_rounding_is_exact():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2000, 50, generator=g)
    x0[:, :5] = 0.0
    x0[:, 5:10] = 1.0
    for eps in (0.1, 0.3, 1 / 255, 8 / 255, 0.7):
        lo, hi = box_bounds(x0, eps, "Linf")
        assert float((hi - x0).max()) <= eps and float((x0 - lo).max()) <= eps
        assert float(lo.min()) >= 0 and float(hi.max()) <= 1
        # tight: within a few ulps of the ideal box
        assert float(((x0 + eps).clamp(max=1) - hi).abs().max()) < 1e-6


def test_pgd_perturb_plain_fixed_steps(model, data):
    _, _, x, y = data
    for p in model.parameters():
        p.grad = None
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a = attacks.pgd_perturb(model, x, y, 0.1, steps=10, generator=g1)
    b = attacks.pgd_perturb(model, x, y, 0.1, steps=10, generator=g2)
    assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched
    acc = (model(a).argmax(1) == y).float().mean()
    assert acc < (model(x).argmax(1) == y).float().mean()
    # no early exit: the last iterate of a plain PGD run sits on the Linf sphere for most coordinates
    assert float(((a - x).abs() > 0.1 - 1e-6).float().mean()) > 0.3


def test_not_weaker_than_torchattacks(model, data):
    import torchattacks  # a declared dependency: missing is a failure, not a skip
    _, _, x, y = data
    steps = 20
    for e in (0.05, 0.1):
        alpha = 2.5 * e / steps
        ours = attacks.pgd_sweep(model, x, y, [e], steps=steps, step_size=alpha, random_start=False).robust[0]
        xa = torchattacks.PGD(model, eps=e, alpha=alpha, steps=steps, random_start=False)(x, y)
        theirs = model(xa).argmax(1) == y
        assert int(ours.sum()) <= int(theirs.sum())
        # same trajectory until our early exit: every point torchattacks breaks, we break
        assert int((ours & ~theirs).sum()) <= 1
        # random starts (ours: 2 restarts vs their single run)
        ours_r = attacks.pgd_sweep(model, x, y, [e], steps=steps, step_size=alpha, restarts=2, seed=1).robust[0]
        torch.manual_seed(0)
        xr = torchattacks.PGD(model, eps=e, alpha=alpha, steps=steps)(x, y)
        assert int(ours_r.sum()) <= int((model(xr).argmax(1) == y).sum())
    img = torch.nn.Sequential(torch.nn.Flatten(), model).eval()  # torchattacks' L2 PGD needs (N, C, H, W)
    xi = x.reshape(-1, 1, 8, 8)
    l2 = attacks.pgd_sweep(img, xi, y, [1.0], norm="L2", steps=steps, step_size=0.125, random_start=False).robust[0]
    xa = torchattacks.PGDL2(img, eps=1.0, alpha=0.125, steps=steps, random_start=False)(xi, y)
    assert int(l2.sum()) <= int((img(xa).argmax(1) == y).sum())


def test_early_exit_and_sweep_monotone(model, data):
    _, _, x, y = data
    steps = 50
    r = attacks.pgd_sweep(model, x, y, EPS_LINF, steps=steps, seed=0)
    info = r.info
    clean = info["clean"]
    n_clean = int(clean.sum())
    # order follows the argument; monotone in eps
    acc = r.accuracy()
    assert acc[0.05] >= acc[0.1] >= acc[0.2]
    i05, i10, i20 = EPS_LINF.index(0.05), EPS_LINF.index(0.1), EPS_LINF.index(0.2)
    assert bool((r.robust[i10] <= r.robust[i05]).all()) and bool((r.robust[i20] <= r.robust[i10]).all())
    assert bool((r.robust[i05] <= clean).all())
    # a point broken at 0.05 carries the same example at 0.1 and 0.2 (not attacked again)
    b05 = clean & ~r.robust[i05]
    assert torch.equal(r.x_adv[i10][b05], r.x_adv[i05][b05])
    assert torch.equal(r.x_adv[i20][b05], r.x_adv[i05][b05])
    assert bool((info["broken_step"][i10][b05] == -1).all())
    # early exit: far fewer gradient rows than points x eps x steps; broken points stop early
    full = n_clean * len(EPS_LINF) * steps
    assert info["grad_rows"] < 0.7 * full
    bs = info["broken_step"][i20]
    assert float(bs[bs >= 0].float().mean()) < steps / 2
    # exact work count: surviving rows run every step at every eps they reach
    lower = sum(int(r.robust[i].sum()) * steps for i in range(3))
    assert info["grad_rows"] >= lower


@pytest.mark.parametrize("targeted", [False, True])
def test_joint_schedule_matches_sequential(model, data, targeted):
    _, _, x, y = data
    a = attacks.pgd_sweep(model, x, y, EPS_LINF, steps=20, restarts=2, schedule="sequential", targeted=targeted)
    b = attacks.pgd_sweep(model, x, y, EPS_LINF, steps=20, restarts=2, schedule="joint", targeted=targeted)
    for i in range(len(EPS_LINF)):
        assert abs(int(a.robust[i].sum()) - int(b.robust[i].sum())) <= 3
    i05, i10, i20 = EPS_LINF.index(0.05), EPS_LINF.index(0.1), EPS_LINF.index(0.2)
    assert bool((b.robust[i10] <= b.robust[i05]).all()) and bool((b.robust[i20] <= b.robust[i10]).all())
    # joint runs more rows per pass, and more work in total (rows at larger eps run until the point breaks)
    assert b.info["grad_rows"] >= a.info["grad_rows"]
    rec = _Recorder(model)
    c = attacks.pgd_sweep(rec, x, y, EPS_LINF, steps=5, restarts=2, schedule="joint", max_batch=60)
    assert max(rec.sizes) <= 60 and c.info["max_batch"] == 60


@pytest.mark.parametrize("loss", ["ce", "margin", "dlr"])
def test_fast_mlp_path_matches_autograd(model, data, loss, monkeypatch):
    from lawbench.attacks.ascent import FastMLP as _FastMLP, ModelGradient, Rows
    _, _, x, y = data
    xf = x.reshape(x.shape[0], -1).clone()
    fast = _FastMLP.build(model, (64,))
    assert fast is not None and _FastMLP.build(torch.nn.Sequential(torch.nn.Tanh()), (64,)) is None
    assert _FastMLP.build(model, (1, 8, 8)) is None  # Linear first on an image: not a plain MLP
    assert _FastMLP.build(torch.nn.Sequential(torch.nn.Flatten(), model), (1, 8, 8)) is None  # nested
    assert _FastMLP.build(torch.nn.Sequential(torch.nn.Flatten(), *model), (1, 8, 8)) is not None
    t = (y + 1) % 10
    for tgt in (None, t):
        rows = lambda: Rows(x=xf.clone(), y=y, lo=xf, hi=xf, eps=0.0, target=tgt)  # noqa: E731
        on, off = ModelGradient(model, (64,), loss), ModelGradient(model, (64,), loss)
        off.fast = None
        assert on.fast is not None
        z1, g1 = on(rows())
        z2, g2 = off(rows())
        assert torch.allclose(z1, z2, atol=1e-5) and torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)
    r1 = attacks.pgd_sweep(model, x, y, [0.05, 0.1], steps=20, seed=0, loss=loss)
    monkeypatch.setattr(attacks.ascent, "FAST_MLP", False)
    r2 = attacks.pgd_sweep(model, x, y, [0.05, 0.1], steps=20, seed=0, loss=loss)
    assert float((r1.robust == r2.robust).float().mean()) >= 0.97


def test_restarts_only_help(model, data):
    _, _, x, y = data
    r1 = attacks.pgd_sweep(model, x, y, [0.05], steps=10, restarts=1, seed=4)
    r3 = attacks.pgd_sweep(model, x, y, [0.05], steps=10, restarts=3, seed=4)
    # restart 0 is identical (same seed); later restarts can only break more points
    assert bool((r3.robust <= r1.robust).all())
    assert r3.info["grad_rows"] > r1.info["grad_rows"]
    assert r3.info["restarts"] == 3


def test_targeted_mode(model, data):
    _, _, x, y = data
    with torch.no_grad():
        z = model(x)
    target = z.scatter(1, y[:, None], -math.inf).argmax(1)  # most likely wrong class
    r = attacks.pgd_sweep(model, x, y, [0.2], steps=30, loss="margin", targeted=True, target=target, seed=0)
    broken = r.info["clean"] & ~r.robust[0]
    assert int(broken.sum()) > 10
    pred = model(r.x_adv[0]).argmax(1)
    assert float((pred[broken] == target[broken]).float().mean()) > 0.6
    # default targets: restart r aims at the r-th most likely wrong class
    r2 = attacks.pgd_sweep(model, x, y, [0.2], steps=30, targeted=True, restarts=3, seed=0)
    assert r2.info["targeted"] and int((r2.info["clean"] & ~r2.robust[0]).sum()) > 10
    _inside(r2.x_adv[0], x, 0.2, "Linf")


def test_losses_values_and_margin_attack(model, data):
    _, _, x, y = data
    z = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.0, 5.0, 1.0, 4.0]])
    t = torch.tensor([0, 1])
    assert torch.allclose(attack_loss(z, t, "margin"), torch.tensor([-1.0, -1.0]))
    assert torch.allclose(attack_loss(z, t, "margin", torch.tensor([2, 3])), torch.tensor([-1.0, -1.0]))
    dlr = attack_loss(z, t, "dlr")
    assert torch.allclose(dlr, torch.tensor([-1.0 / (3.0 - 1.0), -1.0 / (5.0 - 1.0)]))
    assert torch.allclose(attack_loss(z, t, "ce"), torch.nn.functional.cross_entropy(z, t, reduction="none"))
    rm = attacks.pgd_sweep(model, x, y, [0.1], steps=30, loss="margin", seed=0)
    rc = attacks.pgd_sweep(model, x, y, [0.1], steps=30, loss="ce", seed=0)
    _inside(rm.x_adv[0], x, 0.1, "Linf")
    pred = model(rm.x_adv[0]).argmax(1)
    assert bool((pred[~rm.robust[0]] != y[~rm.robust[0]]).all())
    assert abs(float(rm.robust.float().mean()) - float(rc.robust.float().mean())) < 0.15
    with pytest.raises(attacks.AttackError):
        attacks.pgd_sweep(model, x, y, [0.1], loss="hinge")
    with pytest.raises(attacks.AttackError):
        attacks.pgd_sweep(model, x, y, [0.1], norm="L1")


class _Recorder(torch.nn.Module):
    """Wraps a model; records batch sizes and raises OutOfMemoryError above ``limit`` rows."""

    def __init__(self, inner, limit=None, grad_only=False):
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.grad_only = grad_only  # only passes that need input gradients run out of memory (the attack's chunks)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if self.grad_only and not (torch.is_grad_enabled() and x.requires_grad):
            return self.inner(x)
        if self.limit is not None and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} rows > {self.limit}")
        return self.inner(x)


def test_max_batch_bounds_passes(model, data):
    _, _, x, y = data
    rec = _Recorder(model)
    r = attacks.pgd_sweep(rec, x, y, [0.05, 0.1], steps=10, max_batch=32, random_start=False)
    assert max(rec.sizes) <= 32
    full = attacks.pgd_sweep(model, x, y, [0.05, 0.1], steps=10, random_start=False)
    assert float((r.robust == full.robust).float().mean()) >= 0.98


def test_oom_backoff(model, data):
    _, _, x, y = data
    rec = _Recorder(model, limit=45)
    r = attacks.pgd_sweep(rec, x, y, [0.05, 0.1], steps=10, seed=0)
    assert r.info["oom_backoffs"] >= 1 and r.info["max_batch"] <= 45
    _inside(r.x_adv[1], x, 0.1, "Linf")
    # out of memory inside the attack's chunks: the failed chunk is retried at half size, never dropped; the result
    # is the one of a run that used the final size throughout
    chunked = attacks.pgd_sweep(_Recorder(model, limit=120, grad_only=True), x, y, [0.05, 0.1], steps=10, seed=0)
    assert chunked.info["oom_backoffs"] >= 1 and chunked.info["max_batch"] <= 120
    same = attacks.pgd_sweep(model, x, y, [0.05, 0.1], steps=10, seed=0, max_batch=chunked.info["max_batch"])
    assert same.info["oom_backoffs"] == 0
    assert torch.equal(chunked.robust, same.robust) and torch.equal(chunked.x_adv, same.x_adv)
    rec2 = _Recorder(model, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        attacks.pgd_sweep(rec2, x, y, [0.1], steps=2)


def test_multimodel_stacked_equals_sequential(data, monkeypatch):
    # autograd everywhere, so both layouts do the same arithmetic up to summation order
    monkeypatch.setattr(attacks.ascent, "FAST_MLP", False)
    xtr, ytr, x, y = data
    models = [train_digits_mlp(s, xtr[:300], ytr[:300], width=32, epochs=40) for s in range(3)]
    for norm, eps in (("Linf", [0.1, 0.05]), ("L2", [1.0])):
        a = attacks.pgd_sweep_multi(models, x, y, eps, norm=norm, steps=12, restarts=2, layout="stacked", seed=2)
        b = attacks.pgd_sweep_multi(models, x, y, eps, norm=norm, steps=12, restarts=2, layout="sequential",
                                    seed=2)
        assert a.info["layout"] == "stacked" and b.info["layout"] == "sequential"
        for ra, rb, m in zip(a.results, b.results, models):
            # same random starts; trajectories differ only by sign flips of near-zero gradient coordinates
            assert float((ra.robust == rb.robust).float().mean()) >= 0.98
            single = attacks.pgd_sweep(m, x, y, eps, norm=norm, steps=12, restarts=2, seed=2)
            assert float((single.robust == ra.robust).float().mean()) >= 0.97
            for i, e in enumerate(eps):
                _inside(ra.x_adv[i], x, e, norm)
    c = attacks.pgd_sweep_multi(models, x[:8], y[:8], [0.1], steps=5, layout="auto")
    probe = c.info["probe_seconds"]  # auto takes the layout its probe measured faster, and says so
    assert c.info["layout"] == min(probe, key=probe.get) and "probe" in c.info["reason"]
    rec = _Recorder(models[0], limit=None)
    d = attacks.pgd_sweep_multi([rec, models[1]], x, y, [0.1], steps=5, layout="auto")
    assert d.info["layout"] == "sequential" and "not stackable" in d.info["reason"]


@pytest.mark.parametrize("norm, eps", [("Linf", 0.2), ("L2", 1.0)])
def test_default_step_rule_decays_from_half_eps_in_four_stages(norm, eps):
    """A linear model whose margin gradient is one constant direction and which no step can break: every step moves
    the iterate by exactly its step size, so after 4 steps it has moved eps*(1/2 + 1/4 + 1/8 + 1/16). A fixed step
    (2.5*eps/steps would reach the sphere; torchattacks' eps/4 would sum to eps) or a reordered schedule moves
    otherwise; an explicit step_size stays a fixed step."""
    lin = torch.nn.Linear(64, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.ones(64), -torch.ones(64)]))
        lin.bias.zero_()  # margin 64 at x, still > 0 after any step in the ball: never broken
    x, y = torch.full((3, 64), 0.5), torch.zeros(3, dtype=torch.long)

    def moved(**kw):
        r = attacks.pgd_sweep(lin, x, y, [eps], norm=norm, steps=4, random_start=False, loss="margin", **kw)
        assert bool(r.robust.all())
        d = (r.x_adv[0] - x).reshape(3, -1).double()
        return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)

    assert torch.allclose(moved(), torch.full((3,), eps * 15 / 16, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(moved(step_size=eps / 8), torch.full((3,), eps / 2, dtype=torch.float64), rtol=1e-5)
    r = attacks.pgd_sweep(lin, x, y, [eps], norm=norm, steps=4, random_start=False)
    assert r.info["step_size"] == [{"decay": [eps / 2, eps / 4, eps / 8, eps / 16]}]


@pytest.mark.parametrize("schedule", ["sequential", "joint"])
def test_default_step_decays_in_four_stages_in_both_schedules(schedule):
    """The default step is eps/2, eps/4, eps/8, eps/16 over four equal stages, each eps of the sweep its own: on a
    linear two-class model whose margin no eps can cross, 4 steps without random start move every coordinate by
    (1/2 + 1/4 + 1/8 + 1/16)·eps = 0.9375·eps along the loss's sign. The joint schedule (the default on CUDA) runs
    every (eps, restart, point) as one row with the row's own per-step sizes; a fixed step (eps/2 each time) would
    reach the box's edge at eps, a schedule read at the wrong eps another fraction of it."""
    d = 6
    model = torch.nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -1.0, 2.0, -3.0], [0.0] * d]))
        model.bias.copy_(torch.tensor([100.0, 0.0]))
    x = torch.full((3, d), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    eps = [0.01, 0.02, 0.04]
    r = attacks.pgd_sweep(model, x, y, eps, norm="Linf", steps=4, restarts=2, random_start=False,
                          schedule=schedule)
    assert r.info["schedule"] == schedule
    assert bool(r.robust.all())
    direction = torch.sign(model.weight[1] - model.weight[0]).detach()  # the loss rises towards class 1
    for k, e in enumerate(eps):
        assert torch.allclose(r.x_adv[k] - x, 0.9375 * e * direction.expand_as(x), atol=1e-6), (schedule, e)
    assert r.info["step_size"][0] == {"decay": [0.005, 0.0025, 0.00125, 0.000625]}
