"""Hostile plugins and faults through the CLI: what a plugin attack says of itself is never evidence; a fault keeps
the store whole and names its cause in one line."""
from __future__ import annotations

import textwrap
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------ the store

def _store_with(tmp_path, *lines: str):
    from test_bad_input import valid_row
    import json
    out = tmp_path / "store"
    out.mkdir()
    good = json.dumps(valid_row())
    (out / "results.jsonl").write_text("".join(f"{line}\n" for line in (good, *lines)))
    return out, (out / "results.jsonl").read_bytes()


def _one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize("bad, why", [
    ('{"cell_id": ["a", "b"], "status": "ok"}', "cell_id is list"),       # case 4: unhashable
    ('{"cell_id": {"a": 1}, "status": "ok"}', "cell_id is dict"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper"),                    # case 5: RecursionError
    ('{"cell_id": "x", "status": "ok", "a": ' + "[" * 40 + "]" * 40 + "}", "nested deeper"),
])
def test_untrusted_store_lines_are_refused_by_run_and_skipped_by_report(tmp_path, bad, why):
    """Cases 4 and 5: a stored row with an unhashable cell_id crashed `bench run` with a traceback; a deeply nested
    line crashed run and report (RecursionError, the whole report lost). Now run refuses the store in one line naming
    file and line (the store untouched) and report skips the line, says which and why, and writes the report."""
    out, before = _store_with(tmp_path, bad)
    res = bench_cli("run", *CELL, "--out", str(out))
    line = _one_error_line(res)
    assert f"{out / 'results.jsonl'}:2" in line and why in line
    assert (out / "results.jsonl").read_bytes() == before
    res = bench_cli("report", "--out", str(out))
    assert res.returncode == 0, res.stderr
    (warning,) = res.stderr.strip().splitlines()
    assert warning.startswith(f"warning: {out / 'results.jsonl'}: skipped 1 ") and "line 2" in warning
    assert (out / "report" / "leaderboard.md").is_file()


def test_report_counts_each_cell_once_and_refuses_zero_params(tmp_path):
    """Case 9: a row written twice was counted twice (CSV rows, means over seeds), and `params: 0` was accepted.
    Now one row per cell_id (its last ok row) and a row with params 0 is skipped as breaking the row schema."""
    import csv
    import json
    from test_bad_input import valid_row
    twice = json.dumps(valid_row())
    other = json.dumps({**valid_row(), "cell_id": "fedcba9876543210", "seed": 1, "clean_acc": 0.6})
    failed_then_ok = json.dumps({**valid_row(), "cell_id": "1111111111111111", "seed": 2, "status": "failed"})
    zero = json.dumps({**valid_row(), "cell_id": "2222222222222222", "seed": 3, "params": 0})
    out, _ = _store_with(tmp_path, twice, other, failed_then_ok, failed_then_ok.replace('"failed"', '"ok"'), zero)
    res = bench_cli("report", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "params is 0, expected an integer >= 1" in res.stderr and "2 rows of a cell another row replaces" in \
        res.stderr
    with open(out / "report" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["cell_id"] for r in rows) == ["0123456789abcdef", "1111111111111111", "fedcba9876543210"]
    assert {r["cell_id"]: r["status"] for r in rows}["1111111111111111"] == "ok"


def test_report_skips_numbers_past_every_float(tmp_path):
    """An integer past every float (JSON allows 10**400) in a number field crashed `bench report` with an
    OverflowError while judging the row; now the row is skipped with its reason, and where the schema allows any
    integer (a width) the report reads it as no number."""
    import json
    from test_bad_input import valid_row
    huge = 10 ** 400
    bad = json.dumps({**valid_row(), "cell_id": "3333333333333333", "seed": 4, "lip_upper": huge})
    wide = json.dumps({**valid_row(), "cell_id": "4444444444444444", "seed": 5, "width": huge})
    out, _ = _store_with(tmp_path, bad, wide)
    res = bench_cli("report", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "lip_upper is 1000000000" in res.stderr and "expected a finite number" in res.stderr
    assert "4444444444444444" in (out / "report" / "results.csv").read_text()


# ------------------------------------------------------------------------------------------------ the cells

MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    from lawbench.models import register_model

    class Float32(nn.Module):
        """Casts its input to float32: runs on float32 inputs, not on a float64 copy of the model."""
        def forward(self, x):
            return x.float()

    @register_model("cast-mlp", family="hostile", default_widths=(16,), datasets=("mnist5k",))
    def cast_mlp(in_shape, num_classes, width, **kw):
        return nn.Sequential(Float32(), nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, num_classes))
''')


def test_a_phase_that_cannot_run_keeps_the_row(tmp_path):
    """Case 11: a model that casts to float32 inside forward attacked fine, then the Lipschitz lower bound (a
    float64 copy of the model) failed with "mat1 and mat2 must have the same dtype" and the whole cell was lost. Now
    the row is ok with its attacks, lip_lower null, the phase and the cause in phase_errors, a phase-failed flag."""
    res, out = _run(tmp_path, MODELS, "model=cast-mlp", "attacks=[pgd]")
    assert res.returncode == 0, res.stderr
    (row,) = read_rows(out / "results.jsonl")
    assert row["status"] == "ok" and row["lip_lower"] is None and "phase-failed" in row["flags"]
    assert row["robust_acc"]["0.1"] is not None and row["clean_acc"] > 0.3
    assert "Lipschitz lower bound could not run" in row["phase_errors"]["lip_lower"]
    assert "dtype" in row["phase_errors"]["lip_lower"]


def _entry(tmp_path, scale: float | None) -> Path:
    """An external checkpoint entry of a width-8 MLP with every weight scaled (None: its first weight NaN)."""
    import torch
    from lawbench import models
    torch.manual_seed(0)
    model = models.get_model("mlp", in_shape=(1, 28, 28), num_classes=10, width=8)
    sd = model.state_dict()
    key = next(iter(sd))
    if scale is None:
        sd[key] = torch.full_like(sd[key], float("nan"))
    else:
        sd = {k: v * scale for k, v in sd.items()}
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    (tmp_path / "e.toml").write_text('name = "ext"\nmodel = "mlp"\nwidth = 8\ndataset = "mnist5k"\n'
                                     'checkpoint = "w.pt"\n')
    return tmp_path / "e.toml"


@pytest.mark.parametrize("scale, why", [(None, "non-finite value"), (1e30, "logits are not finite")])
def test_non_finite_weights_fail_the_cell_with_a_reason(tmp_path, scale, why):
    """Case 7: NaN, infinite or huge weights failed deep inside (`linalg.eigh ... failed to converge`). Now the row
    says why before any phase runs."""
    res = bench_cli("run", *CELL, "--entry", str(_entry(tmp_path, scale)), "--out", str(tmp_path / "out"))
    (row,) = read_rows(tmp_path / "out" / "results.jsonl")
    assert row["status"] == "failed" and row["error"].startswith("ModelError: ") and why in row["error"], row["error"]
    assert "linalg" not in row["error"]


def test_a_damaged_cached_checkpoint_is_moved_aside_and_retrained(tmp_path):
    """Case 6: a damaged cached checkpoint or sidecar failed its cells on every re-run (JSONDecodeError,
    KeyError: 'epochs_run'). Now both files are moved aside (kept), the model trained again, and a log line names
    the file."""
    out = tmp_path / "out"
    res = bench_cli("run", *CELL, "attacks=[pgd]", "--out", str(out))
    assert res.returncode == 0, res.stderr
    (side,) = (out / "checkpoints").glob("*.json")
    side.write_text('{"train_key": "x"')  # cut short
    res = bench_cli("run", *CELL, "attacks=[pgd]", "pgd_steps=7", "--out", str(out))  # same training, a new cell
    assert res.returncode == 0, res.stderr
    rows = read_rows(out / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[1]["checkpoint_cached"] is False
    assert (out / "checkpoints" / f"{side.name}.damaged-1").is_file()
    assert (out / "checkpoints" / f"{side.stem}.pt.damaged-1").is_file() and side.is_file()
    log = (out / "logs" / f"{rows[1]['cell_id']}.log").read_text()
    assert f"cached checkpoint {out / 'checkpoints' / side.stem}.pt does not load" in log


# ------------------------------------------------------------------------------------------------ the command line

def test_the_command_line_speaks_in_one_line(tmp_path):
    """Cases 10 and 12: width=[1e12] passed validation and failed in the cell; a bad flag printed argparse's usage
    block; a key=value after an option was an unrecognized argument; a 100 kB bad value was echoed whole."""
    out = str(tmp_path / "out")
    line = _one_error_line(bench_cli("run", "width=[1000000000000]", "--out", out))
    assert "key 'width'" in line and "1,048,576" in line
    line = _one_error_line(bench_cli("run", "--bogus", "--out", out))
    assert "unrecognized arguments: --bogus" in line
    line = _one_error_line(bench_cli("run", "width=" + "9" * 100_000, "--out", out))
    assert "key 'width'" in line and len(line) < 1000
    import argparse
    import pickle
    pickle.dump({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, open(tmp_path / "w.pt", "wb"), protocol=4)
    (tmp_path / "e.toml").write_text('name = "ext"\nmodel = "mlp"\nwidth = 8\ndataset = "mnist5k"\n'
                                     'checkpoint = "w.pt"\n')
    line = _one_error_line(bench_cli("run", "--entry", str(tmp_path / "e.toml"), "--out", out))  # no torch warning
    assert "w.pt" in line
    res = bench_cli("run", "--dry-run", "--out", out, "width=8", "epochs=3")
    assert res.returncode == 0 and " w=8 " in res.stdout, res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="mounts a small tmpfs (root)")
def test_a_full_disk_leaves_no_partial_line(tmp_path):
    """Case 8: a full disk left a partial last line in results.jsonl (until the next run cut it) and the message
    named no file. The results file here lives on a full disk of its own (a link from the results directory): the
    row's write fails whole, the store holds exactly the rows before it, and one line names the results file."""
    import json
    import subprocess
    from test_bad_input import valid_row
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        (disk / "results.jsonl").write_text(json.dumps(valid_row()) + "\n")
        before = (disk / "results.jsonl").read_bytes()
        with open(disk / "filler", "wb", buffering=0) as fh:  # the disk full but for a few bytes
            try:
                while True:
                    fh.write(b"\0" * 512)
            except OSError:
                pass
        out = tmp_path / "out"
        out.mkdir()
        (out / "results.jsonl").symlink_to(disk / "results.jsonl")
        res = bench_cli("run", *CELL, "attacks=[pgd]", "--out", str(out))
        line = _one_error_line(res)
        assert f"{out / 'results.jsonl'}: cannot write a row (No space left on device)" in line
        assert (disk / "results.jsonl").read_bytes() == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
