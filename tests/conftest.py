"""Shared test helpers: the CLI as a subprocess, and tiny sweep overrides that run the real code paths fast."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A tiny sweep on the embedded MNIST-5k: two widths, few epochs, short attacks, and a custom AutoAttack of one
# original attack (APGD-CE, well under a second here; the standard version costs 10-15 s per tiny cell, mostly
# Square's 5000 queries). Tests that check plumbing use it; tests/test_cli.py's tiny_run keeps the standard version.
# ERM on clean labels (the default run adds label noise and the smooth recipe; tests/test_law.py runs those).
# TINY runs the cheap suite of earlier versions (PGD, then a custom AutoAttack of APGD-CE alone): tests of the default
# suite (PGD, fast at every eps, AutoAttack) say so (tests/test_suite.py, test_cli_trust.py, test_cli_masked.py)
TINY = ["n_train=200", "n_test=40", "width=[8,32]", "epochs=15", "pgd_steps=10", "eps_Linf=[0.05,0.1]",
        "aa_eps_Linf=[0.1]", "lip_points=64", "autoattack=[apgd-ce]", "attacks=[pgd,autoattack]", "recipe=erm",
        "label_noise=0", "executor.name=local"]

# The suite shares its CPUs (a developer's other work, CI neighbours). Under contention OpenMP's spin-waiting makes a
# two-thread torch up to 15x slower than one thread (a tiny cell's AutoAttack: 214 s instead of 14 s on a busy
# 2-core machine); on a quiet 2-core machine the whole suite took 437 s on one thread and 455 s on two (tiny
# models), and the thread count changes no result the tests check. So every test runs torch on one thread, in
# process and in CLI subprocesses, unless the caller's environment sets OMP_NUM_THREADS.
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 1)
SUBPROCESS_ENV = {"OMP_NUM_THREADS": str(THREADS)}


# CLI subprocesses run from a folder of their own, never the repository root: the installed `bench` and `lawbench`
# are what a user runs, and nothing may depend on the current directory.
NEUTRAL_CWD = Path(tempfile.mkdtemp(prefix="lawbench-cwd-"))


def bench_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run `python -m bench ...` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd or NEUTRAL_CWD, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def wait_for_first_row(proc, out: Path, timeout: float = 300) -> None:
    """Wait until the sweep ``proc`` writes its first row to OUT/results.jsonl; it must still be running then."""
    import time
    results = out / "results.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().strip():
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before its first row could be followed by a fault"


def run_in_process(argv, capsys) -> tuple[int, str, str]:
    """`python -m bench ...` through bench.cli.main in this process, without an interpreter's start-up: (exit code,
    stdout, stderr)."""
    from bench.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def cli():
    return bench_cli


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_service(why: str) -> None:
    """A service the tests start is not installed: a developer's run skips saying why and how to fix it; CI must
    exercise it, so there it is a failure."""
    if under_ci():
        pytest.fail("CI=true: " + why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster on 127.0.0.1 for the session (tests/clusters.py), stopped by its pids at the
    end."""
    from clusters import SlurmCluster, missing
    lacking = missing()
    if lacking:
        missing_service(f"SLURM is not installed ({', '.join(lacking)} not found), so the slurm executor cannot run "
                        "through sbatch here; `make slurm` installs Debian's slurm-wlm and munge (needs apt-get and "
                        "root or passwordless sudo), and `make test` runs it first")
    if os.geteuid() != 0:
        missing_service("a SLURM node daemon (slurmd) runs jobs as their user and must run as root; run the suite as "
                        "root to exercise the slurm executor through sbatch")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine for the session (tests/clusters.py), shut down at the end. Its
    files live in a short temp folder of its own: Ray's sockets live under it, and a socket's path may not exceed 107
    bytes (pytest's per-worker temp paths under xdist made the worker node's plasma socket longer)."""
    import shutil
    from clusters import RayCluster, loopback_name
    root = Path(tempfile.mkdtemp(prefix="lb-ray-"))
    try:
        cluster = RayCluster(loopback_name(), root).start()
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """torch on THREADS threads for the whole session (see SUBPROCESS_ENV)."""
    import torch
    torch.set_num_threads(THREADS)


def digits_split(n_train: int, test: slice):
    """scikit-learn's 8x8 digits as flat [0,1] vectors: the first n_train points and a test slice."""
    import torch
    from sklearn.datasets import load_digits
    X, Y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    Y = torch.tensor(Y, dtype=torch.long)
    return X[:n_train], Y[:n_train], X[test], Y[test]


def train_digits_mlp(seed, x, y, width=64, epochs=80, classes=10):
    """A small full-batch-trained 64-width-classes MLP: a real trained model for attack tests in a second."""
    import torch
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, classes))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


# The longest files first (measured: `make test` with --durations), the rest in their own order. `make test` hands
# whole files to its two workers in collection order (xdist's loadfile), so a long file collected last ran alone at
# the end while the other worker idled: the longest first is the classic remedy (longest processing time first).
LONGEST_FIRST = ("test_ray_cluster.py", "test_cli_masked.py", "test_hostile.py", "test_law.py", "test_scale_perf.py",
                 "test_attacks_perf.py", "test_native.py", "test_attacks_masking.py", "test_suite.py",
                 "test_reproducible.py", "test_slurm_cluster.py", "test_executors.py", "test_cli.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
