"""What the benchmarks share: the models they train once and cache, and their JSON output."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lawbench.base.files import atomic_output, atomic_write_text


def cache_dir(arg) -> Path:
    if arg:
        return Path(arg)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lawbench" / "perf"


def trained(name, build, train_fn, cache: Path, log):
    """Model from the cache, or trained and cached (written to a temporary file, renamed into place)."""
    model = build()
    path = cache / f"{name}.pt"
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), True
        except Exception:  # noqa: BLE001 - a stale or torn cache entry is retrained
            pass
    log(f"training {name} ...")
    train_fn(model)
    with atomic_output(path) as f:
        torch.save(model.state_dict(), f)
    return model.eval(), False


def small_cnn() -> torch.nn.Module:
    """conv 16 5x5, pool, conv 32 5x5, pool, linear: the small CNN of the strength comparison (MNIST 28x28)."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10))


def write_json(path, res: dict) -> None:
    """The results as JSON at `path`, atomically (a temporary file renamed into place)."""
    atomic_write_text(path, json.dumps(res, indent=2, default=str) + "\n")
