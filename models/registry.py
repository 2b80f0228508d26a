"""Model registry (torchvision ``register_model`` / timm style), parameter counting and plugin loading."""
from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import importlib.util
import inspect
import numbers
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lawbench.base.names import did_you_mean

__all__ = ["ModelError", "ModelEntry", "register_model", "unregister_model", "list_models", "get_entry", "get_model",
           "count_params", "param_count", "load_plugin", "load_entry_points", "ENTRY_POINT_GROUP",
           "LEGACY_ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "lawbench.models"
LEGACY_ENTRY_POINT_GROUP = "bench.models"  # the group's name before the lawbench namespace; still read, deprecated
_INPUTS = ("any", "image", "vector")


class ModelError(ValueError):
    """A model-related failure, described in one line that names the model, value, file or key at fault."""


def _one_line(text: object) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= 300 else s[:297] + "..."


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture. ``fn(in_shape, num_classes, width, **kw) -> nn.Module``."""

    name: str
    family: str
    fn: Callable[..., nn.Module]
    default_widths: tuple[int, ...]
    inputs: str = "any"  # "any" (image or vector), "image" (C, H, W) only, "vector" (d,) only
    description: str = ""
    datasets: tuple[str, ...] = ()  # recommended dataset names
    module: str = field(default="", compare=False)  # where the entry was registered (built-in or plugin module)

    def build(self, *, in_shape, num_classes: int, width: int, **kw) -> nn.Module:
        return get_model(self.name, in_shape=in_shape, num_classes=num_classes, width=width, **kw)


_REGISTRY: dict[str, ModelEntry] = {}


def _check_width(width, where: str) -> int:
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width <= 0:
        raise ModelError(f"{where}: width must be a positive integer, got {width!r}")
    return int(width)


def register_model(name: str, *, family: str | None = None, default_widths=(), inputs: str = "any",
                   description: str = "", datasets=()):
    """Decorator registering ``fn(in_shape, num_classes, width, **kw) -> nn.Module`` under ``name``.

    A name can be registered once (a second registration is a :class:`ModelError`).
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ModelError(f"register_model: model name must be a non-empty string without surrounding spaces, "
                         f"got {name!r}")
    if inputs not in _INPUTS:
        raise ModelError(f"register_model('{name}'): inputs must be one of {', '.join(_INPUTS)}, got {inputs!r}")
    if isinstance(default_widths, int):
        default_widths = (default_widths,)
    widths = tuple(_check_width(w, f"register_model('{name}') default_widths") for w in default_widths)
    if isinstance(datasets, str):
        datasets = (datasets,)
    datasets = tuple(str(d) for d in datasets)

    def deco(fn: Callable[..., nn.Module]):
        if not callable(fn):
            raise ModelError(f"register_model('{name}'): decorated object is not callable")
        if name in _REGISTRY:
            prev = _REGISTRY[name]
            raise ModelError(f"model '{name}' is already registered (by {prev.module or 'unknown module'}); "
                             f"choose another name")
        _REGISTRY[name] = ModelEntry(
            name=name, family=family or name, fn=fn, default_widths=widths, inputs=inputs,
            description=_one_line(description or (inspect.getdoc(fn) or "").split("\n")[0]), datasets=datasets,
            module=getattr(fn, "__module__", "") or "")
        return fn

    return deco


def unregister_model(name: str) -> ModelEntry:
    """Remove ``name`` from the registry (returns the removed entry); unknown names are a :class:`ModelError`."""
    entry = get_entry(name)
    del _REGISTRY[name]
    return entry


def list_models(pattern: str = "*") -> list[ModelEntry]:
    """Registered entries whose name matches the shell-style ``pattern`` (case-sensitive), sorted by name."""
    return [e for n, e in sorted(_REGISTRY.items()) if fnmatch.fnmatchcase(n, pattern)]


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    known = sorted(_REGISTRY)
    raise ModelError(f"unknown model {name!r}{did_you_mean(name, known, n=3, cutoff=0.5)} "
                     f"(known: {', '.join(known) or 'none'})")


def _check_in_shape(in_shape, where: str) -> tuple[int, ...]:
    if isinstance(in_shape, torch.Size):
        in_shape = tuple(in_shape)
    if isinstance(in_shape, int):
        in_shape = (in_shape,)
    try:
        shape = tuple(in_shape)
    except TypeError:
        raise ModelError(f"{where}: in_shape must be (d,) or (C, H, W), got {in_shape!r}") from None
    if len(shape) not in (1, 3) or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0
                                       for s in shape):
        raise ModelError(f"{where}: in_shape must be (d,) or (C, H, W) of positive integers, got {in_shape!r}")
    return tuple(int(s) for s in shape)


def _check_kwargs(entry: ModelEntry, kw: dict) -> None:
    try:
        sig = inspect.signature(entry.fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                and n not in ("in_shape", "num_classes", "width")]
    for key in kw:
        if key not in accepted:
            raise ModelError(f"model '{entry.name}' has no option {key!r} "
                             f"(options: {', '.join(accepted) or 'none'})")


def get_model(name: str, *, in_shape, num_classes: int, width: int, **kw) -> nn.Module:
    """Build the registered model ``name`` for inputs of shape ``in_shape`` ((d,) or (C, H, W))."""
    entry = get_entry(name)
    where = f"model '{name}'"
    width = _check_width(width, where)
    shape = _check_in_shape(in_shape, where)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ModelError(f"{where}: num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if entry.inputs == "image" and len(shape) != 3:
        raise ModelError(f"{where} needs image input (C, H, W) but got in_shape {shape}; "
                         f"use a dataset with image shape or an 'any'-input model such as 'mlp'")
    if entry.inputs == "vector" and len(shape) != 1:
        raise ModelError(f"{where} needs vector input (d,) but got in_shape {shape}")
    _check_kwargs(entry, kw)
    try:
        model = entry.fn(shape, num_classes, width, **kw)
    except ModelError:
        raise
    except Exception as e:  # plugin code: report in one line, keep the chain for debugging
        raise ModelError(f"{where} failed to build (in_shape={shape}, width={width}): "
                         f"{type(e).__name__}: {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}: builder returned {type(model).__name__}, not an nn.Module")
    return model


def count_params(module: nn.Module) -> int:
    """Exact number of trainable parameters (``requires_grad``; shared parameters counted once)."""
    total = 0
    for name, p in module.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ModelError(f"count_params: parameter '{name}' is uninitialized (lazy module); "
                             f"run one forward pass first")
        if p.requires_grad:
            total += p.numel()
    return int(total)


def param_count(name: str, *, in_shape, num_classes: int, width: int, **kw) -> int:
    """Trainable parameter count of a model without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        model = get_model(name, in_shape=in_shape, num_classes=num_classes, width=width, **kw)
    return count_params(model)


# --------------------------------------------------------------------------------------------------- plugins

def _new_names(before: set[str]) -> list[str]:
    return sorted(set(_REGISTRY) - before)


def load_plugin(spec: str) -> list[str]:
    """Import a user module (dotted name, or a path to a ``.py`` file) whose ``@register_model`` decorators add entries.

    Returns the names it registered. Any failure is a one-line :class:`ModelError` naming the module.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"model plugin must be a module name or a .py path, got {spec!r}")
    spec = spec.strip()
    before = set(_REGISTRY)
    try:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            path = os.path.abspath(spec)
            if not os.path.isfile(path):
                raise ModelError(f"cannot load model plugin '{spec}': file not found")
            mod_name = "_bench_model_plugin_" + os.path.splitext(os.path.basename(path))[0]
            if mod_name in sys.modules and getattr(sys.modules[mod_name], "__file__", None) == path:
                return []
            ispec = importlib.util.spec_from_file_location(mod_name, path)
            if ispec is None or ispec.loader is None:
                raise ModelError(f"cannot load model plugin '{spec}': not a Python file")
            module = importlib.util.module_from_spec(ispec)
            sys.modules[mod_name] = module
            try:
                ispec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            importlib.import_module(spec)
    except ModelError as e:
        msg = str(e)
        raise ModelError(msg if msg.startswith("cannot load model plugin") else
                         f"cannot load model plugin '{spec}': {msg}") from e
    except SystemExit as e:  # a plugin must not end the process: it is refused like any other failure
        raise ModelError(f"cannot load model plugin '{spec}': it called sys.exit({e.code!r}) while importing") from None
    except Exception as e:
        raise ModelError(f"cannot load model plugin '{spec}': {type(e).__name__}: {_one_line(e)}{_renamed(e)}") from e
    return _new_names(before)


_LIBRARIES = ("attacks", "models", "datasets", "certify", "reports")


def _renamed(exc: Exception) -> str:
    """A hint for a plugin written against the old top-level names (`from models import register_model`)."""
    name = getattr(exc, "name", None)
    if isinstance(exc, ModuleNotFoundError) and name and name.split(".")[0] in _LIBRARIES:
        return f" (the library is now lawbench.{name}: write `from lawbench.{name.split('.')[0]} import ...`)"
    return ""


_LOADED_EPS: set[tuple[str, str, str]] = set()


def _select_entry_points(group: str):
    eps = importlib.metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=group))
    return list(eps.get(group, ()))  # pragma: no cover - python < 3.10


def load_entry_points(group: str | None = None, deprecated: Callable[[str], None] | None = None) -> list[str]:
    """Load every installed entry point of ``group``; returns the model names they registered.

    Each entry point's object is either a module (imported for its ``@register_model`` side effects) or a callable
    taking no arguments that registers models. Entry points already loaded are skipped, so calling this twice is
    harmless. A broken entry point is a one-line :class:`ModelError` naming it. group None: ENTRY_POINT_GROUP and
    the deprecated LEGACY_ENTRY_POINT_GROUP, each entry point of which is also reported through ``deprecated`` (one
    line; default: a FutureWarning).
    """
    if group is None:
        names = load_entry_points(ENTRY_POINT_GROUP)
        for ep in _select_entry_points(LEGACY_ENTRY_POINT_GROUP):
            if (LEGACY_ENTRY_POINT_GROUP, ep.name, ep.value) in _LOADED_EPS:
                continue
            msg = (f"model entry point '{ep.name} = {ep.value}' uses the deprecated group "
                   f"'{LEGACY_ENTRY_POINT_GROUP}': rename it to '{ENTRY_POINT_GROUP}' in its package's pyproject.toml")
            if deprecated is None:
                warnings.warn(msg, FutureWarning, stacklevel=2)
            else:
                deprecated(msg)
        return names + load_entry_points(LEGACY_ENTRY_POINT_GROUP)
    importlib.invalidate_caches()
    before = set(_REGISTRY)
    seen: set[tuple[str, str, str]] = set()
    for ep in _select_entry_points(group):
        key = (group, ep.name, ep.value)
        if key in seen or key in _LOADED_EPS:
            continue
        seen.add(key)
        label = f"model entry point '{ep.name} = {ep.value}' (group {group})"
        try:
            obj = ep.load()
            if not isinstance(obj, types.ModuleType):
                if not callable(obj):
                    raise ModelError(f"{label}: object is neither a module nor a callable")
                obj()
        except ModelError as e:
            msg = str(e)
            raise ModelError(msg if msg.startswith(label) else f"{label} failed: {msg}") from e
        except SystemExit as e:
            raise ModelError(f"{label} failed: it called sys.exit({e.code!r}) while loading") from None
        except Exception as e:
            raise ModelError(f"{label} failed: {type(e).__name__}: {_one_line(e)}{_renamed(e)}") from e
        _LOADED_EPS.add(key)
    return _new_names(before)
