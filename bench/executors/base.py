"""What every executor shares: the events a running cell emits, a finished cell, and the Executor interface.

The driver (bench.run) owns the plan and the store; an executor only runs the tasks it is given and hands back one
row per task. Events (a cell started, its phase changed, a log line) reach the driver through `on_event`, always
called in the driver's thread (inside `poll`), so the display is the same whatever runs the cells.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.runner import CellTask, base_row, run_cell
from bench.threads import ThreadBudget, available_cpus


@dataclass(frozen=True)
class Event:
    cell_id: str
    kind: str       # "start" | "phase" | "log"
    text: str = ""


@dataclass
class Done:
    """A task's outcome. log: its log lines when the executor did not stream them as events (else empty);
    source: the per-cell file the row came from, removed once the row is in the store."""
    task: CellTask
    row: dict
    log: list = field(default_factory=list)
    source: Path | None = None


_PLUGINS_LOADED: set = set()


def execute(task: CellTask, emit: Callable[[Event], None]) -> dict:
    """Run one task in this process, emitting its events; the worker side of every executor. A worker process
    imports the run's model plugins before its first cell (the driver's registry is not shared with it)."""
    cid = task.cell_id
    emit(Event(cid, "start"))
    if task.plugins and task.plugins not in _PLUGINS_LOADED:
        from bench.plugins import load_models
        load_models(list(task.plugins))
        _PLUGINS_LOADED.add(task.plugins)
    return run_cell(task, phase=lambda text: emit(Event(cid, "phase", text)),
                    log=lambda line: emit(Event(cid, "log", line.rstrip("\n"))))


def lost_row(task: CellTask, error: str) -> dict:
    """The row of a cell whose worker never handed one back (it died, or its job failed)."""
    row = base_row(task.cell)
    row.update(status="failed", error=error)
    return row


class BufferedEmit:
    """Events batched in a worker and sent every `seconds` (a remote call per log line would cost more than the
    line); `flush()` sends the rest."""

    def __init__(self, send: Callable[[list], None], seconds: float = 0.5):
        self.send, self.seconds, self.buffer, self.last = send, seconds, [], time.monotonic()

    def __call__(self, event: Event) -> None:
        self.buffer.append(event)
        if event.kind == "start" or time.monotonic() - self.last > self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.send(self.buffer)
            self.buffer = []
        self.last = time.monotonic()


class Executor:
    """Runs CellTasks. Subclasses set `name`, `streams` (log lines arrive as events while a cell runs) and implement
    submit / poll / close. `slots` is how many cells run at once; `budget` the threads each may use."""
    name = "executor"
    streams = True

    def __init__(self, options: dict, on_event: Callable[[Event], None], out_dir: str):
        self.options, self.on_event, self.out_dir = options, on_event, out_dir
        self.cpus = available_cpus()

    @property
    def slots(self) -> int:
        return 1

    def budget(self) -> ThreadBudget:
        return ThreadBudget.for_cells(self.cpus, self.slots, self.options.get("threads", 0))

    def submit(self, tasks: list[CellTask]) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> list[Done]:
        """The tasks finished since the last call (waiting up to `timeout` seconds for one), events delivered."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop: cells still running are abandoned (a re-run runs them again)."""

    def describe(self) -> str:
        b = self.budget()
        return f"{self.name}: {self.slots} cell(s) at once, {b.per_cell} thread(s) each ({b.reason()})"
