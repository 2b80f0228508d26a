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


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    import os
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not __import__("os").path.isdir("/proc"), reason="reads processes from /proc")
def test_pool_workers_die_with_their_driver(tmp_path):
    """Case 3: ``kill -9`` of the pool's driver left both workers and multiprocessing's resource tracker running,
    holding the driver's output pipes (a caller reading them hung). Now the driver's pipes close and no process it
    started outlives it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import NEUTRAL_CWD, SUBPROCESS_ENV
    cmd = [sys.executable, "-m", "bench", "run", *CELL[:-1], "width=[8,16,32,64]", "--executor", "pool",
           "--workers", "2", "--out", str(tmp_path / "out")]
    drv = subprocess.Popen(cmd, cwd=NEUTRAL_CWD, env={**os.environ, **SUBPROCESS_ENV}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    kids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(kids) < 3:  # two workers and the resource tracker
            kids = _children(drv.pid)
            time.sleep(0.2)
        assert len(kids) >= 3, f"the pool never started its workers: {kids}"
        time.sleep(2)  # the workers are inside their cells
        drv.send_signal(signal.SIGKILL)
        drv.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in kids):
            time.sleep(0.2)
        assert not [p for p in kids if _alive(p)], "processes of the pool outlived their driver"
        drv.stdout.read()  # EOF: no orphan holds the pipe
    finally:
        for p in kids | _children(drv.pid) | {drv.pid}:  # orphans are no longer the driver's children
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
