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

from contextlib import contextmanager
from dataclasses import dataclass

import torch

GROUP_COMPACT = 0.75  # grouped rows: compact when the widest group shrinks to this fraction of the rectangle


def sync_every(device: torch.device) -> int:
    """Iterations between settlements: 1 on CPU, 8 on an accelerator."""
    return 1 if torch.device(device).type == "cpu" else 8


def rows_of(mask: torch.Tensor):
    """The rows ``mask`` selects, to update those alone: their indices on the CPU (choosing them costs nothing
    there), every row (a slice) on an accelerator (choosing them is a host sync)."""
    return mask.nonzero().flatten() if mask.device.type == "cpu" else slice(None)


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


# Activations a chunk of rows may hold in one forward: the small CNN's per-row cost rose by a quarter from 250 rows
# to 2,250 on this CPU (its activations, about 100 kB a row, leave the cache): native APGD-T's 9 targets on 120 points
# as one batch took 54-55 s, in chunks of 128 or 256 rows 43-46 s (same verdicts). A rule read from the model, never
# a clock: an MLP's rows (a few kB each) stay whole batches.
CHUNK_BYTES = 16 << 20
MIN_CHUNK = 64


def activation_bytes(model: torch.nn.Module, x_one: torch.Tensor) -> int:
    """Bytes of every leaf module's output in one forward of one row (a no-grad forward, hooks removed after)."""
    total = [0]

    def count(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out.numel() * out.element_size()

    from lawbench.base.modes import eval_mode
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    devices = [x_one.device] if x_one.device.type == "cuda" else []
    try:  # eval mode (no batch statistics move), the random streams untouched (a noisy model draws)
        with torch.no_grad(), eval_mode(model), torch.random.fork_rng(devices=devices):
            model(x_one)
    finally:
        for h in hooks:
            h.remove()
    return max(total[0], 1)


def bare(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without the wrappers attacks put around it (randomized, counted, chunked): a probe through it is no
    attack pass."""
    from .cost import Counted
    from .randomized import Randomized
    while isinstance(model, (Randomized, Counted, Chunked)):
        model = model.model
    return model


class Chunked(torch.nn.Module):
    """``model`` run on at most ``rows`` rows at a time (forward and, through autograd, backward): the same rows,
    the same passes, in pieces that fit the cache."""

    def __init__(self, model: torch.nn.Module, rows: int):
        super().__init__()
        self.model, self.rows = model, int(rows)

    def forward(self, x):
        if x.shape[0] <= self.rows:
            return self.model(x)
        return torch.cat([self.model(part) for part in x.split(self.rows)])


def chunked(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """``model`` in chunks of CHUNK_BYTES of activations (at least MIN_CHUNK rows); a randomized model keeps its
    wrapper outside (attacks recognise it), the chunks inside."""
    from .randomized import Randomized
    inner = model.model if isinstance(model, Randomized) else model
    rows = max(MIN_CHUNK, CHUNK_BYTES // activation_bytes(bare(inner), x[:1]))
    wrapped = Chunked(inner, rows)
    if isinstance(model, Randomized):
        return Randomized(wrapped, model.eot, model.votes).train(model.training)
    return wrapped


# Memory layout: a convolution's activations in channels-last order run a CPU's max-pooling and convolution kernels
# faster than the default order (the zoo's small CNN, 100 points at Linf 0.1: native AutoAttack standard 115 s in
# the default layout, 87 s with its weights channels-last, pyautoattack 119 s; the same passes and verdicts). Not
# measured on a GPU, so kept to the CPU.
LAYOUT_DEVICES = ("cpu",)
LAYOUT_RTOL = 1e-4  # the probe's logits may differ by float rounding, never by more


def _probe(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # a noisy model draws the same noise twice
        return model(x)


def _last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last strides, even where its own strides pass for them (one channel: a convolution reads
    the strides, not the flag)."""
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


@contextmanager
def channels_last(model: torch.nn.Module, x: torch.Tensor):
    """Inside the block, ``model``'s 4-d weights and buffers in channels-last memory (the same values; each tensor's
    own memory back afterwards), where it helps (LAYOUT_DEVICES) and holds: a model whose forward fails in that layout
    (a ``.view`` of a convolution's output) or answers beyond float rounding otherwise keeps its own layout.
    Attacks run in the block; examples are judged outside it, on the model as given."""
    held = [t for t in list(model.parameters()) + list(model.buffers()) if t.dim() == 4
            and t.stride() != _last(t).stride()]
    if not held or x.device.type not in LAYOUT_DEVICES or x.dim() != 4:
        yield model
        return
    from lawbench.base.modes import eval_mode
    old, net = [t.data for t in held], bare(model)
    with eval_mode(net):
        try:  # a model that fails in its own layout fails in the attack, where the error is reported
            ref = _probe(net, x[:2])
        except Exception:  # noqa: BLE001
            ref = None
        for t in held:
            t.data = _last(t.data)
        try:
            out = _probe(net, x[:2]) if ref is not None else None
            fits = out is not None and out.shape == ref.shape and bool(
                ((out - ref).abs() <= LAYOUT_RTOL * (1 + ref.abs().max())).all())
        except Exception:  # noqa: BLE001 - any failure in the other layout means: keep the model's own
            fits = False
    if not fits:
        for t, d in zip(held, old):
            t.data = d
        yield model
        return
    try:
        yield model
    finally:
        for t, d in zip(held, old):
            t.data = d
