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

from lawbench.base.files import atomic_write_text
from lawbench.reports.rows import read_rows_file


TAIL_BLOCK = 1 << 16


class StoreError(RuntimeError):
    """The results directory cannot be used (not a directory, not writable, a dangling link); names the path."""


class StoreBusy(StoreError):
    """Another run holds the store's lock."""


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_out_dir(out: str) -> None:
    """--out names a directory; '' would silently mean the current one."""
    if not out:
        raise StoreError("--out: empty path (name a results directory, e.g. --out results)")


def json_safe(obj):
    """The value as the store writes it: JSON has no NaN or infinity, they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` to the file descriptor (a write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Store:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.path = self.dir / "results.jsonl"
        self._lock = None

    def check(self) -> None:
        """Read-only checks, before anything is created: the directory is one, the results file is a readable file
        (not a dangling link, not a directory) whose rows parse. StoreError or RowsError name the path."""
        if self.dir.exists() and not self.dir.is_dir():
            raise StoreError(f"{self.dir}: not a directory (a results directory is needed)")
        for parent in self.dir.parents:  # the nearest existing ancestor must be a directory
            if parent.exists():
                if not parent.is_dir():
                    raise StoreError(f"{parent}: not a directory, so {self.dir} cannot be created")
                break
        if self.path.is_symlink() and not self.path.exists():
            raise StoreError(f"{self.path}: dangling symlink (it points to {os.readlink(self.path)}, "
                             f"which does not exist)")
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a results file")
        read_rows_file(self.path)  # a malformed row is a RowsError naming the file and line

    def __enter__(self) -> "Store":
        """Check, then create the directory, take the lock and open the results file for append: every way the
        store cannot be written shows here, as a StoreError naming the path, before any cell runs."""
        self.check()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{exc.filename or self.dir}: cannot create the results directory "
                             f"({_os_reason(exc)})") from None
        lock_path = self.dir / ".lock"
        try:
            self._lock = open(lock_path, "a")
        except OSError as exc:
            raise StoreError(f"{lock_path}: cannot open the lock file ({_os_reason(exc)})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close_lock()
            raise StoreBusy(f"{self.dir}: another run is writing this results store") from None
        try:
            with open(self.path, "ab"):
                pass
        except OSError as exc:
            self._close_lock()
            raise StoreError(f"{self.path}: cannot open the results file for append ({_os_reason(exc)})") from None
        return self

    def _close_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._close_lock()

    def rows(self) -> list[dict]:
        return read_rows_file(self.path).rows

    def finished(self) -> set[str]:
        """cell_ids with an `ok` row; failed cells are tried again on the next run."""
        return {r.get("cell_id") for r in self.rows() if r.get("status") == "ok"}

    def _cut_torn_tail(self) -> None:
        """A last line without its newline (a writer killed mid-line) is cut off; only the file's tail is read (a
        cluster sweep's store is 100 MB, and this runs before every row)."""
        if not self.path.exists():
            return
        with open(self.path, "r+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end == 0:
                return
            fh.seek(end - 1)
            if fh.read(1) == b"\n":
                return
            pos = end
            while pos > 0:  # back to the last newline, a block at a time
                step = min(TAIL_BLOCK, pos)
                fh.seek(pos - step)
                block = fh.read(step)
                k = block.rfind(b"\n")
                if k >= 0:
                    pos = pos - step + k + 1
                    break
                pos -= step
            fh.truncate(pos)
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, row: dict) -> None:
        if self._lock is None:
            raise RuntimeError("Store.append outside `with Store(...)`")
        self._cut_torn_tail()
        data = (json.dumps(json_safe(row), sort_keys=False, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                write_all(fd, data)
                os.fsync(fd)
            except OSError as exc:  # a full disk, a quota, an I/O error: no partial line is left behind
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise StoreError(f"{self.path}: cannot write a row ({_os_reason(exc)}); every row before it is "
                                 f"kept, and a re-run resumes") from None
        finally:
            os.close(fd)


# Per-cell result files: executors whose workers cannot hand a row back to the driver directly (SLURM tasks) write
# `<out>/cells/<cell_id>.json` = {"row": ..., "log": [...]}; the driver merges each into the store by cell_id, once.
CELLS_DIR = "cells"


def write_cell_file(out_dir: str | Path, cid: str, payload: dict) -> Path:
    """Atomically (a temporary file, fsync, rename): a task killed mid-write leaves no half file behind."""
    return atomic_write_text(Path(out_dir) / CELLS_DIR / f"{cid}.json", json.dumps(json_safe(payload), allow_nan=False))


def read_cell_file(path: Path) -> dict | None:
    """A per-cell file's payload, or None when it does not parse into a row with a cell_id (it is left in place)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(payload, dict) and isinstance(payload.get("row"), dict) and payload["row"].get("cell_id")
    return payload if ok else None


def cell_files(out_dir: str | Path) -> list[Path]:
    folder = Path(out_dir) / CELLS_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []
