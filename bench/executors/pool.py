"""`pool`: local worker processes, each running one cell at a time with its share of the CPUs.

Workers are spawned (never forked: a forked torch with live OpenMP threads can hang) and live for the whole sweep, so
torch's import and the data cache are paid once per worker. The driver hands each worker its task itself, so when a
worker dies (killed, out of memory, a crash in native code) it knows which cell was lost: that cell runs again on a
fresh worker `max_retries` times, then becomes a `failed` row.
"""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import signal
from collections import deque

from bench.executors.base import Done, Event, Executor, execute, lost_row


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """A worker never outlives its driver (a driver killed with -9 leaves no orphans holding its pipes): on Linux
    the kernel kills it when the driver dies (a parent-death signal); anywhere, a watchdog thread waiting on the
    driver's sentinel ends it."""
    import ctypes
    import os
    import threading
    from multiprocessing.connection import wait
    parent = mp.parent_process()
    if parent is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass
    if os.getppid() != parent.pid:  # the driver died before the signal was armed
        os._exit(1)

    def watch():
        wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=watch, name="driver-watchdog", daemon=True).start()


def _worker(wid: int, tasks, results) -> None:
    """A worker's loop: a task in, its events and its row out; None stops it. Ctrl-C is the driver's to handle; the
    driver's death is the worker's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    while True:
        task = tasks.get()
        if task is None:
            return
        row = execute(task, lambda event: results.put(("event", wid, event)))
        results.put(("done", wid, row))


class PoolExecutor(Executor):
    name = "pool"

    def __init__(self, options, on_event, out_dir):
        super().__init__(options, on_event, out_dir)
        threads = options.get("threads", 0)
        self.n_workers = options.get("workers", 0) or max(1, self.cpus // max(1, threads or 1))
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.workers: dict[int, tuple] = {}     # wid -> (process, its task queue)
        self.assigned: dict[int, object] = {}   # wid -> the task it runs
        self.tries: dict[str, int] = {}
        self.pending = deque()
        self.next_wid = 0

    @property
    def slots(self):
        return self.n_workers

    def _spawn(self) -> int:
        wid, self.next_wid = self.next_wid, self.next_wid + 1
        tasks = self.ctx.Queue()
        proc = self.ctx.Process(target=_worker, args=(wid, tasks, self.results), daemon=True,
                                name=f"bench-pool-{wid}")
        proc.start()
        self.workers[wid] = (proc, tasks)
        return wid

    def submit(self, tasks):
        self.pending.extend(tasks)
        self._assign()

    def _next(self):
        """The pending task a free worker takes: the widest model first (ties: in submission order). Longest cells
        first: the widest ERM cell and then its smooth cell, the sweep's longest chain, start at once, and the small
        cells fill the other workers meanwhile (in submission order the chain started last and ran alone at the
        end: the default sweep took 255 s, widest first 205 s, 2 quiet cores)."""
        def width(k: int) -> float:
            w = self.pending[k].cell.get("width")
            return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else 0.0
        k = max(range(len(self.pending)), key=lambda i: (width(i), -i))
        task = self.pending[k]
        del self.pending[k]
        return task

    def _assign(self) -> None:
        while self.pending:
            idle = [w for w in self.workers if w not in self.assigned]
            if not idle and len(self.workers) < self.n_workers:
                idle = [self._spawn()]
            if not idle:
                return
            task = self._next()
            self.tries[task.cell_id] = self.tries.get(task.cell_id, 0) + 1
            self.assigned[idle[0]] = task
            self.workers[idle[0]][1].put(task)

    def poll(self, timeout):
        done = []
        try:
            item = self.results.get(timeout=timeout)
            while True:
                done.extend(self._handle(item))
                item = self.results.get_nowait()
        except queue_mod.Empty:
            pass
        done.extend(self._reap())  # free workers are assigned at the next submit: after the driver has released
        return done                # the cells these rows unblock, so the widest of them can be chosen

    def _handle(self, item) -> list:
        kind, wid, payload = item
        if kind == "event":
            self.on_event(payload)
            return []
        task = self.assigned.pop(wid)
        return [Done(task, payload)]

    def _reap(self) -> list:
        """Workers that died holding a task: the task again (up to max_retries), else a failed row."""
        done = []
        for wid, (proc, _) in list(self.workers.items()):
            if proc.exitcode is None:
                continue
            del self.workers[wid]
            task = self.assigned.pop(wid, None)
            if task is None:
                continue
            how = f"worker process died (exit code {proc.exitcode})"
            if self.tries[task.cell_id] <= self.options.get("max_retries", 1):
                self.on_event(Event(task.cell_id, "log", f"{how}; running the cell again"))
                self.pending.appendleft(task)
            else:
                done.append(Done(task, lost_row(task, f"WorkerDied: {how}, {self.tries[task.cell_id]} time(s)")))
        return done

    def close(self):
        for proc, tasks in self.workers.values():
            if proc.exitcode is None:
                try:
                    tasks.put(None)
                except (OSError, ValueError):
                    pass
        for proc, _ in self.workers.values():
            proc.join(timeout=0 if self.assigned else 5)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(timeout=5)
        self.workers.clear()
