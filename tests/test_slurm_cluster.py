"""The slurm executor through a real SLURM cluster (one node on 127.0.0.1, started for the session: tests/clusters.py):
sbatch job arrays with the numbers of the local executor, the spec's options in the jobs SLURM holds, a cancelled job
submitted again then recorded failed, and a driver killed mid-sweep resuming from OUT/cells/ without loss or
duplicates. The cluster has no accounting database (sacct refuses), as many small clusters."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import NEUTRAL_CWD, SUBPROCESS_ENV, TINY, bench_cli, wait_for_first_row
from test_executors import QUICK, local_numbers, numbers, rows  # noqa: F401 - local_numbers: a fixture

SLURM = ["executor.name=slurm", "executor.poll_seconds=0.5"]

SLEEPS = """
import time
import torch
from lawbench.models import register_model


class Sleeps(torch.nn.Sequential):
    \"\"\"Trains for ever: its job is there to be cancelled (the driver only builds it, to count its parameters).\"\"\"
    def forward(self, x):
        time.sleep(3600)


@register_model("sleeps", family="test")
def sleeps(in_shape, num_classes, width=8):
    return Sleeps(torch.nn.Flatten(), torch.nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], width),
                  torch.nn.ReLU(), torch.nn.Linear(width, num_classes))
"""


def _jobs(out) -> list[str]:
    """The array tasks the sweep submitted ("123_0"): submitit's folders under OUT/slurm/."""
    return sorted(p.name for p in (out / "slurm").iterdir() if p.is_dir() and "_" in p.name)


def test_a_sweep_runs_as_a_job_array_through_sbatch_with_local_numbers(slurm_cluster, local_numbers, tmp_path):
    out = tmp_path / "out"
    res = bench_cli("run", *TINY, *SLURM, "executor.partition=debug", "executor.time_min=7",
                    "executor.array_parallelism=1", "--threads", "1", "--out", str(out), env=slurm_cluster.env,
                    timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert numbers(out) == local_numbers
    tasks = _jobs(out)
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1, tasks  # one array of the two cells
    job = slurm_cluster.job(tasks[0])
    assert job["JobName"] == "lawbench" and job["JobState"] == "COMPLETED"
    assert job["Partition"] == "debug" and job["TimeLimit"] == "00:07:00" and job["ArrayTaskThrottle"] == "1"
    assert job["NumCPUs"] == "1"


def _running(cluster, out, skip: set[str], timeout: float = 120) -> str:
    """The id of a RUNNING job of the sweep writing ``out`` (its submitit folder under OUT/slurm/) not in ``skip``
    (waits for one). A finished job of an earlier sweep may still be RUNNING for a moment after its result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ours = {p.name for p in (out / "slurm").iterdir()} if (out / "slurm").is_dir() else set()
        for line in cluster.run("squeue", "-r", "-h", "-o", "%i %T").stdout.splitlines():
            job, state = line.split()[:2]
            if state == "RUNNING" and job in ours and job not in skip:
                return job
        time.sleep(0.3)
    raise AssertionError(f"no job of the sweep started running: {cluster.logs()}")


def test_a_cancelled_job_is_submitted_again_then_recorded_failed(slurm_cluster, tmp_path):
    """scancel of the cell's job: submitted again once (max_retries=1); cancelled again, the cell is a failed row
    naming SLURM's state. sacct cannot say a cancelled job ended here: the executor reads the queue."""
    plugin = tmp_path / "sleeps.py"
    plugin.write_text(SLEEPS)
    out = tmp_path / "out"
    env = {**os.environ, **SUBPROCESS_ENV, **slurm_cluster.env}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", *TINY, *QUICK, "width=[8]", "model=sleeps",
                             *SLURM, "executor.max_retries=1", "--plugin", str(plugin), "--threads", "1",
                             "--out", str(out)], cwd=NEUTRAL_CWD, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        cancelled = set()
        for _ in range(2):
            job = _running(slurm_cluster, out, cancelled)
            assert slurm_cluster.run("scancel", job).returncode == 0
            cancelled.add(job)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        slurm_cluster.run("scancel", "--name", "lawbench")
    assert proc.returncode == 1, stderr[-2000:]
    (row,) = rows(out)
    assert row["status"] == "failed" and "CANCELLED" in row["error"] and row["error"].startswith("JobFailed"), row
    log = (out / "logs" / f"{row['cell_id']}.log").read_text()
    assert log.count("in state CANCELLED without a row; submitting it again") == 1, log
    assert "accounting storage is disabled" not in stderr and "sacct" not in stderr  # the queue, not sacct


def test_a_killed_driver_resumes_from_the_cells_folder(slurm_cluster, tmp_path):
    """SIGKILL to the driver mid-sweep: its jobs run on under SLURM and leave their cells' files; the driver run
    again merges them and runs only what is missing: every cell once, the rows already written unchanged."""
    out = tmp_path / "out"
    sweep = ["run", *TINY, *QUICK, "width=[8]", "seed=[0,1,2,3]", *SLURM, "executor.array_parallelism=2",
             "--threads", "1", "--out", str(out)]
    env = {**os.environ, **SUBPROCESS_ENV, **slurm_cluster.env}
    proc = subprocess.Popen([sys.executable, "-m", "bench", *sweep], cwd=NEUTRAL_CWD, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_first_row(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = rows(out)
    assert 1 <= len(before) < 4
    res = bench_cli(*sweep, env=slurm_cluster.env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    after = rows(out)
    ids = [r["cell_id"] for r in after]
    assert len(ids) == len(set(ids)) == 4 and after[:len(before)] == before
    assert all(r["status"] == "ok" for r in after)
    # the jobs of the killed driver ran on: their rows were merged from OUT/cells/ before the plan was made
    already = int(res.stdout.split(" already in")[0].split()[-1])
    assert len(before) <= already <= 4
