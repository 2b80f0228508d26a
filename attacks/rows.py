"""Rows of one batch: the one mechanism every attack's batch runs on, PGD's ascent (attacks.ascent) and the native
engine's APGD, FAB and Square alike.

Every (point, target, restart, eps, model) an attack tries is a row, and all rows run together; each row names what
it belongs to in the caller's record (``pid``: a point; PGD's ``pos``: a point, an (eps, point) or a (model, point)
pair). Three things are shared, each declared once here:

* a hit is recorded by the first hit row of each key (:func:`first_of_each`), so two rows of one point never mix
  their writes;
* :class:`Found`, the point-level record: a point broken by any of its rows drops all of them (per-point early exit),
  and its example is that first row's;
* :func:`compaction`, when the rows that left are cut out of the batch: at once (``slack`` 0: APGD, FAB and Square,
  whose rows carry many tensors of state and die fast) or once a share ``slack`` of the batch has left (PGD's
  ascent, whose step is cheap and whose retired rows only cost their share of the pass); rows laid out in groups
  (one block per stacked model) as a rectangle, when its widest group shrinks to GROUP_COMPACT of it.

Rows note their own hits without a host sync; the batch is settled every ``sync_every`` iterations (every iteration
on CPU, where a sync is free; every few on a GPU, where it stalls the queue).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_COMPACT = 0.75  # grouped rows: compact when the widest group shrinks to this fraction of the rectangle


def sync_every(device: torch.device) -> int:
    """Iterations between settlements: 1 on CPU, 8 on an accelerator."""
    return 1 if torch.device(device).type == "cpu" else 8


def first_of_each(key: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each distinct value of ``key`` (in row order)."""
    if key.numel() == 0:
        return key
    order = torch.argsort(key, stable=True)
    ks = key[order]
    new = torch.ones_like(ks, dtype=torch.bool)
    new[1:] = ks[1:] != ks[:-1]
    return order[new]


def compaction(alive: torch.Tensor, groups: int = 1, slack: float = 0.0) -> torch.Tensor | None:
    """Index of the rows to keep, or None while compacting is not worth an index pass: ungrouped rows once more than
    a share ``slack`` of them has left (0: as soon as one has), grouped rows as the rectangle of the live ones."""
    A = alive.numel()
    if groups == 1:
        gone = A - int(alive.sum())
        return alive.nonzero().flatten() if gone > 0 and gone >= slack * A else None
    B = A // groups
    live = alive.view(groups, B)
    width = int(live.sum(1).max())
    if width > GROUP_COMPACT * B:
        return None
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)[:, :width]
    return (order + torch.arange(groups, device=alive.device)[:, None] * B).reshape(-1)


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
                first = first_of_each(p)
                uniq, idx = p[first], idx[first]
                self.x_adv[uniq] = x_rows[idx].reshape(uniq.numel(), *self.x_adv.shape[1:]).to(self.x_adv.dtype)
                self.broken[uniq] = True
        return ~self.broken[pid]


def keep(keep_rows: torch.Tensor, *tensors):
    """Each tensor restricted to the rows kept (first dimension); None stays None."""
    return tuple(None if t is None else t[keep_rows] for t in tensors)
