"""Checkpoint saving/loading and checkpoint entries (external checkpoints evaluated without training).

A checkpoint entry is a small TOML file::

    name = "madry-mnist"          # entry name shown in results
    model = "cnn"                 # architecture entry in the model registry
    width = 16
    dataset = "mnist"
    checkpoint = "madry.pt"       # path (relative to this file's folder) or http(s):// / file:// URL
    sha256 = "..."                # required for URLs, optional (but verified) for paths
    description = "..."           # optional
    [kwargs]                      # optional extra keyword arguments of the architecture
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lawbench.base.files import atomic_output

from .registry import ModelError, _one_line, get_model

try:  # python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - python 3.10
    import tomli as _toml  # type: ignore[no-redef]

__all__ = ["save_checkpoint", "load_checkpoint", "sha256_file", "CheckpointEntry", "read_checkpoint_entry",
           "list_checkpoint_entries", "fetch_checkpoint", "default_cache_dir", "build_from_entry"]

_URL_SCHEMES = ("http", "https", "file")
# BatchNorm's counter is not a weight: checkpoints from other code bases often lack it.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(value, where: str) -> str:
    if not isinstance(value, str) or len(value.strip()) != 64 or any(c not in "0123456789abcdef"
                                                                    for c in value.strip().lower()):
        raise ModelError(f"{where}: sha256 must be 64 hexadecimal characters, got {value!r}")
    return value.strip().lower()


def save_checkpoint(module: nn.Module, path: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Write ``{"state_dict": ..., "meta": ...}`` atomically (temporary file in the same folder, fsync, os.replace).

    ``meta`` must hold only plain values (str, int, float, bool, None, lists/dicts of them) so that
    ``torch.load(weights_only=True)`` can read it back.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    payload: dict = {"state_dict": state}
    if meta is not None:
        payload["meta"] = dict(meta)
    with atomic_output(path) as f:
        torch.save(payload, f)
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _extract_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # cannot happen with weights_only=True, kept for clarity
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ModelError(f"{where}: expected a state dict (or {{'state_dict': ...}} / {{'model': ...}}), "
                         f"got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ModelError(f"{where}: entry {k!r} is not a tensor (got {type(v).__name__}); "
                             f"not a state dict")
    return dict(obj)


def _first_unsafe_global(path: Path, exc: Exception) -> str | None:
    """The first global (module.name) a checkpoint needs beyond what a weights-only load allows, or None."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            found = finder(path)
            if found:
                return str(found[0])
        except Exception:  # not a zip checkpoint, or unreadable: fall back to the error's text
            pass
    match = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", str(exc))
    return match.group(1) if match else None


def load_checkpoint(module: nn.Module, path: str | os.PathLike, sha256: str | None = None) -> nn.Module:
    """Load a checkpoint into ``module`` (in place; returns it).

    Verifies ``sha256`` when given, loads with ``torch.load(weights_only=True, map_location="cpu")``, accepts a raw
    state dict or ``{"state_dict": ...}`` / ``{"model": ...}`` (a ``module.`` prefix from DataParallel is stripped), and
    reports any architecture mismatch in one line naming the file and the first offending key.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.is_file():
        raise ModelError(f"{where}: file not found")
    if sha256 is not None:
        want = _check_sha(sha256, where)
        got = sha256_file(path)
        if got != want:
            raise ModelError(f"{where}: sha256 mismatch (expected {want}, file has {got})")
    try:
        with warnings.catch_warnings():  # torch's two-line pickle-protocol warning would precede our one line
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # any file can be handed in: whatever torch raises on it is one line
        culprit = _first_unsafe_global(path, e) if isinstance(e, pickle.UnpicklingError) else None
        if culprit:
            raise ModelError(f"{where}: refused: the file holds Python objects beyond tensors (the first is "
                             f"{culprit}); only weights (a state dict of tensors) are loaded, since unpickling "
                             f"other objects can run code") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(e), re.S)
        reason = _one_line(detail.group(1)) if detail else f"{type(e).__name__}: {_one_line(e)}"
        raise ModelError(f"{where}: not a readable torch checkpoint of tensors ({reason})") from None
    sd = _extract_state_dict(obj, where)
    expected = module.state_dict()
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in expected):
        sd = {k[len("module."):]: v for k, v in sd.items()}

    problems: list[str] = []
    for k, v in expected.items():
        if k not in sd:
            if not k.endswith(_OPTIONAL_SUFFIXES):
                problems.append(f"missing key '{k}'")
        elif tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"shape mismatch for '{k}': checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)}")
    for k in sd:
        if k not in expected:
            problems.append(f"unexpected key '{k}'")
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ModelError(f"{where} does not match the architecture: {problems[0]}{more}")
    try:
        module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # e.g. dtype that cannot be copied
        raise ModelError(f"{where}: cannot load state dict: {_one_line(e)}") from e
    return module


# --------------------------------------------------------------------------------------------- entries

@dataclass(frozen=True)
class CheckpointEntry:
    """A checkpoint entry read from TOML. ``checkpoint`` is an absolute path or a URL."""

    name: str
    model: str
    width: int
    dataset: str
    checkpoint: str
    sha256: str | None = None
    kwargs: dict = field(default_factory=dict)
    description: str = ""
    source: str = ""  # the TOML file

    @property
    def is_url(self) -> bool:
        return _is_url(self.checkpoint)

    def local_path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """Path of the checkpoint file on disk, downloading (and verifying) URLs into ``cache_dir``."""
        if self.is_url:
            return fetch_checkpoint(self.checkpoint, self.sha256, cache_dir=cache_dir)
        return Path(self.checkpoint)


def _is_url(s: str) -> bool:
    scheme = urllib.parse.urlsplit(s).scheme.lower()
    return scheme in _URL_SCHEMES


_ENTRY_KEYS = {"name", "model", "width", "dataset", "checkpoint", "sha256", "kwargs", "description"}


def read_checkpoint_entry(toml_path: str | os.PathLike) -> CheckpointEntry:
    """Parse a checkpoint-entry TOML file; every error is one :class:`ModelError` line naming the file and key."""
    toml_path = Path(toml_path)
    where = str(toml_path)
    try:
        with open(toml_path, "rb") as f:
            data = _toml.load(f)
    except FileNotFoundError:
        raise ModelError(f"{where}: checkpoint entry file not found") from None
    except OSError as e:
        raise ModelError(f"{where}: cannot read: {_one_line(e)}") from e
    except _toml.TOMLDecodeError as e:
        raise ModelError(f"{where}: invalid TOML: {_one_line(e)}") from e
    except UnicodeDecodeError as e:
        raise ModelError(f"{where}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         f"a checkpoint entry is a UTF-8 TOML file") from None

    unknown = sorted(set(data) - _ENTRY_KEYS)
    if unknown:
        raise ModelError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_ENTRY_KEYS))})")

    def req_str(key: str) -> str:
        if key not in data:
            raise ModelError(f"{where}: missing required key '{key}'")
        v = data[key]
        if not isinstance(v, str) or not v.strip():
            raise ModelError(f"{where}: key '{key}' must be a non-empty string, got {v!r}")
        return v.strip()

    name = req_str("name")
    model = req_str("model")
    dataset = req_str("dataset")
    checkpoint = req_str("checkpoint")
    if "width" not in data:
        raise ModelError(f"{where}: missing required key 'width'")
    width = data["width"]
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ModelError(f"{where}: key 'width' must be a positive integer, got {width!r}")
    sha = data.get("sha256")
    if sha is not None:
        sha = _check_sha(sha, f"{where}: key 'sha256'")
    kwargs = data.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ModelError(f"{where}: key 'kwargs' must be a table, got {kwargs!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ModelError(f"{where}: key 'description' must be a string, got {description!r}")

    if _is_url(checkpoint):
        if sha is None:
            raise ModelError(f"{where}: key 'sha256' is required when 'checkpoint' is a URL ({checkpoint})")
    else:
        p = Path(os.path.expanduser(checkpoint))
        if not p.is_absolute():
            p = toml_path.resolve().parent / p
        checkpoint = str(p)
    return CheckpointEntry(name=name, model=model, width=width, dataset=dataset, checkpoint=checkpoint, sha256=sha,
                           kwargs=dict(kwargs), description=description, source=str(toml_path))


def list_checkpoint_entries(folder: str | os.PathLike) -> list[CheckpointEntry]:
    """Read every ``*.toml`` checkpoint entry in ``folder`` (sorted by file name); duplicate names are an error."""
    entries = [read_checkpoint_entry(p) for p in sorted(Path(folder).glob("*.toml"))]
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise ModelError(f"{e.source}: checkpoint entry name '{e.name}' is also used by {seen[e.name]}")
        seen[e.name] = e.source
    return entries


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lawbench" / "checkpoints"


def fetch_checkpoint(url: str, sha256: str, *, cache_dir: str | os.PathLike | None = None,
                     timeout: float = 60.0) -> Path:
    """Download ``url`` into ``cache_dir`` (once), verified by ``sha256``; returns the cached file's path."""
    if not sha256:
        raise ModelError(f"checkpoint {url}: a sha256 is required to download it")
    sha = _check_sha(sha256, f"checkpoint {url}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in _URL_SCHEMES:
        raise ModelError(f"checkpoint {url}: unsupported URL scheme '{parts.scheme}'")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    base = os.path.basename(urllib.parse.unquote(parts.path)) or "checkpoint"
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)
    target = cache / f"{sha[:16]}-{base}"
    if target.is_file() and sha256_file(target) == sha:
        return target
    with atomic_output(target) as out:
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
            raise ModelError(f"checkpoint {url}: download failed: {_one_line(e)}") from e
        got = h.hexdigest()
        if got != sha:  # raised inside the block: the partial file is removed, the target never written
            raise ModelError(f"checkpoint {url}: sha256 mismatch after download (expected {sha}, got {got})")
    return target


def build_from_entry(entry: CheckpointEntry, *, in_shape, num_classes: int,
                     cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """Build ``entry.model`` at ``entry.width`` and load its checkpoint (downloading URLs); returns the model in eval
    mode."""
    model = get_model(entry.model, in_shape=in_shape, num_classes=num_classes, width=entry.width, **entry.kwargs)
    path = entry.local_path(cache_dir)
    load_checkpoint(model, path, sha256=entry.sha256)
    return model.eval()

