"""Eval mode for a block of work, every module's own mode back afterwards."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block; afterwards each submodule gets back the mode it had (a model may keep a
    submodule in a mode of its own: ``model.train(was)`` would overwrite it)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag
