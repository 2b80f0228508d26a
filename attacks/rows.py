"""Rows of one batch: every (point, target class, restart) an attack tries is a row, and all rows run together.

A point broken by any of its rows drops all of them (per-point early exit): the rows of a broken point cost nothing
more. Rows note their own hits without a host sync (``note``); the batch is settled and compacted every
``sync_every`` iterations (every iteration on CPU, where a sync is free; every few on a GPU, where it stalls the
queue), which is when the rows of broken points leave.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def sync_every(device: torch.device) -> int:
    """Iterations between settlements: 1 on CPU, 8 on an accelerator."""
    return 1 if torch.device(device).type == "cpu" else 8


@dataclass
class Found:
    """Point-level result: broken (N,) and the example found for each broken point (like x)."""

    broken: torch.Tensor
    x_adv: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor, broken: torch.Tensor | None = None) -> "Found":
        b = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if broken is None else broken.clone()
        return cls(b, x.detach().clone())

    def settle(self, pid: torch.Tensor, hit: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
        """Rows ``hit`` found an example (x_rows, shaped like the rows): the first such row of each point not yet
        broken gives the point its example. Returns the rows to keep (their point still unbroken)."""
        idx = hit.nonzero().flatten()
        if idx.numel():
            p = pid[idx]
            fresh = ~self.broken[p]
            idx, p = idx[fresh], p[fresh]
            if idx.numel():
                uniq, inv = torch.unique(p, return_inverse=True)
                first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long, device=idx.device)
                first = first.scatter_reduce(0, inv, torch.arange(idx.numel(), device=idx.device), "amin")
                self.x_adv[uniq] = x_rows[idx[first]].reshape(uniq.numel(), *self.x_adv.shape[1:]).to(
                    self.x_adv.dtype)
                self.broken[uniq] = True
        return ~self.broken[pid]


def keep(keep_rows: torch.Tensor, *tensors):
    """Each tensor restricted to the rows kept (first dimension); None stays None."""
    return tuple(None if t is None else t[keep_rows] for t in tensors)
