"""The thread policy: how many torch threads each phase of a cell uses, chosen by a rule and recorded in the row.

A cell's budget is the CPUs this process may use (`os.sched_getaffinity`) divided by the cells running beside it on
the same machine, or `--threads`. Within the budget, more threads are not always faster: on tiny tensors (AutoAttack
on a few dozen survivors, small models) every op is a parallel region that waits for its slowest thread, and on a
shared machine one descheduled thread stalls them all. So a phase runs on the whole budget only when one forward of
the cell's model at the phase's batch is long enough to share (PARALLEL_MACS multiply-adds), else on one thread.

The rule reads the model and the batch, never a clock: thread counts change float sums (a matmul split over two
threads adds in another order), and the smooth search's accept/refuse steps amplify such differences into another
model. A timing probe chose differently under different load, so the same cell gave different rows; this rule gives
the same count, hence the same numbers, on the same machine whatever else runs on it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lawbench.base.modes import eval_mode

# Multiply-adds of Linear and Conv2d layers in one forward at the phase's batch from which the phase uses the whole
# budget. Measured here (2 cores, quiet): an MNIST MLP forward+backward runs 1.3-1.8x faster on 2 threads from 1.6e7
# multiply-adds up; beside a busy process a descheduled thread stalls each op for a scheduler slice (~4 ms), which
# costs little only once an op takes tens of milliseconds: ~1e8 multiply-adds at this machine's ~20 GFLOP/s.
PARALLEL_MACS = 1 << 27


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


def forward_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the Linear and Conv2d layers (plain or subclassed) in one forward of x, counted by hooks on
    a no-grad forward in eval mode: Linear out·in, Conv2d out·(in/groups)·kernel. Other layers count nothing (a
    model without these layers runs on one thread)."""
    total = [0]

    def count(mod, inp, out):
        if isinstance(mod, torch.nn.Linear):
            total[0] += out.numel() * mod.in_features
        else:
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += out.numel() * (mod.in_channels // mod.groups) * k

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


class ThreadChooser:
    """Per phase, the torch threads a cell uses: the budget when one forward of the cell's model at the phase's
    batch has at least PARALLEL_MACS multiply-adds, else 1 (decided once per phase, when the phase first asks). With
    a budget of 1, threads set by the user, or off CPU, the budget is used as it is. `record()` is the row's
    `threads` field."""

    def __init__(self, model: torch.nn.Module, x_sample: torch.Tensor, budget: ThreadBudget, device: torch.device):
        self.budget, self.device = budget, device
        self.phases: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self.ruled = device.type == "cpu" and budget.per_cell > 1 and not budget.threads
        self.macs_per_point = forward_macs(model, x_sample[:1].to(device)) if self.ruled else 0

    def threads(self, phase: str, batch: int) -> int:
        if phase not in self.phases:
            self.phases[phase] = self._rule(phase, batch) if self.ruled else self.budget.per_cell
        return self.phases[phase]

    @contextmanager
    def phase(self, phase: str, batch: int):
        with use_threads(self.threads(phase, batch)):
            yield

    def _rule(self, phase: str, batch: int) -> int:
        self.macs[phase] = self.macs_per_point * max(1, int(batch))
        return self.budget.per_cell if self.macs[phase] >= PARALLEL_MACS else 1

    def record(self) -> dict:
        why = self.budget.reason()
        if self.ruled:
            why += (f"; per phase the budget where one forward at the phase's batch has >= {PARALLEL_MACS:.3g} "
                    f"multiply-adds, else 1")
        elif self.device.type != "cpu":
            why += f"; on {self.device.type}, the budget as it is"
        return {"budget": self.budget.per_cell, "reason": why, "phases": dict(self.phases), "macs": dict(self.macs),
                "rule": "macs" if self.ruled else "budget"}
