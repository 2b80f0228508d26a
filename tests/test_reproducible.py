"""The same cell on the same machine gives the same row whatever else runs there (issue: the frontier flipped with
float noise when a timing probe chose the thread count): one cell run twice through the CLI, once beside a busy
process, every number compared."""
from __future__ import annotations

import json
import subprocess
import sys

from bench import threads

# A width whose training batch crosses the thread rule's threshold (2 threads where 2 CPUs are free), label noise to
# memorise, and the smooth search, whose accept/refuse steps amplify any difference in the float sums.
CELL = ["n_train=200", "n_test=40", "width=2048", "epochs=20", "label_noise=0.1", "recipe=[erm,smooth]",
        "smooth_epochs=2", "smooth_stages=2", "pgd_steps=10", "eps_Linf=[0.05,0.1]", "aa_eps_Linf=[0.1]",
        "attacks=[pgd]", "lip_points=64", "executor.name=local", "executor.threads=0"]  # the thread rule, in process
TIMES = ("seconds", "timings", "checkpoint_cached")  # what a clock measures, or whether a cache was hit


def _numbers(value):
    """The row without what a clock measures."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if not any(t in k for t in TIMES)}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _rows(cli, out, busy: bool):
    spin = None
    if busy:  # a busy process on one CPU, as a developer's other work or a CI neighbour
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        res = cli("run", *CELL, "--out", str(out), env={"OMP_NUM_THREADS": ""}, timeout=600)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["recipe"]: r for r in rows}


def test_one_cell_twice_beside_different_load_gives_the_same_numbers(cli, tmp_path):
    quiet, busy = _rows(cli, tmp_path / "quiet", False), _rows(cli, tmp_path / "busy", True)
    assert set(quiet) == {"erm", "smooth"}
    for recipe in quiet:
        assert quiet[recipe]["status"] == "ok", quiet[recipe]["error"]
        assert _numbers(quiet[recipe]) == _numbers(busy[recipe]), recipe
    rec = quiet["smooth"]["threads"]
    assert rec["rule"] == ("macs" if threads.available_cpus() > 1 else "budget")
    if threads.available_cpus() > 1:  # the wide model's training batch crosses the threshold, the test batch not
        assert rec["phases"]["train"] == rec["budget"] > 1 and rec["phases"]["attack"] == 1
