"""The thread policy (bench.threads) and the driver's plan (bench.run.Plan), in process."""
from __future__ import annotations

import os

import pytest
import torch

from bench import threads
from bench.run import Plan
from bench.spec import build_spec, cell_id, expand


def test_budget_divides_the_cpus_among_the_cells(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.ThreadBudget.for_cells(8, 2).per_cell == 4
    assert threads.ThreadBudget.for_cells(2, 4).per_cell == 1  # never 0
    assert threads.ThreadBudget.for_cells(8, 2, threads=3).per_cell == 3
    assert "--threads 3" in threads.ThreadBudget.for_cells(8, 2, threads=3).reason()
    assert "8 CPU(s)" in threads.ThreadBudget.for_cells(8, 2).reason()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit cap in the environment is honoured, and said
    budget = threads.ThreadBudget.for_cells(8, 1)
    assert budget.per_cell == 1 and "OMP_NUM_THREADS 1" in budget.reason()
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert threads.ThreadBudget.for_cells(8, 1).per_cell == 8


def test_available_cpus_is_the_affinity_mask():
    assert threads.available_cpus() == len(os.sched_getaffinity(0))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def test_forward_macs_counts_linear_and_conv_layers():
    assert threads.forward_macs(_mlp(), torch.rand(3, 64)) == 3 * (64 * 32 + 32 * 10)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    assert threads.forward_macs(conv, torch.rand(2, 1, 8, 8)) == 2 * (4 * 8 * 8 * 9 + 256 * 10)
    assert threads.forward_macs(torch.nn.Sequential(torch.nn.Flatten()), torch.rand(2, 64)) == 0


def test_chooser_follows_the_rule_never_a_clock(monkeypatch):
    """The count comes from the model's multiply-adds at the phase's batch: the same under any load, and no clock is
    read (a timing probe chose differently beside a busy process, and the float sums changed with it)."""
    import time
    monkeypatch.setattr(time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("timed")))
    model, x = _mlp(), torch.rand(50, 64)
    per_point = 64 * 32 + 32 * 10
    big = -(-threads.PARALLEL_MACS // per_point)  # the smallest batch that reaches the threshold
    before = torch.get_num_threads()
    chooser = threads.ThreadChooser(model, x, threads.ThreadBudget(cpus=2, workers=1), torch.device("cpu"))
    with chooser.phase("train", big):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before  # restored
    assert chooser.threads("autoattack", big - 1) == 1
    assert chooser.threads("train", 1) == 2  # decided once per phase
    rec = chooser.record()
    assert rec["budget"] == 2 and rec["phases"] == {"train": 2, "autoattack": 1}
    assert rec["macs"] == {"train": big * per_point, "autoattack": (big - 1) * per_point}
    assert "multiply-adds" in rec["reason"] and rec["rule"] == "macs"
    assert all(p.grad is None for p in model.parameters()) and model.training  # no gradients, mode restored


@pytest.mark.parametrize("budget", [threads.ThreadBudget(cpus=1), threads.ThreadBudget(cpus=4, threads=3)])
def test_chooser_uses_the_budget_when_there_is_nothing_to_choose(budget):
    chooser = threads.ThreadChooser(_mlp(), torch.rand(8, 64), budget, torch.device("cpu"))
    assert chooser.threads("attack", 10 ** 9) == budget.per_cell
    assert chooser.record()["macs"] == {} and chooser.record()["rule"] == "budget"


def test_plan_holds_a_cell_until_the_weights_it_needs_are_trained():
    cells = expand(build_spec("default", ["width=[8,16]", "seed=[0,1]", "recipe=[erm,smooth]", "threat=[Linf,L2]"]))
    plan = Plan(cells)
    first = plan.ready(set())
    # one cell per checkpoint starts: ERM at each width and seed, once (the L2 twin shares its weights)
    assert len(first) == 4 and {c["recipe"] for c in first} == {"erm"} and {c["threat"] for c in first} == {"Linf"}
    assert plan.ready(set()) == []
    done = {cell_id(c) for c in first}
    second = plan.ready(done)
    assert {(c["recipe"], c["threat"]) for c in second} == {("erm", "L2"), ("smooth", "Linf")}
    third = plan.ready(done | {cell_id(c) for c in second})
    assert {(c["recipe"], c["threat"]) for c in third} == {("smooth", "L2")}
    assert len(first) + len(second) + len(third) == len(cells)
