"""AutoAttack adapter (pyautoattack), gradient-masking flags, robust_eval pipeline and the attack registry."""
import logging

import pytest
import torch

from lawbench import attacks
from conftest import digits_split, train_digits_mlp




@pytest.fixture(scope="module")
def data():
    return digits_split(500, slice(1300, 1360))


@pytest.fixture(scope="module")
def model(data):
    xtr, ytr, _, _ = data
    return train_digits_mlp(0, xtr, ytr, width=48)


class _Quantized(torch.nn.Module):
    """Gradient masking: the input is rounded to 4 levels, so every input gradient is exactly zero."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


class _Noisy(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        z = self.inner(x)
        return z + 0.5 * torch.randn_like(z)


def test_autoattack_custom_list_and_log(model, data, capsys):
    _, _, x, y = data
    lines = []
    before = torch.random.get_rng_state()
    r = attacks.run_autoattack(model, x[:30], y[:30], 0.1, norm="Linf", version=["apgd-ce", "apgd-t"], seed=0,
                               log=lines.append, impl="original")  # the original's own log lines
    assert torch.equal(before, torch.random.get_rng_state())  # global RNG untouched
    assert r.robust.shape == (30,) and r.x_adv.shape == x[:30].shape
    d = (r.x_adv - x[:30]).abs().max()
    assert float(d) <= 0.1 + 1e-6 and float(r.x_adv.min()) >= 0 and float(r.x_adv.max()) <= 1
    pred = model(r.x_adv).argmax(1)
    assert torch.equal(pred == y[:30], r.robust)
    assert r.info["attacks"] == ["apgd-ce", "apgd-t"] and r.info["n_target_classes"] == 9
    assert r.info["image_view"] == [1, 8, 8]
    assert any("apgd-ce" in ln for ln in lines) and any("robust accuracy" in ln for ln in lines)
    assert sum(r.info["broken_by"].values()) == int((model(x[:30]).argmax(1) == y[:30]).sum() - r.robust.sum())
    out = capsys.readouterr()
    assert "apgd" not in out.out.lower() and "apgd" not in out.err.lower()
    assert not any(isinstance(h, attacks.autoattack._Capture) for h in logging.getLogger("auto-attack").handlers)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(attacks.AttackError):
        attacks.run_autoattack(model, x, y, 0.1, norm="Linf", version=["apgd-xx"])


def test_autoattack_standard_few_points(data):
    xtr, ytr, x, y = data
    keep = ytr < 5
    m5 = train_digits_mlp(1, xtr[keep], ytr[keep], width=48, classes=5, epochs=60)
    sel = (y < 5).nonzero().flatten()[:12]
    eps = 0.1
    clean = m5(x[sel]).argmax(1) == y[sel]
    r = attacks.run_autoattack(m5, x[sel], y[sel], eps, norm="Linf", version="standard", seed=0)
    assert r.info["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r.info["n_target_classes"] == 4  # capped at num_classes - 1
    assert "n_classes" not in r.flags
    assert float((r.x_adv.double() - x[sel].double()).abs().max()) <= eps  # the exact ball (float64 distance)
    # pyautoattack run directly on the same points and seed, targets capped by hand as a careful user would: the
    # same attack, so ours keeps no point it breaks with a valid example, and the same points when nothing was lost
    alone = _pyautoattack_alone(m5, x[sel], y[sel], eps, seed=0, n_target_classes=4)
    assert not bool((r.robust & ~alone).any()), (r.robust, alone)
    if r.info["check"]["lost"] == 0:
        assert torch.equal(r.robust, alone)
    assert 0 < int(alone.sum()) < int(clean.sum()), "the comparison needs points kept and points broken"


def _pyautoattack_alone(model, x, y, eps, *, seed, n_target_classes=9, attacks=None):
    """Robust mask of pyautoattack used directly (images shaped 1x8x8 for Square), its examples judged after a
    projection into the exact ball (a raw example an ulp outside it does not count)."""
    from pyautoattack import AutoAttack
    from lawbench.attacks.threat import project
    net = torch.nn.Sequential(torch.nn.Flatten(), model).eval()
    xi = x.reshape(-1, 1, 8, 8)
    with torch.random.fork_rng():
        aa = AutoAttack(net, norm="Linf", eps=eps, version="custom" if attacks else "standard", seed=seed,
                        attacks=attacks, device=x.device)
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = n_target_classes
        if attacks:
            aa.apgd.n_restarts = aa.fab.n_restarts = aa.apgd_targeted.n_restarts = 1
        xa, _ = aa.run_standard_evaluation(xi, y, batch_size=len(y))
    with torch.no_grad():
        return net(project(xi, xa, eps, "Linf")).argmax(1) == y


def test_flags_softmax_and_randomized(model, data):
    _, _, x, y = data
    soft = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    r = attacks.run_autoattack(soft, x[:10], y[:10], 0.05, norm="Linf", version=["apgd-ce"], seed=0)
    assert "softmax_output" in r.flags
    r2 = attacks.run_autoattack(_Noisy(model).eval(), x[:10], y[:10], 0.05, norm="Linf", version=["apgd-ce"])
    assert "randomized" in r2.flags
    r3 = attacks.run_autoattack(model, x[:10], y[:10], 0.05, norm="Linf", version=["apgd-ce"])
    assert r3.flags == []


def test_flags_zero_gradients_and_square(model, data):
    _, _, x, y = data
    q = _Quantized(model).eval()
    clean = q(x).argmax(1) == y
    idx = clean.nonzero().flatten()[:12]
    r = attacks.run_autoattack(q, x[idx], y[idx], 0.3, norm="Linf", version=["apgd-t", "square"], seed=0)
    assert "zero_gradients" in r.flags
    assert r.info["broken_by"].get("square", 0) > 0 and "square_beats_whitebox" in r.flags
    assert set(r.flags) <= set(attacks.FLAG_DOC)


def test_robust_eval_pipeline(model, data):
    _, _, x, y = data
    x, y = x[:30], y[:30]
    lines = []
    ev = attacks.robust_eval(model, x, y, norm="Linf", eps=[0.1, 0.05], steps=1, restarts=1,
                             autoattack=["apgd-ce", "apgd-t"], aa_eps=[0.1], seed=0, log=lines.append)
    assert set(ev.pgd_robust) == {0.1, 0.05} and set(ev.aa_robust) == {0.1}
    assert set(ev.timings) == {"pgd", "autoattack"}
    for e in (0.05, 0.1):
        assert float((ev.x_adv[e] - x).abs().max()) <= e
        pred = model(ev.x_adv[e]).argmax(1)
        assert bool((pred[~ev.robust[e]] != y[~ev.robust[e]]).all())
    assert bool((ev.robust[0.1] <= ev.robust[0.05]).all())
    assert torch.equal(ev.aa_robust[0.1], ev.robust[0.1])
    # AutoAttack ran only on what one-step PGD left, and found more: the same as AutoAttack run by hand on them
    surv = ev.pgd_robust[0.1]
    assert ev.info["autoattack"][0.1]["n_attacked"] == int(surv.sum())
    by_hand = attacks.run_autoattack(model, x[surv], y[surv], 0.1, norm="Linf", version=["apgd-ce", "apgd-t"], seed=0)
    assert torch.equal(ev.robust[0.1][surv], by_hand.robust) and not bool(ev.robust[0.1][~surv].any())
    assert int(ev.robust[0.1].sum()) < int(surv.sum())
    assert any(ln.startswith("autoattack") for ln in lines) and any("apgd" in ln for ln in lines)
    off = attacks.robust_eval(model, x, y, norm="L2", eps=[0.5], steps=5, restarts=1, autoattack="off")
    assert off.aa_robust == {} and torch.equal(off.robust[0.5], off.pgd_robust[0.5])
    with pytest.raises(attacks.AttackError):
        attacks.robust_eval(model, x, y, norm="Linf", eps=[0.1], steps=5, restarts=1, aa_eps=[0.2])


def test_registry(model, data):
    _, _, x, y = data
    names = {e.name for e in attacks.list_attacks()}
    for n in ("pgd", "pgd-margin", "pgd-t", "autoattack", "autoattack-plus", "fgsm", "cw", "deepfool", "square",
              "ta-pgd", "aa-square"):
        assert n in names
    assert [e.name for e in attacks.list_attacks("pgd*")] == sorted(n for n in names if n.startswith("pgd"))
    with pytest.raises(attacks.AttackError):
        attacks.get_attack("nope")
    with pytest.raises(attacks.AttackError):
        attacks.get_attack("cw").run(model, x, y, 0.1, norm="Linf")
    with pytest.raises(attacks.AttackError):
        attacks.register_attack("pgd", kind="pgd")(lambda *a, **k: None)
    ours = attacks.get_attack("pgd", steps=10).run(model, x, y, 0.1, norm="Linf", seed=0)
    direct = attacks.pgd_sweep(model, x, y, [0.1], steps=10, seed=0)
    assert torch.equal(ours.robust, direct.robust[0])
    for name, norm, eps in (("fgsm", "Linf", 0.1), ("ta-pgd", "L2", 1.0), ("cw", "L2", 0.5),
                            ("deepfool", "L2", 0.5)):
        out = attacks.get_attack(name).run(model, x[:20], y[:20], eps, norm=norm, seed=0)
        d = (out.x_adv - x[:20]).reshape(20, -1)
        assert float(d.abs().max() if norm == "Linf" else d.norm(dim=1).max()) <= eps * (1 + 1e-5)
        assert torch.equal(model(out.x_adv).argmax(1) == y[:20], out.robust)
    fg = attacks.get_attack("fgsm").run(model, x, y, 0.1, norm="Linf")
    pg = attacks.get_attack("pgd", steps=20).run(model, x, y, 0.1, norm="Linf")
    assert int(pg.robust.sum()) <= int(fg.robust.sum())


@pytest.mark.parametrize("d", [16, 128])
def test_square_attacks_vector_data_in_l2(d):
    """Vector data is shown to Square as an image whose L2 start fits: at least 5x5 (its squares have side h // 5:
    the 4x4 view of the law-d preset's d=16 divided by zero), and a side whose squares the border does not cut (the
    12x12 view of d=128 failed to broadcast)."""
    from lawbench.attacks.autoattack import image_shape_for, square_starts
    assert image_shape_for((16,)) == (1, 5, 5) and image_shape_for((64,)) == (1, 8, 8)
    assert image_shape_for((128,)) == (1, 13, 13)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).eval()
    x = torch.rand(20, d)
    y = model(x).argmax(1)
    res = square_starts(model, x, y, 0.5, "L2", starts=1, queries=50, seed=0, batch_size=20, log=None)
    adv = res.x_adv
    assert adv.shape == x.shape and float((adv - x).norm(dim=1).max()) <= 0.5 * (1 + 1e-6)
    assert int(res.robust.sum()) < len(y)  # it attacked: some points broken at this radius
