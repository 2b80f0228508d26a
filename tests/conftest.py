"""Shared test helpers: the CLI as a subprocess, and tiny sweep overrides that run the real code paths fast."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A tiny sweep on the embedded MNIST-5k: two widths, few epochs, short attacks, cheap AutoAttack on few points.
TINY = ["n_train=200", "n_test=40", "width=[8,32]", "epochs=15", "pgd_steps=10", "eps_Linf=[0.05,0.1]",
        "aa_eps_Linf=[0.1]", "lip_points=64"]


def bench_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run `python -m bench ...` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return bench_cli
