"""The adaptive stage: straight-through and smoothed gradients found at run time, indicators of attack failure that
fire where an evaluation is fooled and stay quiet where it is not, majority verdicts, and the stage through the CLI.

Models: small MLPs trained on scikit-learn's 8x8 digits, behind front ends that hide their gradients."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lawbench import attacks
from lawbench.attacks.adaptive import run_adaptive
from lawbench.attacks.indicators import INDICATORS, _late_gain, entry, from_records, probe
from lawbench.attacks.randomized import Randomized
from lawbench.attacks.surrogate import Through, swapped_ops
from lawbench.attacks.threat import inside, misclassified
from conftest import digits_split, train_digits_mlp


class Front(torch.nn.Module):
    """A digits MLP behind a front end written as a user writes one (plain torch ops in forward)."""

    def __init__(self, kind: str, inner: torch.nn.Module):
        super().__init__()
        self.kind, self.inner = kind, inner

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        k = self.kind
        if k == "round":
            x = torch.round(x * 15) / 15
        elif k == "floor":
            x = torch.floor(x * 16).clamp(max=15) / 15
        elif k == "uint8":
            x = (x * 255).to(torch.uint8).float() / 255
        elif k == "step":
            x = (x > 0.5).float()
        elif k == "sign":
            x = (torch.sign(x - 0.5) + 1) / 2
        elif k == "where":
            x = torch.where(x > 0.5, torch.ones_like(x), torch.zeros_like(x))
        elif k == "detach":
            x = torch.round(x.detach() * 15) / 15
        elif k == "saturate":
            x = torch.sigmoid(1000 * (x - 0.5))
        elif k == "clamp":
            x = torch.clamp(1000 * (x - 0.5), 0, 1)
        elif k == "noise":
            x = x + 0.15 * torch.randn_like(x)
        elif k == "scaled":
            return self.inner(x) * 1e4
        return self.inner(x)


class ThermoNet(torch.nn.Module):
    """A thermometer encoding (8 levels) in front of a linear layer: comparisons the whole way."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        t = torch.arange(8, dtype=x.dtype) / 8
        return self.lin((x.reshape(x.shape[0], -1, 1) > t).float().flatten(1))


class CodebookNet(torch.nn.Module):
    """Each input snapped to the nearest of a few prototypes (argmax selection, then a one-hot look-up)."""

    def __init__(self, protos, lin):
        super().__init__()
        self.protos, self.lin = protos, lin

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        i = (x @ self.protos.T - 0.5 * (self.protos ** 2).sum(1)).argmax(1)
        return self.lin(F.one_hot(i, self.protos.shape[0]).float() @ self.protos)


class NumpyNet(torch.nn.Module):
    """Leaves torch for numpy: no mode can give it a gradient; the stage must run it plainly, and say why."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        import numpy as np
        q = torch.from_numpy(np.round(x.detach().reshape(x.shape[0], -1).numpy() * 15) / 15).to(x.dtype)
        return self.inner(q)


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, x, y = digits_split(1000, slice(1300, 1420))
    return xtr, ytr, x, y


@pytest.fixture(scope="module")
def inner(digits):
    xtr, ytr, _, _ = digits
    return train_digits_mlp(0, xtr, ytr, width=48, epochs=120)


def _grad(net, x, y):
    xr = x.clone().requires_grad_(True)
    z = net(xr)
    if not z.requires_grad:
        return torch.zeros_like(x)
    g = torch.autograd.grad(F.cross_entropy(z, y), xr, allow_unused=True)[0]
    return torch.zeros_like(x) if g is None else g


# ---------------------------------------------------------------------------------------------------------------------
# straight-through gradients through each kind of op

@pytest.mark.parametrize("kind,op", [("round", "round"), ("floor", "floor"), ("uint8", "cast to uint8"),
                                     ("step", "gt"), ("sign", "sign"), ("where", "gt"), ("detach", "detach"),
                                     ("saturate", "sigmoid (saturated)"), ("clamp", "clamp (saturated)")])
def test_straight_through_keeps_values_and_passes_gradients(kind, op, inner, digits):
    _, _, x, y = digits
    model = Front(kind, inner).eval()
    real = _grad(model, x, y)
    assert float((real == 0).float().mean()) > 0.9  # the front end hides the gradient on most coordinates
    net = Through(model)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))  # forward values are the model's own
    g = _grad(net, x, y)
    assert bool(torch.isfinite(g).all()) and float((g != 0).float().mean()) > 2 * float((real != 0).float().mean())
    assert op in net.swapped, net.swapped
    # the surrogate gradient points uphill: a small step along it raises the loss of the smooth surrogate
    soft = Through(model, soft=True)
    step = torch.clamp(x + 0.02 * _grad(soft, x, y).sign(), 0, 1)
    with torch.no_grad():
        before, after = F.cross_entropy(soft(x), y), F.cross_entropy(soft(step), y)
    assert float(after) > float(before)


def test_comparisons_selections_and_casts_carry_through_later_ops(inner, digits):
    _, _, x, y = digits
    torch.manual_seed(0)
    thermo = ThermoNet(torch.nn.Linear(64 * 8, 10)).eval()
    ops, failed = swapped_ops(thermo, x[:4])
    assert failed is None and ops.get("gt") == 1
    assert float(_grad(Through(thermo), x, y).abs().sum()) > 0
    assert float(_grad(thermo, x, y).abs().sum()) == 0
    code = CodebookNet(x[:6].clone(), torch.nn.Linear(64, 10)).eval()
    ops, _ = swapped_ops(code, x[:4])
    assert ops.get("one_hot(argmax)") == 1
    assert float(_grad(Through(code), x, y).abs().sum()) > 0


def test_a_forward_that_leaves_torch_runs_plainly_and_says_why(inner, digits):
    _, _, x, y = digits
    net = Through(NumpyNet(inner))
    with torch.no_grad():
        assert torch.equal(net(x), NumpyNet(inner)(x))
    _grad(net, x, y)
    assert net.failed and "numpy" in net.failed


def test_unsaturated_functions_and_plain_models_keep_their_exact_gradients(inner, digits):
    _, _, x, y = digits
    assert swapped_ops(inner, x[:8]) == ({}, None)
    g, g_through = _grad(inner, x, y), _grad(Through(inner), x, y)
    assert torch.equal(g, g_through)
    mild = torch.nn.Sequential(torch.nn.Tanh(), inner).eval()  # tanh of [0, 1]: far from saturation
    assert swapped_ops(mild, x[:8]) == ({}, None)


# ---------------------------------------------------------------------------------------------------------------------
# indicators: each fires where it must, and stays quiet where it must

def test_indicator_table_is_declared_once_and_entries_compare_to_thresholds():
    names = [i.name for i in INDICATORS]
    assert len(names) == len(set(names)) == 9
    assert entry("more_steps", 0.5)["fired"] and not entry("more_steps", 0.0)["fired"]
    assert entry("transfer_failure", None) == {"value": None, "threshold": 0.5, "fired": False}


def test_indicators_from_the_suites_records():
    quiet = from_records({"n_total": 100, "checks": {"pgd": {"unresolved": 0}}, "square_after_whitebox": 0})
    loud = from_records({"n_total": 100, "checks": {"pgd": {"unresolved": 1}}, "square_after_whitebox": 3})
    assert not any(v["fired"] for v in quiet.values())
    assert loud["silent_success"]["fired"] and loud["blackbox_beats_whitebox"]["fired"]


def test_incomplete_optimization_reads_the_late_gain():
    steps = torch.arange(101, dtype=torch.float32)[:, None]
    converged = torch.minimum(steps, torch.tensor(10.0)).repeat(1, 5)   # all gain in the first tenth
    climbing = steps.repeat(1, 5)                                       # still rising at the same rate
    flat = torch.zeros(101, 5)                                          # never moved (no gradient)
    assert _late_gain(converged) == 0.0
    assert _late_gain(climbing) == pytest.approx(0.2)
    assert entry("incomplete_optimization", _late_gain(climbing))["fired"]
    assert _late_gain(flat) == 0.0


def _fired(ind):
    return {k for k, v in ind.items() if v["fired"]}


def test_probe_fires_on_masked_models_and_not_on_the_plain_one(inner, digits):
    _, _, x, y = digits
    ok = ~misclassified(inner, x, y)
    plain, _, _ = probe(inner, x[ok], y[ok], 0.1, "Linf", seed=0)
    assert not ({"unavailable_gradients", "unstable_predictions", "unconstrained_failure", "non_monotone"}
                & _fired(plain)), plain
    quant = Front("round", inner).eval()
    ok = ~misclassified(quant, x, y)
    got, _, _ = probe(quant, x[ok], y[ok], 0.1, "Linf", seed=0)
    assert {"unavailable_gradients", "unconstrained_failure"} <= _fired(got)
    noisy = Randomized(Front("noise", inner).eval())
    ok = ~misclassified(noisy, x, y)
    got, _, _ = probe(noisy, x[ok], y[ok], 0.1, "Linf", seed=0)
    assert "unstable_predictions" in _fired(got)


def test_transfer_failure_needs_a_surrogate_and_fires_when_its_examples_do_not_transfer(inner, digits):
    xtr, ytr, x, y = digits
    ok = ~misclassified(inner, x, y)
    same, _, _ = probe(inner, x[ok], y[ok], 0.2, "Linf", seed=0, surrogate=inner)
    assert same["transfer_failure"]["value"] == 0.0
    other = train_digits_mlp(1, xtr, (ytr + 1) % 10, width=48, epochs=120)  # fooled anywhere, unrelated to inner
    far, _, _ = probe(inner, x[ok], y[ok], 0.05, "Linf", seed=0, surrogate=other)
    assert far["transfer_failure"]["fired"]
    none, _, _ = probe(inner, x[ok], y[ok], 0.05, "Linf", seed=0)
    assert none["transfer_failure"]["value"] is None


def test_more_steps_fires_on_points_a_weak_attack_left_and_stays_quiet_after_autoattack(inner, digits):
    _, _, x, y = digits
    ok = ~misclassified(inner, x, y)
    fresh, broken, x_adv = probe(inner, x[ok], y[ok], 0.1, "Linf", seed=0)  # nothing attacked them yet
    assert fresh["more_steps"]["fired"]
    assert bool(broken.any())
    x0 = x[ok][broken]
    assert bool(inside(x0.reshape(x0.shape[0], -1), x_adv[broken], 0.1, "Linf").all())
    assert bool(misclassified(inner, x_adv[broken], y[ok][broken]).all())
    ev = attacks.robust_eval(inner, x, y, norm="Linf", eps=[0.1], steps=50, restarts=1, seed=0,
                             suite=[attacks.SuiteStep("autoattack", (0.1,), {"version": "standard"}),
                                    attacks.SuiteStep("adaptive", (0.1,), {})])
    assert not _fired(ev.info["indicators"][0.1]), ev.info["indicators"]
    assert ev.info["breaks"][0.1]["adaptive"] == 0 and "adaptive" not in ev.aa_flags


# ---------------------------------------------------------------------------------------------------------------------
# the stage on masked models

def test_stage_breaks_what_autoattack_left_on_a_quantized_model_and_says_what_it_did(inner, digits):
    _, _, x, y = digits
    model = Front("round", inner).eval()
    suite = [attacks.SuiteStep("autoattack", (0.1,), {"version": ["apgd-ce", "apgd-t"]}),
             attacks.SuiteStep("adaptive", (0.1,), {})]
    ev = attacks.robust_eval(model, x, y, norm="Linf", eps=[0.1], steps=20, restarts=1, seed=0, suite=suite)
    d = ev.info["details"]["adaptive"][0.1]
    assert d["ran"] and "unavailable_gradients" in d["why"] and d["ops"].get("round")
    assert ev.info["breaks"][0.1]["adaptive"] > 0
    assert "adaptive" in ev.aa_flags
    # the row's verdicts are the real model's: every broken point's example lies in the ball and fools it
    broken = ev.clean & ~ev.robust[0.1]
    xa = ev.x_adv[0.1][broken]
    assert bool(inside(x[broken].reshape(int(broken.sum()), -1), xa, 0.1, "Linf").all())
    assert bool(misclassified(model, xa, y[broken]).all())


def test_auto_mode_does_nothing_where_nothing_fired_and_always_mode_attacks(inner, digits):
    _, _, x, y = digits
    ok = ~misclassified(inner, x, y)
    robust, _, info = run_adaptive(inner, x[ok][:5], y[ok][:5], 0.001, "Linf", seed=0, evidence={"n_total": 5})
    assert not info["ran"] and bool(robust.all())
    _, _, info = run_adaptive(inner, x[ok][:5], y[ok][:5], 0.001, "Linf", seed=0, mode="always")
    assert info["ran"] and set(info["broke"]) >= {"apgd-dlr", "apgd-t", "pgd-margin"}


def test_randomized_model_gets_eot_until_stable_and_majority_verdicts(inner, digits):
    _, _, x, y = digits
    noisy = Randomized(Front("noise", inner).eval())
    ok = ~misclassified(noisy, x, y)
    robust, x_adv, info = run_adaptive(noisy, x[ok][:24], y[ok][:24], 0.1, "Linf", seed=0, mode="always")
    assert info["eot"] >= 20 and info["eot_cos"] is not None
    broken = ~robust
    assert bool(broken.any())
    # a broken point's example is misclassified by most draws: over 400 fresh draws, by most of them on average and
    # by a third at the least (25 draws decide an example near one half by chance, never a lucky single draw)
    counts = Randomized(Front("noise", inner).eval(), votes=400).vote_counts(x_adv[broken])
    wrong = 1 - counts.gather(1, y[ok][:24][broken][:, None])[:, 0] / 400
    assert float(wrong.min()) > 1 / 3 and float(wrong.mean()) > 0.55, wrong


# ---------------------------------------------------------------------------------------------------------------------
# a plugin model through the CLI

PLUGIN = """
    import torch
    from lawbench.models import register_model

    class Quantized(torch.nn.Module):
        def __init__(self, d, width, classes):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, width), torch.nn.ReLU(),
                                           torch.nn.Linear(width, classes))

        def forward(self, x):
            return self.net(torch.round(x * 7) / 7)

    @register_model("quantized-mlp", family="qmlp", default_widths=(32,), datasets=("digits",))
    def build(in_shape, num_classes, width, **kw):
        d = 1
        for s in in_shape:
            d *= s
        return Quantized(d, width, num_classes)
"""


def test_plugin_model_through_the_cli_gets_indicators_and_the_adaptive_stage(cli, tmp_path):
    (tmp_path / "masked_plugin.py").write_text(textwrap.dedent(PLUGIN))
    out = tmp_path / "out"
    r = cli("run", "--plugin", "masked_plugin", "model=quantized-mlp", "dataset=digits", "width=[32]", "n_train=300",
            "n_test=60", "epochs=40", "pgd_steps=20", "eps_Linf=[0.1,0.2]", "aa_eps_Linf=[0.1]",
            "autoattack=[apgd-ce,apgd-t]", "attacks=[pgd,autoattack,adaptive]", "recipe=erm", "label_noise=0",
            "lip_points=32", "executor.name=local", "--out", str(out), env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    row = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert row["status"] == "ok", row.get("error")
    ind = row["attack_indicators"]
    assert set(ind) <= {"0.1", "0.2"} and ind
    first = next(iter(ind.values()))
    assert {i.name for i in INDICATORS} == set(first)
    assert "indicator:unavailable_gradients" in row["flags"] and "adaptive" in row["flags"]
    assert row["attack_details"]["adaptive"][next(iter(ind))]["ops"].get("round")
    for k, v in row["robust_acc"].items():
        aa = row["autoattack_acc"].get(k)
        assert aa is None or v <= aa
    assert "adaptive" in row["attack_breaks"]["0.1"]


def test_pull_back_keeps_the_logits_and_shrinks_the_perturbation(inner, digits):
    from lawbench.attacks.adaptive import pull_back
    from lawbench.attacks.threat import distance
    _, _, x, _ = digits
    model = Front("round", inner).eval()
    gen = torch.Generator().manual_seed(0)
    far = torch.clamp(x + 0.3 * (2 * torch.rand(x.shape, generator=gen) - 1), 0, 1)
    pulled = pull_back(model, x, far, coords=64, rounds=8)
    with torch.no_grad():
        assert torch.equal(model(pulled), model(far))          # the model sees the same input
    ratio = distance(x, pulled, "L2") / distance(x, far, "L2")
    assert float(ratio.max()) < 0.95 and float(ratio.mean()) < 0.9, ratio
    plain = pull_back(inner, x, far, coords=64, rounds=8)      # no interval maps to one output: nothing moves much
    with torch.no_grad():
        assert torch.equal(inner(plain), inner(far))


def test_a_bad_adaptive_mode_is_refused_before_the_store_is_touched(cli, tmp_path):
    from lawbench.attacks.adaptive import MODES
    from lawbench.attacks.registry import option_choices
    assert option_choices("adaptive")["mode"] == MODES
    out = tmp_path / "out"
    r = cli("run", "dataset=digits", "attack.adaptive.mode=sometimes", "--out", str(out))
    assert r.returncode == 2 and "attack.adaptive.mode" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_shrink_brings_pulled_back_examples_into_the_ball_and_keeps_them_misclassified(inner, digits):
    """Linf-shaped examples on a 16-level quantizer, pulled back to their cells' edges, then shrunk to an L2 radius
    below their own: the examples brought in are inside it; none comes back farther, and all stay misclassified."""
    from lawbench.attacks.adaptive import pull_back, shrink
    from lawbench.attacks.pgd import pgd_sweep
    from lawbench.attacks.threat import distance
    _, _, x, y = digits
    model = Front("round", inner).eval()
    ok = ~misclassified(model, x, y)
    x, y = x[ok], y[ok]
    far = pgd_sweep(Through(model), x, y, [0.15], norm="Linf", steps=50, restarts=1, loss="margin", seed=0)
    hit = ~far.robust[0]
    assert int(hit.sum()) >= 10
    x, y = x[hit], y[hit]
    pb = pull_back(model, x, far.x_adv[0][hit], coords=64, rounds=8)
    eps = float(distance(x, pb, "L2").median()) * 0.8
    out = shrink(model, Through(model), x, y, pb, eps)
    d = distance(x, out, "L2")
    assert bool((d <= distance(x, pb, "L2")).all())
    assert int(((d <= eps) & (distance(x, pb, "L2") > eps)).sum()) >= 3   # some were brought in
    assert bool(misclassified(model, out, y).all())                    # and none was given back to its label
