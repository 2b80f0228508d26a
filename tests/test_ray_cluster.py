"""The ray executor on a real two-node Ray cluster (a head and a worker node, one CPU each, on a loopback host name;
started for the session: tests/clusters.py), the driver joining by address as on a cluster: the numbers of the
local executor, cells on both nodes, and a worker node killed mid-sweep losing no row."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import NEUTRAL_CWD, SUBPROCESS_ENV, TINY, bench_cli, wait_for_first_row
from test_executors import (QUICK, dead_worker_is_retried_then_failed, driver_killed_resumes_without_loss_or_duplicates,
                            local_numbers, numbers, rows)  # noqa: F401 - local_numbers: a fixture


def _nodes(out) -> list[str]:
    """The Ray node of each run of a cell, from the cells' logs (a cell run again after its node died has two)."""
    return [m for log in (out / "logs").glob("*.log")
            for m in re.findall(r"ran on ray node ([0-9a-f]+)", log.read_text())]


def _last_nodes(out) -> list[str]:
    """The Ray node of each cell's last run (the one its row comes from)."""
    runs = [re.findall(r"ran on ray node ([0-9a-f]+)", log.read_text()) for log in (out / "logs").glob("*.log")]
    return [r[-1] for r in runs if r]


def test_a_sweep_on_two_ray_nodes_has_local_numbers(ray_cluster, local_numbers, tmp_path):
    out = tmp_path / "out"
    res = bench_cli("run", *TINY, *ray_cluster.flags, "--threads", "1", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert numbers(out) == local_numbers
    # two cells at once on two one-CPU nodes: one on each
    assert sorted(_nodes(out)) == sorted(ray_cluster.node_ids())


def test_a_worker_node_killed_mid_sweep_loses_no_row(ray_cluster, tmp_path):
    """SIGKILL to the worker node's processes once the first row is in: Ray runs the cells it held again on the head
    (one retry); every cell ends ok, once."""
    out = tmp_path / "out"
    env = {**os.environ, **SUBPROCESS_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", *TINY, *QUICK, "width=[8]", "seed=[0,1,2,3,4,5]",
                             *ray_cluster.flags, "--threads", "1", "--out", str(out)], cwd=NEUTRAL_CWD, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_row(proc, out)
        worker = ray_cluster.node_ids()[1]
        ray_cluster.stop_worker()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        ray_cluster.add_worker()  # the session's cluster has its two nodes again
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    got = rows(out)
    assert len({r["cell_id"] for r in got}) == len(got) == 6 and all(r["status"] == "ok" for r in got)
    # the cells after the kill ran on the head; a cell whose node died after its log's last line but before its
    # result reached the driver ran again there (its log names both runs)
    nodes = _last_nodes(out)
    assert len(nodes) == 6 and nodes.count(worker) < 6 - 1 and len(_nodes(out)) >= 6


def test_a_dead_ray_worker_is_retried_then_failed(ray_cluster, tmp_path):
    dead_worker_is_retried_then_failed("ray", ray_cluster.flags, tmp_path)


def test_a_killed_ray_driver_resumes_without_loss_or_duplicates(ray_cluster, tmp_path):
    driver_killed_resumes_without_loss_or_duplicates(ray_cluster.flags, tmp_path)
