"""`ray` (the `lawbench[ray]` extra): each cell is a Ray task declaring its CPUs and GPUs.

Without an address the driver starts a local Ray instance sized to the CPUs this process may use; with one it joins
that cluster (every node needs lawbench installed and the out directory on shared storage). Rows come back as task
results through Ray's object store: small, and only the driver writes the store. Checkpoints and logs stay files in
the out directory, because they outlive the run (a re-run reuses them) and the object store does not. Events travel
through a Ray queue, batched. A task whose worker dies is retried by Ray `max_retries` times, then its cell becomes a
`failed` row; killing the driver loses only the cells in flight (a re-run resumes from the store).
"""
from __future__ import annotations

from bench.executors.base import BufferedEmit, Done, Event, Executor, execute, lost_row


def _require_ray():
    try:
        import ray
    except ImportError:
        from bench.spec import SpecError
        raise SpecError("executor 'ray' needs Ray: pip install 'lawbench[ray]'") from None
    return ray


def _run_task(task, events):
    """The Ray task: one cell in a Ray worker, its events batched into the driver's queue; its log says which node
    ran it."""
    import ray
    emit = BufferedEmit(lambda batch: _put(events, batch))
    try:
        return execute(task, emit)
    finally:
        emit(Event(task.cell_id, "log", f"ran on ray node {ray.get_runtime_context().get_node_id()}"))
        emit.flush()


def _put(events, batch) -> None:
    """A batch of events into the driver's queue; dropped where the queue cannot take it (its node lost): a cell's
    progress lines are not worth the cell."""
    import ray
    try:
        events.put_nowait_batch(batch)
    except ray.exceptions.RayError:
        pass


def _head_node(ray) -> dict:
    """Actor options placing an actor on the head node: the node a cluster does not lose without losing itself."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    heads = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(heads[0], soft=True)} if heads else {}


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, options, on_event, out_dir):
        super().__init__(options, on_event, out_dir)
        ray = self.ray = _require_ray()
        from ray.util.queue import Queue
        address = options.get("address") or None
        if not ray.is_initialized():
            # a node address the cluster's nodes were started with (`ray start --node-ip-address`): Ray's guess is
            # the interface that reaches the internet, and it rewrites 127.0.0.1 to that
            node = {"_node_ip_address": options["node_ip_address"]} if options.get("node_ip_address") else {}
            ray.init(address=address, num_cpus=None if address else self.cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, **node)
        self.cpus_per_cell = options.get("num_cpus_per_cell") or options.get("threads") or 1
        self.total_cpus = int(ray.cluster_resources().get("CPU", self.cpus))
        self.events = Queue(actor_options=_head_node(ray))  # a worker node that dies does not take it along
        self.remote = ray.remote(_run_task).options(num_cpus=self.cpus_per_cell,
                                                    num_gpus=options.get("num_gpus_per_cell", 0.0),
                                                    max_retries=options.get("max_retries", 1),
                                                    retry_exceptions=False)
        self.running: dict = {}  # object ref -> task

    @property
    def slots(self):
        return max(1, self.total_cpus // self.cpus_per_cell)

    def budget(self):
        from bench.threads import ThreadBudget
        # a Ray task may use the CPUs it declares: the budget is that, whatever the node has
        return ThreadBudget.for_cells(self.cpus_per_cell, 1, self.options.get("threads", 0))

    def submit(self, tasks):
        for task in tasks:
            self.running[self.remote.remote(task, self.events)] = task

    def _drain(self) -> None:
        try:
            n = self.events.qsize()
            batch = self.events.get_nowait_batch(n) if n else []
        except self.ray.exceptions.RayError:  # the queue's node was lost: progress lines, never rows
            return
        for event in batch:
            self.on_event(event)

    def poll(self, timeout):
        if not self.running:
            self._drain()
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
        self._drain()
        done = []
        for ref in ready:
            task = self.running.pop(ref)
            try:
                row = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:  # the worker died max_retries + 1 times, or Ray failed
                row = lost_row(task, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            done.append(Done(task, row))
        return done

    def close(self):
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.running.clear()
        if not self.options.get("address"):
            self.ray.shutdown()
