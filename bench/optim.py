"""torch's optimizers, stepped without importing torch._dynamo.

An optimizer imports torch._dynamo (and sympy with it) when it is built, zeroes its gradients or steps, only to mark
code torch.compile must not trace: 4.5 s in every fresh process that trains (a cell run by the CLI, each pool or Ray
worker, each test's subprocess), more than a tiny cell's whole run. Training here is never compiled, so these call
what those wrappers wrap: the same arithmetic, bit for bit (tests/test_optim.py), and torch.optim's own methods
wherever anything else could be asked of them (hooks, a differentiable optimizer, or torch._dynamo already loaded).
"""
from __future__ import annotations

import inspect
import sys

import torch


def _eager() -> bool:
    """torch._dynamo is not loaded: nothing can be compiling, so its markers have nothing to mark."""
    return "torch._dynamo" not in sys.modules


def build(cls: type[torch.optim.Optimizer], params, **options) -> torch.optim.Optimizer:
    """``cls(params, **options)``. Building adds the parameter groups through a method wrapped to keep
    torch.compile out; its wrapper keeps the function it calls on the wrapped function once it has loaded
    torch._dynamo, so it is given that function (the wrapped one itself, as torch.compile's absence makes it)."""
    if _eager():
        inner = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__", None)
        if inner is not None and getattr(inner, "__dynamo_disable", None) is None:
            inner.__dynamo_disable = inner
    return cls(params, **options)


def zero_grad(opt: torch.optim.Optimizer) -> None:
    """``opt.zero_grad(set_to_none=True)``: every parameter's gradient dropped."""
    if not _eager():
        opt.zero_grad(set_to_none=True)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


def _hooked(opt: torch.optim.Optimizer) -> bool:
    """Step hooks on this optimizer or on every optimizer: its wrapper runs them, so it steps."""
    from torch.optim import optimizer as module
    hooks = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
    return any(getattr(module, h, None) for h in hooks) or any(
        getattr(opt, h, None) for h in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"))


def step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``: the optimizer's own step function, gradients off (what its wrapper does outside torch.compile;
    the profiler's label and the step-count bookkeeping of learning-rate schedulers, which no cell uses, are left)."""
    raw = inspect.unwrap(type(opt).step)
    if not _eager() or opt.defaults.get("differentiable") or _hooked(opt) or raw is type(opt).step:
        opt.step()
        return
    with torch.no_grad():
        raw(opt)
