"""The smooth search (bench.smooth), in process on the law's own data (Gaussian inputs, 20% flipped teacher labels):
every attempt recorded, the annealing's break and bisection, the best stage restored, the winner the lowest
certified bound at margin 1 of every attempt and never above ERM's interpolator, restarts that matter."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from bench import smooth
from bench.train import TrainConfig, train
from lawbench import certify, datasets

CFG = TrainConfig(epochs=1500, lr=3e-3, batch_size=100, smooth_epochs=10, smooth_stages=12, smooth_lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def searched():
    """ERM's interpolator of 200 noisy Gaussian points (d=16, width 256), and the search from it."""
    data = datasets.load_dataset("gauss", n_train=200, n_test=20, label_noise=0.2, seed=0, d=16, num_classes=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    assert train(model, data.x_train, data.y_train, CFG).train_acc == 1.0
    erm = copy.deepcopy(model)
    # the attempts in reverse order, so the winner is not the last attempt run and must be restored at the end
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smooth, "starts", lambda cfg, plan=smooth.starts: plan(cfg)[::-1])
        found = smooth.search(model, data.x_train, data.y_train, CFG)
    return data, erm, model, found


def _bound_at_margin_one(model, data) -> float:
    margin = float(smooth.train_margins(model, data.x_train, data.y_train).min())
    assert margin > 0
    return certify.lipschitz_upper(model, (16,), pairs=False).value / margin


def test_every_attempt_is_recorded(searched):
    """1 + smooth_restarts attempts from ERM, each half a growth step lower, then one from scratch; the retry only
    when none beat ERM."""
    _, _, _, found = searched
    planned = smooth.starts(CFG)
    assert [(s.method, s.penalty) for s in planned] == [
        ("erm", 1e-3), ("erm", pytest.approx(1e-3 / 2)), ("erm", pytest.approx(1e-3 / 4)), ("scratch", 1e-3)]
    head = found.attempts[:len(planned)][::-1]  # run in reverse order (see the fixture)
    assert [(a["method"], a["first_penalty"]) for a in head] == [(s.method, s.penalty) for s in planned]
    assert len(found.attempts) == len(planned) + (found.winner is None)
    assert {t["attempt"] for t in found.trace[1:]} == set(range(len(found.attempts)))
    assert sum(a["won"] for a in found.attempts) == (found.winner is not None)


def test_winner_is_the_lowest_bound_and_below_erm(searched):
    """The row's model is the winning attempt's, at margin 1: its certified bound there is the lowest any attempt
    found, below ERM's interpolator's, and the restarts found it (the first attempt alone ends higher)."""
    data, erm, model, found = searched
    bounds = [a["bound_unit_margin"] for a in found.attempts if a["bound_unit_margin"] is not None]
    assert found.winner is not None and not found.no_gain
    won = found.attempts[found.winner]
    assert won["bound_unit_margin"] == min(bounds) < found.erm_bound
    assert found.erm_bound == pytest.approx(_bound_at_margin_one(erm, data), rel=1e-9)
    assert _bound_at_margin_one(model, data) == pytest.approx(won["bound_unit_margin"], rel=1e-4)  # restored
    assert float(smooth.train_margins(model, data.x_train, data.y_train).min()) == pytest.approx(1.0, rel=1e-3)
    assert found.penalty == won["penalty"] > 0
    first = next(a for a in found.attempts if a["method"] == "erm" and a["first_penalty"] == CFG.smooth_lambda)
    assert first["bound_unit_margin"] is None or won["bound_unit_margin"] < first["bound_unit_margin"]  # restarts
    assert found.winner != len(found.attempts) - 1  # (so the restore above is a real one)


def test_annealing_breaks_at_the_first_refusal_then_bisects(searched):
    """Within an attempt penalties grow by smooth_growth while the fit holds; the first refused penalty ends the
    growth and smooth_refine bisection steps follow, each the geometric mean of the last kept and refused values."""
    _, _, _, found = searched
    refusals = 0
    for i, a in enumerate(found.attempts):
        stages = [t for t in found.trace if t["attempt"] == i][1:]  # after the attempt's start
        growth = [t for t in stages if not t["refine"]]
        refine = [t for t in stages if t["refine"]]
        lams = [t["lambda"] for t in growth]
        assert lams == [pytest.approx(a["first_penalty"] * CFG.smooth_growth ** k) for k in range(len(lams))]
        refused = [k for k, t in enumerate(growth) if not t["accepted"]]
        assert refused in ([], [len(growth) - 1])  # growth stops at its first refusal
        if not refused:
            assert len(growth) == CFG.smooth_stages and not refine
            continue
        refusals += 1
        assert len(refine) == CFG.smooth_refine
        good = growth[-2]["lambda"] if len(growth) > 1 else 0.0
        bad = growth[-1]["lambda"]
        mid = math.sqrt(good * bad) if good > 0 else bad / CFG.smooth_growth
        assert refine[0]["lambda"] == pytest.approx(mid)
    assert refusals > 0  # the setting reaches the fit's edge, so the break and the bisection are exercised


def test_each_attempt_keeps_its_best_accepted_stage(searched):
    """An attempt's penalty is its accepted stage with the smallest product of norms per unit margin, and the row's
    model is the winning attempt's kept stage."""
    data, _, model, found = searched
    for i, a in enumerate(found.attempts):
        accepted = [t for t in found.trace if t["attempt"] == i and t["accepted"] and t["lambda"] > 0]
        if not accepted:
            assert a["penalty"] is None
            continue
        best = min(accepted, key=lambda t: t["lip_product"] / t["min_margin"])
        assert a["penalty"] == best["lambda"]
    won = [t for t in found.trace if t["attempt"] == found.winner and t["lambda"] == found.penalty and t["accepted"]]
    norms = smooth.OperatorNorms(model, data.x_train, 0)  # the row's model is that stage's weights, scaled
    margin = float(smooth.train_margins(model, data.x_train, data.y_train).min())
    assert norms.product() / margin == pytest.approx(won[0]["lip_product"] / won[0]["min_margin"], rel=1e-3)


def test_no_gain_keeps_erm_and_says_so():
    """A search none of whose attempts keeps the fit (a first penalty far too large) retries once, then keeps ERM's
    interpolator at margin 1 and reports no gain."""
    data = datasets.load_dataset("gauss", n_train=60, n_test=10, label_noise=0.2, seed=0, d=16, num_classes=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))
    cfg = TrainConfig(epochs=1500, lr=3e-3, batch_size=60, smooth_epochs=2, smooth_stages=2, smooth_lambda=1e4,
                      smooth_restarts=1, smooth_scratch=0, smooth_refine=0, seed=0)
    assert train(model, data.x_train, data.y_train, cfg).train_acc == 1.0
    erm_bound = _bound_at_margin_one(model, data)
    found = smooth.search(model, data.x_train, data.y_train, cfg)
    assert found.no_gain and found.winner is None and found.penalty == 0.0
    assert [a["retry"] for a in found.attempts] == [False, False, True]
    assert _bound_at_margin_one(model, data) == pytest.approx(erm_bound, rel=1e-4)  # float32 output scaling
