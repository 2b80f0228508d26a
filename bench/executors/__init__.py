"""Executors: how the driver's cells get run. `local` (in this process), `pool` (local worker processes), `ray`
(a local Ray instance or a cluster), `slurm` (a job array through submitit). Each is one module; the options each
reads are declared once, in bench.spec.EXECUTOR_OPTIONS."""
from __future__ import annotations

from importlib import import_module

from bench.executors.base import Done, Event, Executor

_MODULES = {"local": ("local", "LocalExecutor"), "pool": ("pool", "PoolExecutor"), "ray": ("ray", "RayExecutor"),
            "slurm": ("slurm", "SlurmExecutor")}


def make_executor(options: dict, on_event, out_dir: str) -> Executor:
    """The executor named by options["name"] (a validated [executor] table, bench.spec.executor_options)."""
    module, cls = _MODULES[options["name"]]
    return getattr(import_module(f"bench.executors.{module}"), cls)(options, on_event, str(out_dir))


__all__ = ["Done", "Event", "Executor", "make_executor"]
