"""`local`: the cells run one after another in the driver's own process (no start-up cost, one shared data cache)."""
from __future__ import annotations

from collections import deque

from bench.executors.base import Done, Executor, execute


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, options, on_event, out_dir):
        super().__init__(options, on_event, out_dir)
        self.queue = deque()

    def submit(self, tasks):
        self.queue.extend(tasks)

    def poll(self, timeout):
        if not self.queue:
            return []
        task = self.queue.popleft()
        return [Done(task, execute(task, self.on_event))]
