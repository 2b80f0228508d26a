"""`slurm` (the `lawbench[slurm]` extra): cells as a SLURM job array, submitted through submitit.

Each array task runs one cell and writes `<out>/cells/<cell_id>.json` (row and log lines) atomically; the driver
merges those files into the store by cell_id, once, so a driver that was stopped (or killed) merges what finished
when it runs again. A task that SLURM preempts or times out is requeued by submitit (the task is Checkpointable);
one that fails without a file is submitted again `max_retries` times, then becomes a `failed` row. The out directory
must be on storage the compute nodes share. `cluster = "local"` runs the same path through submitit's local
executor (subprocesses on this machine): how the tests exercise it.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.executors.base import Done, Event, Executor, execute, lost_row
from bench.store import CELLS_DIR, read_cell_file, write_cell_file
from bench.threads import ThreadBudget


# the states of a job that ended (COMPLETED without submitit's result file: killed after the cell, or the file lost)
ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT")
GONE = "GONE"  # the controller no longer knows the job (it ended more than MinJobAge ago)


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id: state} of the jobs (array tasks "123_4") from the controller's queue (`squeue`), GONE for a job it
    no longer lists; None when squeue cannot answer. submitit reads states from `sacct` only, which a cluster without
    an accounting database refuses ("accounting storage is disabled"): there a cancelled job would never end, and
    every poll would print sacct's refusal."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        res = subprocess.run(["squeue", "-r", "--states=all", "-h", "-o", "%i %T", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return {j: GONE for j in job_ids} if "Invalid job id" in res.stderr else None
    states = dict(line.split()[:2] for line in res.stdout.splitlines() if len(line.split()) >= 2)
    return {j: states.get(j, GONE) for j in job_ids}


def _require_submitit():
    try:
        import submitit
    except ImportError:
        from bench.spec import SpecError
        raise SpecError("executor 'slurm' needs submitit: pip install 'lawbench[slurm]'") from None
    return submitit


try:  # a Checkpointable task is requeued by submitit on preemption and timeout
    import submitit as _submitit

    _Base = _submitit.helpers.Checkpointable
except ImportError:  # the executor refuses to start without it; the module still imports
    _Base = object


class SlurmCell(_Base):
    """The array task: one cell, its row and log lines written to the per-cell file."""

    def __call__(self, task) -> str:
        lines = []

        def emit(event: Event) -> None:
            if event.kind == "log":
                lines.append(event.text)

        row = execute(task, emit)
        write_cell_file(task.out_dir, task.cell_id, {"row": row, "log": lines})
        return task.cell_id


class SlurmExecutor(Executor):
    name = "slurm"
    streams = False

    def __init__(self, options, on_event, out_dir):
        super().__init__(options, on_event, out_dir)
        submitit = _require_submitit()
        self.cpus_per_cell = options.get("num_cpus_per_cell") or options.get("threads") or 1
        folder = Path(out_dir) / "slurm" / "%j"
        self.ex = submitit.AutoExecutor(folder=folder, cluster=options.get("cluster", "slurm"))
        params = dict(timeout_min=options.get("time_min", 60), cpus_per_task=self.cpus_per_cell,
                      gpus_per_node=int(options.get("num_gpus_per_cell", 0)), name="lawbench",
                      slurm_array_parallelism=options.get("array_parallelism", 64))
        if options.get("partition"):
            params["slurm_partition"] = options["partition"]
        self.ex.update_parameters(**params)
        self.local = options.get("cluster") == "local"
        self.pending: list = []
        self.jobs: dict = {}      # job -> task
        self.tries: dict = {}

    @property
    def slots(self):
        if self.local:  # submitit's local executor starts every job at once: the driver keeps to the CPUs
            return max(1, min(self.options.get("array_parallelism", 64), self.cpus // self.cpus_per_cell))
        return self.options.get("array_parallelism", 64)

    def budget(self):
        return ThreadBudget.for_cells(self.cpus_per_cell, 1, self.options.get("threads", 0))

    def submit(self, tasks):
        self.pending.extend(tasks)
        self._launch()

    def _launch(self) -> None:
        room = self.slots - len(self.jobs) if self.local else len(self.pending)
        batch, self.pending = self.pending[:max(0, room)], self.pending[max(0, room):]
        if not batch:
            return
        for task in batch:
            self.tries[task.cell_id] = self.tries.get(task.cell_id, 0) + 1
        jobs = self.ex.map_array(SlurmCell(), batch)  # one array per batch
        for job, task in zip(jobs, batch):
            self.jobs[job] = task
            self.on_event(Event(task.cell_id, "start", f"job {job.job_id}"))

    def poll(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            done = self._collect()
            self._launch()
            if done or not self.jobs or time.monotonic() >= deadline:
                return done
            time.sleep(min(self.options.get("poll_seconds", 2.0), max(0.0, deadline - time.monotonic())))

    def _ended(self) -> dict:
        """{job: SLURM's state, or None where submitit's result file says how it ended} for the jobs that ended."""
        if self.local:
            return {job: None for job in self.jobs if job.done()}
        states = queue_states([str(job.job_id) for job in self.jobs]) if self.jobs else {}
        out = {}
        for job in self.jobs:
            state = None if states is None else states[str(job.job_id)]
            if job.paths.result_pickle.exists():
                out[job] = None
            elif state in ENDED or state == GONE:
                out[job] = state
            elif states is None and job.done():  # squeue cannot answer: submitit's own watcher (sacct)
                out[job] = None
        return out

    def _collect(self) -> list:
        done = []
        for job, state in self._ended().items():
            task = self.jobs.pop(job)
            path = Path(self.out_dir) / CELLS_DIR / f"{task.cell_id}.json"
            payload = read_cell_file(path) if path.exists() else None
            if payload is not None:
                done.append(Done(task, payload["row"], payload.get("log", []), source=path))
                continue
            error = job.exception() if state is None else None  # submitit's verdict, from its result file
            how = f"SLURM job {job.job_id} ended" + (f" in state {state}" if state else "") + " without a row" + (
                f" ({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''})"
                if error else "")
            if self.tries[task.cell_id] <= self.options.get("max_retries", 1):
                self.on_event(Event(task.cell_id, "log", f"{how}; submitting it again"))
                self.pending.append(task)
            else:
                done.append(Done(task, lost_row(task, f"JobFailed: {how}")))
        return done

    def close(self):
        for job in self.jobs:
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 - a job that already ended cannot be cancelled
                pass
        self.jobs.clear()
