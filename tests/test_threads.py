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


def test_chooser_times_each_phase_once_and_records_it():
    model, x = _mlp(), torch.rand(50, 64)
    before = torch.get_num_threads()
    chooser = threads.ThreadChooser(model, x, threads.ThreadBudget(cpus=2, workers=1), torch.device("cpu"))
    with chooser.phase("train", 16):
        assert torch.get_num_threads() in (1, 2)
    assert torch.get_num_threads() == before  # restored
    chooser.threads("autoattack", 3)
    assert chooser.threads("train", 999) == chooser.phases["train"]  # measured once per phase
    rec = chooser.record()
    assert rec["budget"] == 2 and set(rec["phases"]) == {"train", "autoattack"}
    for phase, probe in rec["probe_ms"].items():
        assert probe["batch"] == {"train": 16, "autoattack": 3}[phase]
        assert probe["1"] > 0 and probe["2"] > 0
        clearly = probe["2"] * threads.SPEEDUP_NEEDED <= probe["1"]  # 2 threads only when clearly faster
        assert rec["phases"][phase] == (2 if clearly else 1)
    assert "1.25x faster than 1 thread" in rec["reason"]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


@pytest.mark.parametrize("budget", [threads.ThreadBudget(cpus=1), threads.ThreadBudget(cpus=4, threads=3)])
def test_chooser_does_not_time_when_there_is_nothing_to_choose(budget):
    chooser = threads.ThreadChooser(_mlp(), torch.rand(8, 64), budget, torch.device("cpu"))
    assert chooser.threads("attack", 8) == budget.per_cell
    assert chooser.record()["probe_ms"] == {}


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
