"""`python -m bench perf --scale [--json FILE] [--quick]`: executors and the thread policy, measured in one run.

* ``scale_speedup``: a grid of cells of one size (width 640 x 8 seeds, AutoAttack on) run by `local` with its
  thread policy, then by `pool` and by `ray` with 2 workers x 1 thread: local's wall time over the best executor's
  (bigger is better). In a grid, one huge cell would cap any executor; cells of one size do not.
  Where a SLURM cluster answers (`squeue`), the same grid also runs as a job array (2 tasks at once x 1 thread);
  every executor's line gives cells per minute.
* ``contention_slowdown``: the default sweep run locally on a quiet machine, then beside one competing busy process
  pinned to one CPU: loaded wall time over quiet.

Every run is the CLI in a fresh process (`python -m bench run`, start-up included: a user pays it too) with a fresh
results directory, so each trains and attacks the same cells from scratch. OMP_NUM_THREADS is removed from the runs'
environment: it would override the thread policy being measured.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# cells of the default run's size: MNIST-5k with noisy labels, width 640, trained to interpolation (at most 100
# epochs), AutoAttack standard at 0.1. Smaller cells measure process start-up more than execution.
GRID = ["width=640", "recipe=erm", "epochs=100", "seed=[0,1,2,3,4,5,6,7]"]
GRID_QUICK = ["n_train=200", "n_test=40", "width=16", "recipe=erm", "epochs=5", "pgd_steps=5", "eps_Linf=[0.1]",
              "autoattack=off", "attacks=[pgd]", "lip_points=32", "seed=[0,1,2,3]"]
DEFAULT_QUICK = ["n_train=200", "n_test=40", "width=[16,32]", "recipe=erm", "epochs=5", "pgd_steps=5",
                 "eps_Linf=[0.1]", "autoattack=off", "attacks=[pgd]", "lip_points=32"]
LOCAL = ["--executor", "local", "--threads", "0"]  # the default preset names a pool of 1-thread workers
EXECUTORS = {"pool": ["--executor", "pool", "--workers", "2", "--threads", "1"],
             "ray": ["--executor", "ray", "--threads", "1"]}
# the SLURM cluster this machine's commands reach (SLURM_CONF, or a login node's own): the grid as a job array of
# 2 tasks at once x 1 thread, beside the pool; skipped, saying why, where squeue cannot answer
SLURM = ["executor.name=slurm", "executor.array_parallelism=2", "executor.poll_seconds=1", "--threads", "1"]


def slurm_answers() -> str | None:
    """None when a SLURM cluster answers `squeue` here, else why not."""
    import shutil
    if not shutil.which("sbatch"):
        return "no sbatch on PATH"
    try:
        res = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"squeue failed ({type(exc).__name__})"
    return None if res.returncode == 0 else f"squeue: {res.stderr.strip().splitlines()[-1:] or res.returncode}"


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def run_sweep(args: list[str], log) -> dict:
    """One `python -m bench run` in a fresh results directory: wall time and the rows' thread choices."""
    with tempfile.TemporaryDirectory(prefix="lawbench-scale-") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "bench", "run", *args, "--out", str(out)]
        log("  " + " ".join(cmd[3:]))
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()[-500:]}")
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    phases = {}
    for row in rows:
        for phase, n in row.get("threads", {}).get("phases", {}).items():
            phases.setdefault(phase, {}).setdefault(str(n), 0)
            phases[phase][str(n)] += 1
    return {"seconds": round(wall, 2), "cells": len(rows), "threads_chosen": phases}


def _spin() -> None:  # pragma: no cover - runs in the competing process
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    while True:
        pass


def loaded(fn):
    """fn() while one busy process spins on one CPU (the lowest this process may use)."""
    proc = mp.get_context("spawn").Process(target=_spin, daemon=True)
    proc.start()
    try:
        time.sleep(0.5)
        return fn()
    finally:
        proc.terminate()
        proc.join()


def ray_flags(address: str | None, node_ip: str | None) -> list[str]:
    """The Ray line's executor: a Ray cluster joined by address (as on a cluster; its nodes' CPUs are its workers),
    else a local instance of 2 workers."""
    if not address:
        return EXECUTORS["ray"]
    return ["executor.name=ray", f"executor.address={address}", "--threads", "1",
            *([f"executor.node_ip_address={node_ip}"] if node_ip else [])]


def measure(quick: bool, log, ray_address: str | None = None, ray_node_ip: str | None = None) -> dict:
    grid = GRID_QUICK if quick else GRID
    default = ["default", *DEFAULT_QUICK] if quick else ["default"]
    res = {"cpus": len(os.sched_getaffinity(0)), "quick": quick, "grid": grid, "executors": {},
           "ray_cluster": ray_address or "a local instance"}
    log("grid: local with the thread policy ...")
    res["executors"]["local"] = run_sweep(["default", *grid, *LOCAL], log)
    for name, flags in {**EXECUTORS, "ray": ray_flags(ray_address, ray_node_ip)}.items():
        where = f"the Ray cluster at {ray_address}" if name == "ray" and ray_address else "2 workers x 1 thread"
        log(f"grid: {name}, {where} ...")
        res["executors"][name] = run_sweep(["default", *grid, *flags], log)
    why = slurm_answers()
    if why is None:
        log("grid: slurm, a job array of 2 tasks at once x 1 thread ...")
        res["executors"]["slurm"] = run_sweep(["default", *grid, *SLURM], log)
    else:
        res["slurm_skipped"] = why
    for r in res["executors"].values():
        r["cells_per_minute"] = round(60.0 * r["cells"] / r["seconds"], 2)
    best = min(("pool", "ray"), key=lambda k: res["executors"][k]["seconds"])
    res["scale_best"] = best
    res["scale_speedup"] = round(res["executors"]["local"]["seconds"] / res["executors"][best]["seconds"], 3)
    log("default sweep, quiet ...")
    res["default_quiet"] = run_sweep(default, log)
    log("default sweep beside a busy process pinned to one CPU ...")
    res["default_loaded"] = loaded(lambda: run_sweep(default, log))
    res["contention_slowdown"] = round(res["default_loaded"]["seconds"] / res["default_quiet"]["seconds"], 3)
    res["targets"] = {"scale_speedup>=1.25": res["scale_speedup"] >= 1.25,
                      "contention_slowdown<=2.0": res["contention_slowdown"] <= 2.0}
    return res


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"bench perf --scale ({res['cpus']} CPUs{', quick' if res['quick'] else ''})")
    for col in ("measure", "value", "detail"):
        t.add_column(col, justify="right" if col == "value" else "left")
    for name, r in res["executors"].items():
        t.add_row(f"grid, {name}" + (f" ({res['ray_cluster']})" if name == "ray" else ""), f"{r['seconds']:.1f} s", f"{r['cells']} cells, {r['cells_per_minute']:.2f} per "
                  f"minute; threads {r['threads_chosen']}")
    if "slurm_skipped" in res:
        t.add_row("grid, slurm", "skipped", res["slurm_skipped"])
    t.add_row("scale_speedup", f"{res['scale_speedup']:.2f}x", f"local / {res['scale_best']}")
    for key in ("default_quiet", "default_loaded"):
        r = res[key]
        t.add_row(key.replace("_", " "), f"{r['seconds']:.1f} s", f"{r['cells']} cells; threads {r['threads_chosen']}")
    t.add_row("contention_slowdown", f"{res['contention_slowdown']:.2f}x", "loaded / quiet")
    for k, ok in res["targets"].items():
        t.add_row(f"target {k}", "met" if ok else "NOT met", "")
    Console(width=160).print(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench perf --scale", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny sweeps (a smoke test, numbers meaningless)")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="the Ray line joins this Ray cluster (default: a local "
                   "instance of 2 workers)")
    p.add_argument("--ray-node-ip", metavar="ADDRESS", help="the driver's node address on that cluster")
    args = p.parse_args(argv)
    res = measure(args.quick, lambda msg: print(msg, file=sys.stderr, flush=True), args.ray_address,
                  args.ray_node_ip)
    _print(res)
    if args.json:
        from bench.zoo import write_json
        write_json(args.json, res)
    return 0
