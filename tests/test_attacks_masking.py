"""Models built to fool evaluations: our pipeline is never weaker than pyautoattack standard run alone.

Each model is a real trained MLP on scikit-learn's 8x8 digits behind a gradient-masking front end:
* input quantization to 8 bits whose rounding edge sits exactly on the eps ball (pixels on the k/255 grid as in
  MNIST, round(x*255)/255, eps = 0.1 = 25.5/255: an example that overshoots the ball by one float32 ulp rounds up,
  its projection rounds down), the mechanism by which a projected Square example stops being adversarial;
* a quantization off that edge (eps = 0.2, no tie), where pyautoattack's examples lie in the ball after projection;
* a non-differentiable step (binarized input: every input gradient is exactly zero).
"""
import copy

import pytest
import torch
from pyautoattack import AutoAttack

from lawbench import attacks
from lawbench.attacks.threat import check_attack, inside, misclassified, project
from conftest import digits_split, train_digits_mlp

TIE_EPS = 0.1


class _Front(torch.nn.Module):
    def __init__(self, kind: str, inner: torch.nn.Module):
        super().__init__()
        self.kind, self.inner = kind, inner

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        if self.kind == "quant":
            x = torch.round(x * 255) / 255
        elif self.kind == "step":  # a non-differentiable step: in the graph, every input gradient is zero
            x = (torch.sign(x - 0.5) + 1) / 2
        else:  # a hard step that cuts the autograd graph
            x = (x > 0.5).to(x.dtype)
        return self.inner(x)


@pytest.fixture(scope="module")
def data():
    """Digits as (N, 1, 8, 8) images: pyautoattack's Square needs image-shaped input."""
    xtr, ytr, x, y = digits_split(1000, slice(1300, 1420))
    x = torch.round(x * 255) / 255  # 8-bit pixels, as MNIST's
    return xtr, ytr, x.reshape(-1, 1, 8, 8), y


def _model(kind, data):
    xtr, ytr, _, _ = data
    front = _Front(kind, torch.nn.Identity())
    inner = train_digits_mlp(0, front(xtr), ytr, width=48, epochs=120)
    return _Front(kind, inner).eval()


def _pyautoattack(model, x, y, eps):
    """pyautoattack standard alone, as a user runs it; robust judged on its raw output (its own verdict)."""
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device=x.device)
    xa, _ = aa.run_standard_evaluation(x, y, batch_size=1000)
    return xa, ~misclassified(model, xa, y)


@pytest.fixture(scope="module")
def quant(data):
    return _model("quant", data)


@pytest.fixture(scope="module")
def step(data):
    return _model("step", data)


def test_quantized_model_at_the_rounding_edge_is_never_overestimated(quant, data):
    _, _, x, y = data
    xa, r_aa = _pyautoattack(quant, x, y, TIE_EPS)
    ev = attacks.robust_eval(quant, x, y, norm="Linf", eps=[TIE_EPS], steps=50, restarts=1)
    ours = ev.robust[TIE_EPS]
    check = ev.info["check"][TIE_EPS]["autoattack"]
    # the mechanism is present: pyautoattack's examples overshoot the ball, and projecting them loses some ...
    assert float((xa - x).abs().max()) > TIE_EPS
    lost = ~r_aa & misclassified(quant, xa, y) & misclassified(quant, project(x, xa, TIE_EPS, "Linf"), y).logical_not()
    assert bool(lost.any())
    # ... which our adapter avoids by running it a hair inside the ball (inner_eps): nothing to re-attack, no
    # second AutoAttack run
    assert check["lost"] == 0 and ev.info["reattacked"][TIE_EPS] == check_pgd_lost(ev)
    # ... yet every point pyautoattack breaks with an example inside the exact ball, we break too
    pyaa_valid = ~r_aa & inside(x, xa, TIE_EPS, "Linf")
    assert not bool((ours & pyaa_valid).any())
    # and our examples are valid: inside the exact ball, misclassified in eval mode
    xb = ev.x_adv[TIE_EPS]
    assert bool(inside(x, xb, TIE_EPS, "Linf").all())
    assert torch.equal(misclassified(quant, xb, y), ~ours)
    # the re-attack recovered most of what projection lost: robust accuracy far below the projected-only count
    projected_only = ~misclassified(quant, project(x, xa, TIE_EPS, "Linf"), y)
    assert int(ours.sum()) < int(projected_only.sum())


def check_pgd_lost(ev):
    return ev.info["check"][TIE_EPS]["pgd"]["lost"]


@pytest.mark.parametrize("kind,eps", [("quant", 0.2), ("step", 0.15)])
def test_masked_models_ours_at_most_pyautoattack(kind, eps, quant, step, data):
    model = quant if kind == "quant" else step
    _, _, x, y = data
    _, r_aa = _pyautoattack(model, x, y, eps)
    ev = attacks.robust_eval(model, x, y, norm="Linf", eps=[eps], steps=50, restarts=1)
    ours = ev.robust[eps]
    assert int(ours.sum()) <= int(r_aa.sum()), (int(ours.sum()), int(r_aa.sum()))
    assert float(ours.float().mean()) < float((misclassified(model, x, y) == 0).float().mean())  # attacks bite
    assert "zero_gradients" in ev.aa_flags
    # the flag triggers pyautoattack's advice: Square twice more, other seeds, on AutoAttack's survivors
    from lawbench.attacks.evaluate import MASKING_SQUARE_RESTARTS
    done = ev.info["autoattack"][eps]["masking_restarts"]
    # (the restarts stop early only when no survivor is left: native's Square, which reaches the image's last row
    # and column, can leave AutoAttack no survivor at all on the quantized model)
    assert done["restarts"] == MASKING_SQUARE_RESTARTS == 2 or int(ours.sum()) == 0, (done, int(ours.sum()))


def test_graph_cutting_step_is_attacked_not_crashed(data):
    """A forward that leaves the autograd graph (gradients do not exist at all): PGD sees zero gradients,
    AutoAttack runs through our adapter, Square breaks points, and the Lipschitz lower bound is computed."""
    from lawbench import certify
    model = _model("cut", data)
    _, _, x, y = data
    ev = attacks.robust_eval(model, x[:40], y[:40], norm="Linf", eps=[0.3], steps=10, restarts=1)
    assert int(ev.robust[0.3].sum()) < int((~misclassified(model, x[:40], y[:40])).sum())
    assert ev.info["autoattack"][0.3]["broken_by"].get("square", 0) > 0
    # the lower bound counts the secants of the attack's pairs even where every gradient is zero: at least the best
    # secant computed here by hand in float64
    xa = ev.x_adv[0.3][:20]
    with torch.no_grad():
        m64 = copy.deepcopy(model).double()
        num = (m64(x[:20].double()) - m64(xa.double())).norm(dim=1)
        den = (x[:20].double() - xa.double()).flatten(1).norm(dim=1)
    secant = float((num / den.clamp_min(1e-300))[den > 0].max())
    assert secant > 0
    assert certify.lipschitz_lower(model, [x[:20]], pairs=[(x[:20], xa)]).value >= secant * (1 - 1e-6)


def test_check_attack_reattacks_lost_points_and_counts_them():
    """An attack whose raw output overshoots the ball: the check projects, sees the loss, re-attacks inside."""
    x = torch.full((4, 3), 0.5)
    y = torch.zeros(4, dtype=torch.long)

    class Edge(torch.nn.Module):  # class 1 beyond the ball of 0.1, or when every coordinate moved down
        def forward(self, z):
            moved = (((z - 0.5).abs() > 0.1).any(1) | ((z - 0.5) < -0.05).all(1)).float()
            return torch.stack([1 - moved, moved], 1)

    model = Edge()
    raw = x + 0.1000001  # just outside the ball of 0.1: adversarial as returned, not after projection
    calls = []

    def rerun(idx, e, k):
        calls.append((idx.tolist(), e, k))
        return x[idx] - e  # inside the ball, adversarial another way

    ck = check_attack(model, x, y, raw, 0.1, "Linf", rerun=rerun)
    assert bool(ck.broken.all()) and bool(inside(x, ck.x_adv, 0.1, "Linf").all())
    assert ck.info["lost"] == 4 and ck.info["recovered"] == 4 and ck.info["unresolved"] == 0
    assert len(calls) == 1 and calls[0][1] < 0.1
    # without a way to re-attack, the lost points are robust and counted as unresolved: never silently
    ck = check_attack(model, x, y, raw, 0.1, "Linf", rerun=None)
    assert not bool(ck.broken.any()) and ck.info["unresolved"] == 4


def test_every_registry_attack_output_is_checked(data):
    """torchattacks adapters go through the same check: examples inside the exact ball, verdict in eval mode."""
    xtr, ytr, x, y = data
    model = torch.nn.Sequential(torch.nn.Flatten(), train_digits_mlp(1, xtr, ytr, width=32, epochs=60))
    for name in ("ta-pgd", "ta-fgsm", "pgd"):
        out = attacks.get_attack(name).run(model, x[:40], y[:40], 0.1, norm="Linf")
        assert bool(inside(x[:40], out.x_adv, 0.1, "Linf").all()), name
        assert torch.equal(misclassified(model, out.x_adv, y[:40]), ~out.robust), name
