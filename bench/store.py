"""The results store: `<out>/results.jsonl`, append-only, written by one process.

Each row is written whole, flushed and fsynced before the next cell starts, so a run killed at any instant loses at
most the cell in flight. A torn last line (a kill mid-write) is cut off before the next append, so the file stays
readable line by line. A lock file keeps a second run from writing the same store at the same time.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

from reports.rows import read_rows_file


class StoreBusy(RuntimeError):
    """Another run holds the store's lock."""


def _finite(obj):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class Store:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.path = self.dir / "results.jsonl"
        self._lock = None

    def __enter__(self) -> "Store":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreBusy(f"{self.dir}: another run is writing this results store") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def rows(self) -> list[dict]:
        return read_rows_file(self.path).rows

    def finished(self) -> set[str]:
        """cell_ids with an `ok` row; failed cells are tried again on the next run."""
        return {r.get("cell_id") for r in self.rows() if r.get("status") == "ok"}

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
                fh.flush()
                os.fsync(fh.fileno())

    def append(self, row: dict) -> None:
        if self._lock is None:
            raise RuntimeError("Store.append outside `with Store(...)`")
        self._cut_torn_tail()
        line = json.dumps(_finite(row), sort_keys=False, allow_nan=False) + "\n"
        with open(self.path, "ab") as fh:
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())
