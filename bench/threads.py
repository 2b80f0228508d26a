"""The thread policy: how many torch threads each phase of a cell uses, chosen deliberately and recorded in the row.

A cell's budget is the CPUs this process may use (`os.sched_getaffinity`) divided by the cells running beside it on
the same machine, or `--threads`. Within the budget, more threads are not always faster: on tiny tensors (AutoAttack
on a few dozen survivors, small models) every op is a parallel region that waits for its slowest thread, and on a
shared machine one descheduled thread stalls them all. So each phase's count is measured, not guessed: the cell's own
model runs forward and backward at the phase's batch size with 1 thread and with the budget, and the faster wins.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

PROBE_REPS = 5        # timed repetitions per thread count (median), after one warm-up
PROBE_SECONDS = 1.0   # the probe's time budget per phase; fewer reps when one repetition is slow
# More threads must be this much faster to be chosen. The risk is lopsided: a wrong "1" costs at most the parallel
# speed-up, a wrong "many" on a shared machine up to 10x (one descheduled thread stalls every op); a probe of a few
# milliseconds is noisy, and `bench perf --scale` saw a 5% win at 2 threads turn into a loss once the cell ran.
SPEEDUP_NEEDED = 1.25


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container or SLURM allocation narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity masks
        return max(1, os.cpu_count() or 1)


def env_threads() -> int:
    """OMP_NUM_THREADS when the environment sets it to a positive integer (a user's or scheduler's explicit cap),
    else 0."""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 0


@dataclass(frozen=True)
class ThreadBudget:
    """The threads one cell may use: `threads` set by the user (--threads, or OMP_NUM_THREADS in the environment),
    else CPUs over the cells running at once (at least 1)."""
    cpus: int
    workers: int = 1
    threads: int = 0  # --threads / executor.threads; 0: derived
    source: str = "--threads"

    @classmethod
    def for_cells(cls, cpus: int, workers: int = 1, threads: int = 0) -> "ThreadBudget":
        if threads:
            return cls(cpus, workers, threads)
        return cls(cpus, workers, env_threads(), "OMP_NUM_THREADS")

    @property
    def per_cell(self) -> int:
        return self.threads or max(1, self.cpus // max(1, self.workers))

    def reason(self) -> str:
        if self.threads:
            return f"{self.source} {self.threads}"
        return f"{self.cpus} CPU(s) this process may use / {self.workers} cell(s) at once"


@contextmanager
def use_threads(n: int):
    """torch's intra-op threads set to n inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _time_steps(model: torch.nn.Module, x: torch.Tensor, counts: tuple) -> dict:
    """Median milliseconds of one forward and backward of the model's logits at each thread count. The counts take
    turns, repetition by repetition, so a change in the machine's load during the probe falls on all of them alike
    (timed one after the other, a burst of load on one side decided the choice)."""
    def step():
        xi = x.detach().clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model(xi).sum().backward()

    times: dict = {t: [] for t in counts}
    for t in counts:  # warm-up: allocations and kernel selection
        with use_threads(t):
            step()
    spent = 0.0
    for _ in range(PROBE_REPS):
        for t in counts:
            with use_threads(t):
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
            times[t].append(dt)
            spent += dt
        if spent > PROBE_SECONDS:
            break
    return {t: 1000 * statistics.median(v) for t, v in times.items()}


class ThreadChooser:
    """Per phase, the torch threads a cell uses: the budget where it runs the cell's model clearly faster than one
    thread here and now at that phase's batch size (SPEEDUP_NEEDED), else 1 (measured once per phase, when the
    phase first asks). Off CPU, with a budget of 1,
    or with threads set by the user, nothing is measured. `record()` is the row's `threads` field."""

    def __init__(self, model: torch.nn.Module, x_sample: torch.Tensor, budget: ThreadBudget, device: torch.device):
        self.model, self.x_sample, self.budget, self.device = model, x_sample, budget, device
        self.phases: dict[str, int] = {}
        self.probe_ms: dict[str, dict] = {}
        self.measured = device.type == "cpu" and budget.per_cell > 1 and not budget.threads

    def threads(self, phase: str, batch: int) -> int:
        if phase not in self.phases:
            self.phases[phase] = self._measure(phase, batch) if self.measured else self.budget.per_cell
        return self.phases[phase]

    @contextmanager
    def phase(self, phase: str, batch: int):
        with use_threads(self.threads(phase, batch)):
            yield

    def _measure(self, phase: str, batch: int) -> int:
        n, size = self.budget.per_cell, max(1, int(batch))
        x = self.x_sample[:size]
        if x.shape[0] < size:  # fewer points than the batch: repeat them (only the shape matters)
            x = x.repeat((size + x.shape[0] - 1) // x.shape[0], *[1] * (x.dim() - 1))[:size]
        was_training = self.model.training
        self.model.eval()
        try:
            timed = {t: round(ms, 3) for t, ms in _time_steps(self.model, x.to(self.device), (1, n)).items()}
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
        self.probe_ms[phase] = {"batch": size, **{str(t): ms for t, ms in timed.items()}}
        return n if timed[n] * SPEEDUP_NEEDED <= timed[1] else 1

    def record(self) -> dict:
        why = self.budget.reason()
        if self.measured:
            why += (f"; per phase the budget where it ran the cell's model at the phase's batch {SPEEDUP_NEEDED}x "
                    f"faster than 1 thread, else 1")
        elif self.device.type != "cpu":
            why += f"; on {self.device.type}, not timed"
        return {"budget": self.budget.per_cell, "reason": why, "phases": dict(self.phases),
                "probe_ms": dict(self.probe_ms)}
