"""The executor seam through the CLI: pool and slurm (submitit's local executor) produce the same cell_ids and, on CPU
at one thread, the same numbers as local; a pool worker that dies is retried, then failed. The same checks for ray, a
killed ray driver resuming without loss or duplicates among them, run on a real two-node Ray cluster
(tests/test_ray_cluster.py); slurm through sbatch on a real SLURM cluster (tests/test_slurm_cluster.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import NEUTRAL_CWD, SUBPROCESS_ENV, TINY, bench_cli

# the measured numbers of a row: every executor must reproduce local's exactly (same seed, one thread, CPU)
NUMBERS = ("params", "train_acc", "clean_acc", "pgd_acc", "autoattack_acc", "robust_acc", "cert_acc", "lip_upper",
           "lip_lower", "train_margin")
EXECUTORS = {"pool": ["executor.name=pool", "executor.workers=2"],  # overrides: before the --flags
             "ray": ["executor.name=ray"],
             "slurm": ["executor.name=slurm", "executor.cluster=local", "executor.poll_seconds=0.2"]}


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def numbers(out) -> dict:
    return {r["cell_id"]: {k: r[k] for k in NUMBERS} for r in rows(out)}


@pytest.fixture(scope="module")
def local_numbers(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    res = bench_cli("run", *TINY, "--threads", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return numbers(out)


@pytest.mark.parametrize("name", ["pool", "slurm"])  # ray: tests/test_ray_cluster.py, on a two-node cluster
def test_executor_matches_local(name, local_numbers, tmp_path):
    out = tmp_path / "out"
    res = bench_cli("run", *TINY, *EXECUTORS[name], "--threads", "1", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"{name}:" in res.stdout  # the executor says what it runs and with how many threads
    got = numbers(out)
    assert set(got) == set(local_numbers)
    assert got == local_numbers
    for row in rows(out):
        assert row["threads"]["budget"] == 1 and set(row["threads"]["phases"].values()) == {1}
        assert (out / "logs" / f"{row['cell_id']}.log").read_text().startswith("pgd:")
    assert not list((out / "cells").glob("*.json")) if (out / "cells").exists() else True


DIES = """
import os
import torch
from lawbench.models import register_model

MARK = {mark!r}


class Dies(torch.nn.Sequential):
    \"\"\"Width 8 dies once (the first worker to run it), width 9 every time, like a killed process (the driver only
    builds the model, to count its parameters).\"\"\"
    def forward(self, x):
        mark = MARK + str(self[1].out_features)
        if self[1].out_features == 9 or not os.path.exists(mark):
            open(mark, "a").close()
            os._exit(9)
        return super().forward(x)


@register_model("dies", family="test")
def dies(in_shape, num_classes, width=8):
    d = 1
    for s in in_shape:
        d *= s
    return Dies(torch.nn.Flatten(), torch.nn.Linear(d, width), torch.nn.ReLU(), torch.nn.Linear(width, num_classes))
"""

# cells whose numbers no test reads: a worker's death and a driver's kill are about rows, not measurements
QUICK = ["epochs=3", "pgd_steps=3", "autoattack=off", "attacks=[pgd]", "lip_points=16"]


def dead_worker_is_retried_then_failed(name: str, flags: list[str], tmp_path) -> None:
    """One retry: the cell whose worker dies once ends ok, the one whose worker always dies ends failed."""
    plugin = tmp_path / "dies.py"
    plugin.write_text(DIES.format(mark=str(tmp_path / "died")))
    out = tmp_path / "out"
    res = bench_cli("run", *TINY, *QUICK, "width=[8,9]", "model=dies", *flags, "executor.max_retries=1",
                    "--plugin", str(plugin), "--threads", "1", "--out", str(out), timeout=600)
    assert res.returncode == 1, res.stderr[-2000:]
    by_width = {row["width"]: row for row in rows(out)}
    assert by_width[8]["status"] == "ok", by_width[8].get("error")
    assert by_width[9]["status"] == "failed" and by_width[9]["error"]
    assert ("WorkerDied" if name == "pool" else "Error") in by_width[9]["error"]
    assert (tmp_path / "died8").exists()


def test_dead_pool_worker_is_retried_then_failed(tmp_path):
    dead_worker_is_retried_then_failed("pool", EXECUTORS["pool"], tmp_path)  # ray: tests/test_ray_cluster.py


def driver_killed_resumes_without_loss_or_duplicates(flags: list[str], tmp_path) -> None:
    """SIGKILL to the driver mid-sweep: the rows already appended stay whole; the re-run runs only what is missing."""
    out = tmp_path / "out"
    # 12 tiny cells: once two rows are in, enough remain that the kill lands mid-sweep (with 6, a fast machine's
    # workers could finish the rest between two polls)
    sweep = [*TINY, *QUICK, "seed=[0,1,2,3,4,5]", *flags, "--threads", "1", "--out", str(out)]
    env = {**os.environ, **SUBPROCESS_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", *sweep], cwd=NEUTRAL_CWD, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and len(results.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:  # the Ray processes the killed driver started
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = rows(out)
    assert 2 <= len(before) < 12
    res = bench_cli(*["run", *sweep], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    after = rows(out)  # every line parses
    ids = [r["cell_id"] for r in after]
    assert len(ids) == len(set(ids)) == 12
    assert after[:len(before)] == before
    assert f"{len(before)} already in" in res.stdout


def test_pool_hands_out_the_widest_cell_first(tmp_path):
    """A free pool worker takes the widest pending cell (ties in submission order): the sweep's longest chain, the
    widest ERM cell and then its smooth cell, starts at once instead of last."""
    from collections import deque
    from bench.executors.pool import PoolExecutor
    from bench.runner import CellTask
    pool = PoolExecutor({"workers": 2}, lambda event: None, tmp_path)
    pool.pending = deque(CellTask({"width": w, "tag": i}, str(tmp_path)) for i, w in enumerate([40, 1280, 160, 1280]))
    order = [pool._next().cell["tag"] for _ in range(4)]
    assert order == [1, 3, 2, 0] and not pool.pending
