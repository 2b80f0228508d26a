"""Sweep specs: a TOML preset plus `key=value` overrides, validated and expanded into cells.

A spec is flat: every key is a setting. Keys named in SWEEP_AXES may hold a list; the cells are the product of those
lists. A cell is a plain dict of every setting that can change its result, and `cell_id` hashes it, so a re-run skips
finished cells and a changed setting makes a new row.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class SpecError(ValueError):
    """A bad preset, key or value; the message names it."""


THREATS = ("Linf", "L2")
AUTOATTACK_VERSIONS = ("standard", "plus", "off")

# Every key a spec may set, with its default. The type of the default is the type a value must have.
DEFAULTS: dict = {
    "description": "",
    # data
    "dataset": "mnist5k",
    "data_options": {},
    "n_train": 0,               # 0: the dataset's whole training pool
    "n_test": 0,                # 0: the dataset's whole test set
    "label_noise": 0.0,
    # model
    "model": "mlp",
    "width": 64,
    "model_options": {},
    # training
    "recipe": "erm",
    "epochs": 30,
    "optimizer": "adam",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "batch_size": 128,
    "target_train_acc": 1.0,
    "train_eps": 0.0,
    "train_norm": "Linf",
    "train_steps": 10,
    "train_step_size": 0.0,
    "train_eps_warmup": 0,
    "seed": 0,
    # evaluation
    "threat": "Linf",
    "eps_Linf": [0.05, 0.1, 0.2, 0.3],
    "eps_L2": [0.5, 1.0, 1.5, 2.0],
    "aa_eps_Linf": [0.1],       # AutoAttack runs at these eps (the headline); [] for none
    "aa_eps_L2": [1.0],
    "autoattack": "standard",
    "pgd_steps": 100,
    "pgd_restarts": 1,
    "pgd_step_size": 0.0,       # 0: 2.5·eps/steps
    "lip_points": 512,          # points per source (train, test, adversarial) for the empirical Lipschitz lower bound
}

SWEEP_AXES = ("dataset", "n_train", "label_noise", "model", "width", "recipe", "train_eps", "seed", "threat")

# Settings that describe how the run is carried out, not what is measured: not part of cell_id.
NOT_IN_CELL = ("description",)

TRAIN_KEYS = ("dataset", "data_options", "n_train", "label_noise", "model", "width", "model_options", "recipe",
              "epochs", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "target_train_acc", "train_eps",
              "train_norm", "train_steps", "train_step_size", "train_eps_warmup", "seed")


def list_presets() -> dict[str, str]:
    """Shipped presets: name -> description."""
    out = {}
    for item in sorted(resources.files("bench.presets").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            data = tomllib.loads(item.read_text())
            out[item.name[:-5]] = data.get("description", "")
    return out


def load_preset(name_or_path: str) -> dict:
    """A shipped preset by name, or a TOML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if not path.is_file():
            raise SpecError(f"preset file '{name_or_path}' not found")
        text, origin = path.read_text(), str(path)
    else:
        item = resources.files("bench.presets") / f"{name_or_path}.toml"
        if not item.is_file():
            raise SpecError(f"unknown preset '{name_or_path}' (known: {', '.join(list_presets())})")
        text, origin = item.read_text(), f"preset {name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{origin}: invalid TOML ({exc})") from None
    for key in data:
        _check_key(key, origin)
    return data


def _check_key(key: str, origin: str) -> None:
    if key not in DEFAULTS:
        import difflib
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpecError(f"{origin}: unknown key '{key}'{hint}")


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a TOML value (`width=[10,20]`, `lr=0.01`); a bare word is a string (`dataset=digits`)."""
    if "=" not in text:
        raise SpecError(f"override '{text}' is not of the form key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if raw.startswith("[") and raw.endswith("]"):  # a list may mix bare words: threat=[Linf,L2]
        items = [item.strip() for item in raw[1:-1].split(",") if item.strip()]
        return key, [_parse_value(item) for item in items]
    return key, _parse_value(raw)


def _parse_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def build_spec(preset: str = "default", overrides: list[str] = ()) -> dict:
    """Defaults, then the preset, then the overrides (dotted keys reach into option tables: data_options.d=32)."""
    spec = json.loads(json.dumps(DEFAULTS))
    spec.update(load_preset(preset))
    for text in overrides:
        key, value = parse_override(text)
        top, _, sub = key.partition(".")
        _check_key(top, "override")
        if sub:
            if not isinstance(spec[top], dict):
                raise SpecError(f"override '{key}': '{top}' is not an option table")
            spec[top] = {**spec[top], sub: value}
        else:
            spec[key] = value
    validate(spec)
    return _normalize(spec)


def _normalize(spec: dict) -> dict:
    """Floats as floats (label_noise=0 and 0.0 name the same cell), eps lists sorted."""
    out = dict(spec)
    for key, default in DEFAULTS.items():
        if isinstance(default, float):
            out[key] = [float(v) for v in out[key]] if isinstance(out[key], list) else float(out[key])
        elif isinstance(default, list):
            out[key] = sorted(float(v) for v in out[key])
    return out


def _as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(spec: dict) -> None:
    """Type and range checks; unknown models and datasets are checked against their registries by the runner."""
    for key, default in DEFAULTS.items():
        values = _as_list(spec[key]) if key in SWEEP_AXES else [spec[key]]
        if key in SWEEP_AXES and not values:
            raise SpecError(f"key '{key}': empty list")
        for v in values:
            if isinstance(default, bool):
                ok = isinstance(v, bool)
            elif isinstance(default, float):
                ok = _is_number(v)
            elif isinstance(default, int):
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif isinstance(default, list):
                ok = isinstance(v, list) and all(_is_number(e) for e in v)
            else:
                ok = isinstance(v, type(default))
            if not ok:
                raise SpecError(f"key '{key}': bad value {v!r} (expected {type(default).__name__})")
    for w in _as_list(spec["width"]):
        if w <= 0:
            raise SpecError(f"key 'width': width must be > 0, got {w}")
    for t in _as_list(spec["threat"]):
        if t not in THREATS:
            raise SpecError(f"key 'threat': unknown threat model '{t}' (known: {', '.join(THREATS)})")
    for key in ("eps_Linf", "eps_L2", "aa_eps_Linf", "aa_eps_L2", "train_eps"):
        for e in _as_list(spec[key]):
            if e < 0:
                raise SpecError(f"key '{key}': eps must be >= 0, got {e}")
    for key in ("eps_Linf", "aa_eps_Linf", "train_eps"):
        for e in _as_list(spec[key]):
            if e > 1:
                raise SpecError(f"key '{key}': eps {e} > 1 exceeds the [0,1] pixel range")
    for threat in THREATS:
        missing = set(spec[f"aa_eps_{threat}"]) - set(spec[f"eps_{threat}"])
        if missing:
            raise SpecError(f"key 'aa_eps_{threat}': {sorted(missing)} not in eps_{threat}")
    for v in _as_list(spec["label_noise"]):
        if not 0 <= v < 1:
            raise SpecError(f"key 'label_noise': must lie in [0, 1), got {v}")
    for key in ("n_train", "n_test", "epochs", "batch_size", "pgd_steps", "pgd_restarts", "train_steps",
                "lip_points", "train_eps_warmup"):
        for v in _as_list(spec[key]):
            if v < 0 or (v == 0 and key not in ("n_train", "n_test", "train_eps_warmup", "lip_points")):
                raise SpecError(f"key '{key}': bad value {v}")
    if spec["autoattack"] not in AUTOATTACK_VERSIONS:
        raise SpecError(f"key 'autoattack': unknown version '{spec['autoattack']}' "
                        f"(known: {', '.join(AUTOATTACK_VERSIONS)})")
    if not 0 < spec["target_train_acc"] <= 1:
        raise SpecError(f"key 'target_train_acc': must lie in (0, 1], got {spec['target_train_acc']}")
    if spec["lr"] <= 0:
        raise SpecError(f"key 'lr': must be > 0, got {spec['lr']}")


def expand(spec: dict, entries: list = ()) -> list[dict]:
    """The product of the sweep axes; each cell carries every setting that can change its result.

    With checkpoint entries (models.CheckpointEntry), the entries replace the model, width and training axes: each
    is evaluated as it is, on its own dataset, for every seed and threat of the spec.
    """
    if entries:
        return [cell for entry in entries for cell in _entry_cells(spec, entry)]
    axes = [(key, _as_list(spec[key])) for key in SWEEP_AXES]
    fixed = {k: v for k, v in spec.items() if k not in SWEEP_AXES and k not in NOT_IN_CELL}
    cells = []
    for combo in itertools.product(*(values for _, values in axes)):
        cell = dict(fixed)
        cell.update(zip((key for key, _ in axes), combo))
        threat = cell["threat"]
        # A cell keeps only its own threat's eps lists, so adding an L2 eps does not re-run Linf cells.
        for other in THREATS:
            if other != threat:
                cell.pop(f"eps_{other}"), cell.pop(f"aa_eps_{other}")
        cell["eps"] = sorted(cell.pop(f"eps_{threat}"))
        cell["aa_eps"] = sorted(cell.pop(f"aa_eps_{threat}")) if cell["autoattack"] != "off" else []
        if cell["recipe"] != "pgd-at":
            cell["train_eps"] = 0.0
        cells.append(cell)
    unique = {cell_id(c): c for c in cells}  # non-pgd-at recipes collapse the train_eps axis
    return list(unique.values())


def _entry_cells(spec: dict, entry) -> list[dict]:
    """Cells of an external checkpoint: identified by the entry's name and the checkpoint's sha256, not its path."""
    import models
    path = str(entry.local_path())  # a URL is downloaded once into the cache and verified by its sha256
    if not Path(path).is_file():
        raise models.ModelError(f"{entry.source}: checkpoint file '{path}' not found")
    sha = entry.sha256 or models.sha256_file(path)
    fixed = {**spec, "dataset": entry.dataset, "model": entry.model, "width": entry.width,
             "model_options": dict(entry.kwargs), "recipe": "external", "train_eps": 0.0}
    cells = expand(fixed)
    for cell in cells:
        for key in TRAIN_KEYS:
            if key not in ("dataset", "data_options", "n_train", "label_noise", "model", "width", "model_options",
                           "recipe", "train_eps", "seed"):
                cell.pop(key, None)  # training settings do not apply to a checkpoint trained elsewhere
        cell["entry"] = {"name": entry.name, "sha256": sha, "checkpoint": path}
    return cells


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def cell_id(cell: dict) -> str:
    if "entry" in cell:  # where the checkpoint file lies does not change the result
        cell = {**cell, "entry": {k: v for k, v in cell["entry"].items() if k != "checkpoint"}}
    return _digest(cell)


def train_key(cell: dict) -> str:
    """Identifies the trained weights: cells differing only in evaluation settings share one checkpoint."""
    return _digest({k: cell.get(k) for k in TRAIN_KEYS})
