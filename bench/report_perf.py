"""`python -m bench perf --report [--rows N] [--json FILE] [--quick]`: `bench report` on a cluster sweep's store.

One real cell runs first (the CLI, tiny); its row is the template of a store of N rows (default 20,000, about 100 MB:
the size a cluster sweep writes), each a distinct cell (its own width, seed and cell_id, params following the width).
Then `python -m bench report` runs on it in a fresh process, as a user runs it: ``report_seconds`` (wall time,
start-up included; a run of its own) and ``report_peak_mb`` (the peak memory of the report and the helpers it forks,
FamilyMemory, in a second run: sampling takes CPU), against the targets 15 s and 400 MB.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CELL = ["n_train=200", "n_test=40", "width=16", "epochs=5", "pgd_steps=5", "eps_Linf=[0.05,0.1,0.2,0.3]",
        "aa_eps_Linf=[0.1]", "autoattack=[apgd-ce]", "lip_points=32", "recipe=erm", "label_noise=0.2"]
WIDTHS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TARGETS = {"report_seconds": 15.0, "report_peak_mb": 400.0}
# `python -m bench report` whose last stderr line is its own peak memory and its forked helpers' largest (kB): the
# report's alone, not the template cell's (measured here, RUSAGE_CHILDREN would count the template cell too)
REPORT_WITH_PEAK = ("import resource, sys\nfrom bench.cli import main\ncode = main(sys.argv[1:])\n"
                    "print(*(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF,\n"
                    "                                                  resource.RUSAGE_CHILDREN)), file=sys.stderr)\n"
                    "sys.exit(code)")


def template_row(folder: Path) -> dict:
    """The row of one real tiny cell, run through the CLI."""
    res = subprocess.run([sys.executable, "-m", "bench", "run", *CELL, "--executor", "local", "--out", str(folder)],
                         capture_output=True, text=True, cwd=folder.parent)
    if res.returncode != 0:
        raise RuntimeError(f"the template cell failed: {res.stderr.strip().splitlines()[-1:]}")
    (line,) = (folder / "results.jsonl").read_text().splitlines()
    return json.loads(line)


def write_store(path: Path, row: dict, n: int) -> int:
    """n distinct cells from ``row`` at the widths WIDTHS and seeds 0, 1, ...; returns the bytes written."""
    w0, p0 = row["width"], row["params"]
    with open(path, "w") as fh:
        for i in range(n):
            width, seed = WIDTHS[i % len(WIDTHS)], i // len(WIDTHS)
            params = max(1, round(p0 * width / w0))
            cid = hashlib.sha256(f"{width}-{seed}".encode()).hexdigest()[:16]
            fh.write(json.dumps({**row, "cell_id": cid, "width": width, "seed": seed, "params": params,
                                 "ratio": row["ratio"] * params / p0 if row.get("ratio") else row.get("ratio")}) + "\n")
    return path.stat().st_size


class FamilyMemory(threading.Thread):
    """The largest sum of proportional set sizes (Pss, /proc/PID/smaps_rollup) over a process and its descendants,
    sampled every 100 ms while in use; peak_kb stays 0 where /proc cannot say. A read of smaps_rollup walks the
    process's page tables (20 ms for 600 MB here): the sampler takes CPU, so no timed run is sampled."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()

    def __enter__(self) -> "FamilyMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in _family(self.pid)))


def _family(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [q for k in kids for q in _family(int(k))]


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")), 0)


def _report(out: Path, cwd: Path, sampled: bool) -> tuple[float, tuple[int, int, int]]:
    """`bench report --out OUT` in a fresh process: (wall seconds, (peak, own peak, forked helper's peak) in kB).
    The report and its forked helper (reports.forked) share the pages the helper inherited, so a sum of resident sizes
    counts those twice: the peak is their proportional set sizes summed (FamilyMemory, where sampled) and never below
    the report's own peak resident size; unsampled or without /proc, the sum of the two resident peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", REPORT_WITH_PEAK, "report", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    family = FamilyMemory(proc.pid)
    with family if sampled else contextlib.nullcontext():
        _, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench report failed: {stderr.strip().splitlines()[-1:]}")
    own_kb, helper_kb = map(int, stderr.strip().splitlines()[-1].split())
    peak_kb = max(family.peak_kb, own_kb) if family.peak_kb else own_kb + helper_kb
    return seconds, (peak_kb, own_kb, helper_kb)


def measure(n_rows: int, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="lawbench-report-perf-") as tmp:
        tmp = Path(tmp)
        log("one real cell for the template row ...")
        row = template_row(tmp / "cell")
        out = tmp / "store"
        out.mkdir()
        size = write_store(out / "results.jsonl", row, n_rows)
        log(f"bench report on {n_rows} rows ({size / 2 ** 20:.0f} MB) ...")
        seconds, _ = _report(out, tmp, sampled=False)  # timed alone
        _, (peak_kb, own_kb, helper_kb) = _report(out, tmp, sampled=True)  # the same report again, its memory
    out = {"rows": n_rows, "store_mb": round(size / 2 ** 20, 1), "report_seconds": round(seconds, 2),
           "report_peak_mb": round(peak_kb / 1024, 1), "report_own_peak_mb": round(own_kb / 1024, 1),
           "helper_peak_mb": round(helper_kb / 1024, 1)}
    out["targets"] = {f"{k}<={v:g}": out[k] <= v for k, v in TARGETS.items()}
    return out


def main(argv=None) -> int:
    from bench.zoo import write_json
    p = argparse.ArgumentParser(prog="python -m bench perf --report", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="rows in the store (default 20,000)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="2,000 rows (a smoke test)")
    args = p.parse_args(argv)
    n = args.rows or (2000 if args.quick else 20000)
    if n < 1:
        print("bench perf --report: --rows must be at least 1", file=sys.stderr)
        return 2
    os.environ.setdefault("MPLBACKEND", "Agg")
    res = measure(n, lambda m: print(m, file=sys.stderr, flush=True))
    print(f"bench report on {res['rows']} rows ({res['store_mb']} MB): {res['report_seconds']} s, "
          f"peak {res['report_peak_mb']} MB; targets {res['targets']}")
    if args.json:
        write_json(args.json, res)
    return 0
