"""Hostile plugins and faults through the CLI: what a plugin attack says of itself is never evidence; a fault keeps
the store whole and names its cause in one line."""
from __future__ import annotations

import textwrap

import pytest

from conftest import bench_cli
from lawbench.reports.rows import read_rows

ATTACKS = textwrap.dedent('''
    import torch
    from lawbench.attacks import register_attack
    from lawbench.attacks.registry import AttackOutput

    @register_attack("nan-attack", kind="plugin", description="examples of NaN, every point claimed broken")
    def nan_attack(model, x, y, eps, *, norm, seed, log=None):
        return AttackOutput(torch.zeros(len(x), dtype=torch.bool), torch.full_like(x, float("nan")), {})

    @register_attack("says-checked", kind="plugin", description="clean inputs and a check record of its own")
    def says_checked(model, x, y, eps, *, norm, seed, log=None):
        return AttackOutput(torch.zeros(len(x), dtype=torch.bool), x.clone(), {"check": {"reattacked": "many"}})
''')

CELL = ["n_train=200", "n_test=40", "width=16", "epochs=15", "eps_Linf=[0.05,0.1]", "aa_eps_Linf=[0.1]",
        "lip_points=16", "recipe=erm", "label_noise=0", "executor.name=local"]


def _run(tmp_path, plugin: str, *extra: str):
    (tmp_path / "hostile_plugin.py").write_text(plugin)
    out = tmp_path / "out"
    res = bench_cli("run", *CELL, *extra, "--plugin", "hostile_plugin", "--out", str(out),
                    env={"PYTHONPATH": str(tmp_path)})
    return res, out


@pytest.mark.parametrize("attack", ["nan-attack", "says-checked"])
def test_an_attack_breaks_only_the_points_its_examples_break(tmp_path, attack):
    """Case 1: NaN examples (argmax of NaN logits is class 0) broke every point not labelled 0; case 2: an attack
    whose info carried a ``check`` key skipped validation and its clean inputs counted as examples (robust 0.0,
    marked verified). Both now judged from the examples: nothing broken, robust = clean, not verified."""
    res, out = _run(tmp_path, ATTACKS, f"attacks=[{attack}]")
    assert res.returncode == 0, res.stderr
    (row,) = read_rows(out / "results.jsonl")
    assert row["status"] == "ok" and row["clean_acc"] > 0.3
    assert row["robust_acc"] == {"0.05": row["clean_acc"], "0.1": row["clean_acc"]}
    assert row["verified"] == {"0.05": False, "0.1": False}
