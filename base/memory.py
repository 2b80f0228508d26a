"""Out-of-memory back-off: a batch that halves when the device runs out of memory, down to a floor."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def is_oom(exc: BaseException) -> bool:
    """True for device out-of-memory errors (CUDA OutOfMemoryError, CPU allocator failures)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return ("out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
                or "failed to allocate" in msg)
    return False


class Backoff:
    """The batch size work runs at: ``run(fn)`` calls ``fn(batch)`` and, on out-of-memory, halves the batch (never
    below ``floor``) and calls it again; any other error, or one at the floor, is raised. ``ooms`` counts the
    halvings; ``log`` hears of each."""

    def __init__(self, batch: int, floor: int = 1, log: Callable[[str], None] | None = None, what: str = "batch"):
        self.batch, self.floor, self.log, self.what = max(int(floor), int(batch)), int(floor), log, what
        self.ooms = 0

    def run(self, fn: Callable[[int], T]) -> T:
        while True:
            try:
                return fn(self.batch)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(exc) or self.batch <= self.floor:
                    raise
                self.batch, self.ooms = max(self.floor, self.batch // 2), self.ooms + 1
                if self.log:
                    self.log(f"out of memory, {self.what} -> {self.batch}")
