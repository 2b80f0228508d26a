"""Wall-clock seconds per named phase of a piece of work."""
from __future__ import annotations

import time
from contextlib import contextmanager


class Timer:
    """``with timer("phase"): ...`` adds the block's seconds to ``timer.seconds["phase"]`` (a phase may recur)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def rounded(self, digits: int = 4) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}
