"""Sweep specs: a TOML preset plus `key=value` overrides, validated and expanded into cells.

A spec is flat: every key is a setting, declared once in SCHEMA (kind, default, range or choices, sweep axis or not),
and the whole spec is validated against it before anything runs. Sweep axes may hold a list; the cells are the product
of those lists. A cell is a plain dict of every setting that can change its result, and `cell_id` hashes it, so a
re-run skips finished cells and a changed setting makes a new row.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Callable
from importlib import resources
from pathlib import Path

from lawbench.attacks.autoattack import AA_ATTACKS, DEFAULT_IMPL, IMPLS, check_native, default_engine
from lawbench.base.names import did_you_mean
from lawbench.attacks.registry import attack_options, list_attacks, option_choices
from lawbench.attacks.threat import NORMS
from bench.train import OPTIMIZERS, RECIPES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class SpecError(ValueError):
    """A bad preset, key or value; the message names it."""


THREATS = NORMS                                   # the attack engine's norms: the threat models a cell can use
AUTOATTACK_VERSIONS = ("standard", "plus", "off")  # pyautoattack's versions, or none
AUTOATTACK_NAMES = AA_ATTACKS                      # the attacks a custom AutoAttack run may list (in its order)
AUTOATTACK_IMPL = DEFAULT_IMPL                     # the default engine (README: the evidence)
# what a cell without the key means: cells made before the key existed ran on the original, and keep their ids
ABSENT_MEANS = {"autoattack_impl": "original"}


def attack_names() -> tuple:
    """What `attacks` may name: the attack registry as it is now (plugins load before a spec is validated)."""
    return tuple(e.name for e in list_attacks())


# the PGD eps sweep, the fast suite at every other eps, AutoAttack at the headline eps: every eps verified; then the
# adaptive stage at every eps (indicators of attack failure; where one fires, attacks on the defense itself)
DEFAULT_ATTACKS = ["pgd", "fast", "autoattack", "adaptive"]
# what a cell without an `attacks` key runs: the suite before every eps was verified (such cells keep their ids)
LEGACY_ATTACKS = ["pgd", "autoattack"]
PGD_OPTIONS = {"steps": "pgd_steps", "restarts": "pgd_restarts", "step_size": "pgd_step_size"}  # [attack.pgd]
# spec keys that set an attack's option: attack -> {option: key} (the runner reads it; its default is the key's
# default, so a cell without the key runs as it was made)
KEY_OPTIONS = {"autoattack": {"version": "autoattack", "impl": "autoattack_impl"},
               "fast": {"impl": "autoattack_impl"}}
INT64_END = 2 ** 63                                # ints are int64; torch.manual_seed takes a seed below this
# Sizes a cell can hold, declared so that a typo (width=1000000000000) is refused up front, not in the cell: a
# width-2^20 MLP on MNIST is 0.8 billion weights (3 GiB); 2^31 points or dimensions are past any tensor index a
# CPU or GPU batch takes; a million epochs or steps is days per cell.
MAX_WIDTH = 2 ** 20
MAX_PARAMS = 10 ** 11
MAX_POINTS = 2 ** 31
MAX_DIM = 2 ** 31
MAX_ITERATIONS = 10 ** 6


@dataclass(frozen=True)
class Key:
    """One spec key: its kind, default and range.

    kind: "str" (any string), "choice" (one of `choices`), "int", "float" (finite), "eps" (a list of finite floats,
    each in the range, no duplicates), "table" (an option table of plain values), "choice_or_names" (one of
    `choices`, or a non-empty list of distinct names from `names`, kept in its order), "names" (a non-empty list of
    distinct names from `names`, in its order). `lo`/`hi` bound a number (or each
    eps), inclusive unless `lo_open`/`hi_open`; every int also lies below INT64_END. `sweep`: the key may hold a list
    of values, one cell per value. `min_len`: the fewest entries an eps list may have.
    """
    kind: str
    default: object
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    names: tuple | Callable[[], tuple] = ()  # a callable: a registry, read when a value is checked
    sweep: bool = False
    min_len: int = 0
    doc: str = ""

    def known(self) -> tuple:
        """The names a list may hold (a registry is read now: plugins may have added to it)."""
        return tuple(self.names()) if callable(self.names) else tuple(self.names)

    def range_text(self) -> str:
        show = (lambda v: f"{v:,}") if self.kind == "int" else (lambda v: f"{v:g}")  # noqa: E731 - 1,048,576
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {show(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {show(self.hi)}"
        if lo and hi:
            return f"in {'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}"
        return lo or hi or ""


# The one declaration of every key a spec may set: kind, default, range or choices, and whether it is a sweep axis.
# validate() reads it; DEFAULTS and SWEEP_AXES are derived from it. Sweep axes are expanded in this order.
SCHEMA: dict[str, Key] = {
    "description": Key("str", "", doc="free text; not part of the cell"),
    # data
    "dataset": Key("str", "mnist5k", sweep=True, doc="a name in the dataset registry (checked against it)"),
    "data_options": Key("table", {}, doc="dataset-specific options, e.g. gauss: d, num_classes"),
    "n_train": Key("int", 0, lo=0, hi=MAX_POINTS, sweep=True, doc="0: the dataset's whole training pool"),
    "d": Key("int", 0, lo=0, hi=MAX_DIM, sweep=True,
             doc="input dimension of synthetic data (gauss), the data_options.d sweep axis; 0: the dataset's own"),
    "n_test": Key("int", 0, lo=0, hi=MAX_POINTS, doc="0: the dataset's whole test set"),
    "label_noise": Key("float", 0.0, lo=0, hi=1, hi_open=True, sweep=True),
    # model
    "model": Key("str", "mlp", sweep=True, doc="a name in the model registry (checked after plugins load)"),
    "width": Key("int", 64, lo=0, lo_open=True, hi=MAX_WIDTH, sweep=True),
    "target_params": Key("int", 0, lo=0, hi=MAX_PARAMS, sweep=True,
                         doc="0: off; else each cell's width is the one whose parameter count is closest to this "
                             "(fixed p while d varies)"),
    "model_options": Key("table", {}),
    # training
    "recipe": Key("choice", "erm", choices=RECIPES, sweep=True),
    "epochs": Key("int", 30, lo=1, hi=MAX_ITERATIONS),
    "optimizer": Key("choice", "adam", choices=OPTIMIZERS),
    "lr": Key("float", 1e-3, lo=0, lo_open=True),
    "momentum": Key("float", 0.9, lo=0, hi=1, hi_open=True, doc="sgd only"),
    "weight_decay": Key("float", 0.0, lo=0),
    "batch_size": Key("int", 128, lo=1, hi=MAX_POINTS),
    "target_train_acc": Key("float", 1.0, lo=0, hi=1, lo_open=True),
    "train_eps": Key("float", 0.0, lo=0, hi=1, sweep=True, doc="pgd-at and ibp only; pixel units"),
    "train_norm": Key("choice", "Linf", choices=NORMS),
    "train_steps": Key("int", 10, lo=1, hi=MAX_ITERATIONS),
    "train_step_size": Key("float", 0.0, lo=0, doc="0: 2.5·eps/steps"),
    "train_eps_warmup": Key("int", 0, lo=0, hi=MAX_ITERATIONS, doc="pgd-at and ibp: epochs of eps's linear ramp"),
    "ibp_kappa": Key("float", 0.5, lo=0, hi=1, doc="ibp only: the clean loss's weight once eps has ramped up (1 "
                                                    "before; the robust loss takes the rest)"),
    "ibp_clean_epochs": Key("int", 1, lo=0, hi=MAX_ITERATIONS, doc="ibp only: clean epochs before the ramp"),
    "at_epochs": Key("int", 0, lo=0, hi=MAX_ITERATIONS,
                     doc="pgd-at only: its epochs (0: epochs, which ERM stops short of once it interpolates and PGD-AT "
                         "runs to the end)"),
    "smooth_margin": Key("float", 1.0, lo=0, lo_open=True, doc="smooth only: logit margin each training point keeps"),
    "smooth_lambda": Key("float", 1e-3, lo=0, lo_open=True, doc="smooth only: the search's first penalty"),
    "smooth_growth": Key("float", 4.0, lo=1, lo_open=True, doc="smooth only: penalty factor between stages"),
    "smooth_stages": Key("int", 6, lo=1, doc="smooth only: most growth stages"),
    "smooth_epochs": Key("int", 50, lo=1, hi=MAX_ITERATIONS, doc="smooth only: fine-tuning epochs per stage"),
    "smooth_refine": Key("int", 1, lo=0,
                         doc="smooth only: bisection steps after the first penalty that breaks the fit"),
    "smooth_lr": Key("float", 0.0, lo=0, doc="smooth only: fine-tuning learning rate; 0: lr / 10"),
    "smooth_restarts": Key("int", 2, lo=0, hi=16, doc="smooth only: attempts from ERM beyond the first, each at a "
                                                       "lower first penalty with its own batch order"),
    "smooth_scratch": Key("int", 1, lo=0, hi=1, doc="smooth only: 1 adds an attempt from a fresh initialisation "
                                                    "(hinge and penalty until it fits), 0 leaves it out"),
    "seed": Key("int", 0, lo=0, sweep=True),
    # evaluation
    "threat": Key("choice", "Linf", choices=THREATS, sweep=True),
    "eps_Linf": Key("eps", [0.05, 0.1, 0.2, 0.3], lo=0, hi=1, min_len=1, doc="pixel units, inside [0,1]"),
    "eps_L2": Key("eps", [0.5, 1.0, 1.5, 2.0], lo=0, min_len=1),
    "aa_eps_Linf": Key("eps", [0.1], lo=0, hi=1, doc="AutoAttack runs at these eps (the headline); [] for none"),
    "aa_eps_L2": Key("eps", [1.0], lo=0),
    "autoattack": Key("choice_or_names", "standard", choices=AUTOATTACK_VERSIONS, names=AUTOATTACK_NAMES,
                      doc="a pyautoattack version, off, or a list of its attacks run in that order, e.g. [apgd-ce]"),
    "autoattack_impl": Key("choice", AUTOATTACK_IMPL, choices=IMPLS,
                           doc="the engine of AutoAttack and of the fast suite: native (ours: targets and restarts "
                               "as rows, every pass counted; versions standard and rand, lists without fab) or "
                               "original (pyautoattack)"),
    "attacks": Key("names", DEFAULT_ATTACKS, names=attack_names,
                   doc="the attacks run, in order, each on the points nothing broke yet: pgd (the PGD sweep over every "
                       "eps), autoattack (the original; its version is the autoattack key), fast (an AutoAttack-grade "
                       "suite at a fraction of its cost) or any attack `bench list` shows; attacks after pgd run at "
                       "aa_eps unless their options give eps, except fast, which runs at every eps no other "
                       "AutoAttack-grade attack of the list covers; an eps where none ran is marked unverified"),
    "attack": Key("table", {}, doc="options per attack, [attack.NAME] option = value (e.g. [attack.ta-square] "
                                   "n_queries = 1000, eps = [0.1, 0.2]); [attack.pgd] steps/restarts/step_size set "
                                   "pgd_steps/pgd_restarts/pgd_step_size"),
    "pgd_steps": Key("int", 100, lo=1, hi=MAX_ITERATIONS),
    "pgd_restarts": Key("int", 1, lo=1, hi=MAX_ITERATIONS),
    "pgd_step_size": Key("float", 0.0, lo=0,
                         doc="0: the default rule, eps/2 decayed in four stages to eps/16; else a fixed step"),
    "lip_points": Key("int", 512, lo=0, hi=MAX_POINTS,
                      doc="points per source for the empirical Lipschitz lower bound; 0: all"),
    # execution
    "executor": Key("table", {}, doc="how the cells run: [executor] name = local|pool|ray|slurm and its options "
                                     "(EXECUTOR_OPTIONS); never part of a cell"),
}

EXECUTORS = ("local", "pool", "ray", "slurm")
# The [executor] table's options: option -> (its declaration, the executors that read it). How cells are run, never
# what they measure: none of it enters a cell. --executor, --threads and --address on the command line set the same.
EXECUTOR_OPTIONS: dict[str, tuple[Key, tuple]] = {
    "name": (Key("choice", "local", choices=EXECUTORS, doc="local: in this process, one cell at a time; pool: local "
                                                            "worker processes; ray: a Ray instance or cluster; "
                                                            "slurm: a SLURM job array through submitit"), EXECUTORS),
    "threads": (Key("int", 0, lo=0, doc="torch threads per cell; 0: the thread policy (bench.threads)"), EXECUTORS),
    "workers": (Key("int", 0, lo=0, doc="cells at once; 0: the CPUs this process may use / threads"), ("pool",)),
    "max_retries": (Key("int", 1, lo=0, doc="a cell whose worker died is run again this often, then failed"),
                    ("pool", "ray", "slurm")),
    "address": (Key("str", "", doc="a Ray cluster to join (ray://host:10001 or auto); '': start a local instance"),
                ("ray",)),
    "node_ip_address": (Key("str", "", doc="the address this driver's node has in the Ray cluster (as `ray start "
                                           "--node-ip-address`); '': Ray's guess"), ("ray",)),
    "num_cpus_per_cell": (Key("int", 0, lo=0, doc="CPUs each cell declares (ray) or gets (slurm --cpus-per-task); "
                                                  "0: the threads option, else 1"), ("ray", "slurm")),
    "num_gpus_per_cell": (Key("float", 0.0, lo=0, doc="GPUs each cell declares; slurm takes whole GPUs"),
                          ("ray", "slurm")),
    "partition": (Key("str", "", doc="SLURM partition; '': the cluster's default"), ("slurm",)),
    "time_min": (Key("int", 60, lo=1, doc="SLURM time limit per cell, minutes"), ("slurm",)),
    "array_parallelism": (Key("int", 64, lo=1, doc="SLURM array tasks running at once"), ("slurm",)),
    "cluster": (Key("choice", "slurm", choices=("slurm", "local"),
                    doc="slurm: submit with sbatch; local: submitit's local executor (subprocesses on this machine, "
                        "the same files and code path)"), ("slurm",)),
    "poll_seconds": (Key("float", 2.0, lo=0, lo_open=True, doc="how often the driver looks at SLURM jobs"),
                     ("slurm",)),
}

LIST_KINDS = ("eps", "choice_or_names", "names")  # kinds whose one value may be a list

DEFAULTS: dict = {key: k.default for key, k in SCHEMA.items()}
SWEEP_AXES = tuple(key for key, k in SCHEMA.items() if k.sweep)

# Settings that describe how the run is carried out, not what is measured: not part of cell_id.
NOT_IN_CELL = ("description", "executor")

SMOOTH_KEYS = tuple(key for key in SCHEMA if key.startswith("smooth_"))  # set only in cells of the smooth recipe
IBP_KEYS = tuple(key for key in SCHEMA if key.startswith("ibp_"))  # set only in cells of the ibp recipe
TRAIN_KEYS = ("dataset", "data_options", "n_train", "label_noise", "model", "width", "model_options", "recipe",
              "epochs", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "target_train_acc", "train_eps",
              "train_norm", "train_steps", "train_step_size", "train_eps_warmup", "seed") + SMOOTH_KEYS + IBP_KEYS
TRAIN_EPS_RECIPES = ("pgd-at", "ibp")  # the recipes that read train_eps (other cells carry 0)


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
        origin = str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise SpecError(f"{origin}: cannot read the preset ({exc.strerror or type(exc).__name__})") from None
        except UnicodeDecodeError as exc:
            raise SpecError(f"{origin}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                            f"a preset is a UTF-8 TOML file") from None
    else:
        item = resources.files("bench.presets") / f"{name_or_path}.toml"
        if not item.is_file():
            raise SpecError(f"unknown preset '{name_or_path}' (known: {', '.join(list_presets())})")
        text, origin = item.read_text(), f"preset {name_or_path}"
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError; an integer of 100,000 digits; deep nesting
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise SpecError(f"{origin}: invalid TOML ({why})") from None
    for key in data:
        _check_key(key, origin)
    return data


def _check_key(key: str, origin: str) -> None:
    if key not in DEFAULTS:
        raise SpecError(f"{origin}: unknown key '{key}'{did_you_mean(key, DEFAULTS)}")


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a TOML value (`width=[10,20]`, `lr=0.01`); a bare word is a string (`dataset=digits`)."""
    if "=" not in text:
        raise SpecError(f"override '{text}' is not of the form key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if raw.startswith("[") and raw.endswith("]"):  # a list may mix bare words: threat=[Linf,L2]
        items = [item.strip() for item in raw[1:-1].split(",") if item.strip()]
        return key, [parse_value(item) for item in items]
    return key, parse_value(raw)


def parse_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # not TOML (a bare word), or past what TOML reads: the text as it is
        return raw


def build_spec(preset: str = "default", overrides: list[str] = (), executor: dict | None = None) -> dict:
    """Defaults, then the preset, then the overrides (dotted keys reach into option tables: data_options.d=32), then
    ``executor``: the run command's --executor, --threads, --workers and --address, laid over the [executor] table."""
    spec = json.loads(json.dumps(DEFAULTS))
    loaded = load_preset(preset)
    spec.update(loaded)
    explicit = set()  # keys the overrides set
    attack_tables = set()  # [attack.NAME] tables the overrides reach into
    executor_given = set(executor or {})  # [executor] options the command line gives
    for text in overrides:
        key, value = parse_override(text)
        top, _, sub = key.partition(".")
        _check_key(top, "override")
        explicit.add(top)
        if top == "attack":
            attack_tables |= {sub.split(".")[0]} if sub else set(value) if isinstance(value, dict) else set()
        if top == "executor":
            executor_given |= {sub} if sub else set(value) if isinstance(value, dict) else {"name"}
        if sub:
            if not isinstance(spec[top], dict):
                raise SpecError(f"override '{key}': '{top}' is not an option table")
            spec[top] = _set_path(spec[top], sub.split(".") if top == "attack" else [sub], value, key)
        else:
            spec[key] = value
    if isinstance(spec["executor"], str):  # executor = "ray" is short for [executor] name = "ray"
        spec["executor"] = {"name": spec["executor"]}
    if isinstance(spec["executor"], dict):
        spec["executor"] = _executor_of_command_line(spec["executor"], executor or {}, executor_given)
    _fold_pgd_options(spec, explicit, loaded)
    _engine_for_version(spec, explicit, loaded)
    _drop_preset_options_of_dropped_attacks(spec, explicit, attack_tables)
    validate(spec)
    return _normalize(spec)


def _engine_for_version(spec: dict, explicit: set, loaded: dict) -> None:
    """The default engine runs what it can: a version or attack list only the original runs (`autoattack=plus`,
    untargeted `fab`) takes the original when neither the command line nor the preset chose an engine; a native
    engine asked for by name stays an error for them (validate says why)."""
    version = spec["autoattack"]
    if "autoattack_impl" in explicit or "autoattack_impl" in loaded or not isinstance(version, (str, list)) \
            or version == "off":
        return  # a value of the wrong type is validate's to refuse
    spec["autoattack_impl"] = default_engine(version)


def _executor_of_command_line(table: dict, flags: dict, given: set) -> dict:
    """The [executor] table with the command line's flags laid over; where the command line names another executor
    than the preset's, the preset's options that executor does not read are left behind (`default --executor slurm`
    drops the default pool's `workers`); options the command line itself gives stay checked."""
    table = {**table, **flags}
    name = table.get("name", "local")
    return {k: v for k, v in table.items()
            if k in given or k == "name" or k not in EXECUTOR_OPTIONS or name in EXECUTOR_OPTIONS[k][1]}


def _drop_preset_options_of_dropped_attacks(spec: dict, explicit: set, attack_tables: set) -> None:
    """A command line that sets `attacks` leaves the preset's [attack.NAME] tables of attacks it no longer runs
    behind (`law attacks=[pgd]` runs PGD alone, whatever options the preset gave its fast suite); options the command
    line itself gives an attack it does not run stay an error."""
    if "attacks" not in explicit or not isinstance(spec["attack"], dict) or not isinstance(spec["attacks"], list):
        return
    spec["attack"] = {name: options for name, options in spec["attack"].items()
                      if name in spec["attacks"] or name in attack_tables}


def _set_path(table: dict, path: list, value, key: str) -> dict:
    """A copy of `table` with table[path[0]][path[1]]... = value (attack.ta-square.n_queries=1000)."""
    head, rest = path[0], path[1:]
    if not rest:
        return {**table, head: value}
    inner = table.get(head, {})
    if not isinstance(inner, dict):
        raise SpecError(f"override '{key}': '{head}' is not an option table")
    return {**table, head: _set_path(inner, rest, value, key)}


def _normalize(spec: dict) -> dict:
    """Floats as floats (label_noise=0 and 0.0 name the same cell), eps lists sorted."""
    out = dict(spec)
    for key, k in SCHEMA.items():
        if k.kind == "float":
            out[key] = [float(v) for v in out[key]] if isinstance(out[key], list) else float(out[key])
        elif k.kind == "eps":
            out[key] = sorted(float(v) for v in out[key])
    return out


def _as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _in_range(k: Key, v) -> bool:
    if k.lo is not None and (v <= k.lo if k.lo_open else v < k.lo):
        return False
    return k.hi is None or (v < k.hi if k.hi_open else v <= k.hi)


def _plain(v) -> bool:
    """A value an option table may hold: JSON-plain and finite (it becomes part of the cell's hash)."""
    if isinstance(v, (str, bool)):
        return True
    if isinstance(v, int):
        return -INT64_END <= v < INT64_END
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_plain(e) for e in v)
    if isinstance(v, dict):
        return all(isinstance(kk, str) and _plain(e) for kk, e in v.items())
    return False


def check_value(key: str, v, k: Key | None = None) -> None:
    """One value of `key` against its declaration (SCHEMA's, unless `k` is given); SpecError names the key and the
    value."""
    k = k or SCHEMA[key]
    bad = f"key '{key}': bad value {v!r}"
    if k.kind == "str":
        if not isinstance(v, str):
            raise SpecError(f"{bad} (expected a string)")
    elif k.kind == "choice":
        if not isinstance(v, str) or v not in k.choices:
            raise SpecError(f"key '{key}': unknown value {v!r} (known: {', '.join(k.choices)})")
    elif k.kind == "choice_or_names":
        if isinstance(v, list):
            if not v:
                raise SpecError(f"key '{key}': empty list (name at least one of: {', '.join(k.names)})")
            for name in v:
                if not isinstance(name, str) or name not in k.names:
                    raise SpecError(f"key '{key}': unknown attack {name!r} in {v!r} (known: {', '.join(k.names)})")
            if len(set(v)) != len(v):
                raise SpecError(f"key '{key}': an attack is listed twice in {v!r}")
        elif not isinstance(v, str) or v not in k.choices:
            raise SpecError(f"key '{key}': unknown value {v!r} (known: {', '.join(k.choices)}, or a list of "
                            f"{', '.join(k.names)})")
    elif k.kind == "names":
        known = k.known()
        if not isinstance(v, list) or not v:
            raise SpecError(f"key '{key}': expected a non-empty list of names (known: {', '.join(known)})")
        for name in v:
            if not isinstance(name, str) or name not in known:
                raise SpecError(f"key '{key}': unknown name {name!r}{did_you_mean(str(name), known)} "
                                f"(`python -m bench list` shows them)")
        if len(set(v)) != len(v):
            raise SpecError(f"key '{key}': a name is listed twice in {v!r}")
    elif k.kind == "table":
        if not isinstance(v, dict):
            raise SpecError(f"{bad} (expected an option table)")
        for name, item in v.items():
            if not _plain(item):
                raise SpecError(f"key '{key}.{name}': bad value {item!r} (expected a finite number, string, bool "
                                f"or a list/table of them)")
    elif k.kind == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            raise SpecError(f"{bad} (expected an integer)")
        if not _in_range(k, v) or not -INT64_END <= v < INT64_END:
            below = "" if k.hi is not None and k.hi < INT64_END else " and below 2**63"
            raise SpecError(f"key '{key}': must be an integer {k.range_text()}{below}, got {v}")
    elif k.kind == "float":
        if not _is_number(v):
            raise SpecError(f"{bad} (expected a number)")
        if not math.isfinite(v) or not _in_range(k, v):
            raise SpecError(f"key '{key}': must be a finite number {k.range_text()}, got {v!r}")
    elif k.kind == "eps":
        if not isinstance(v, list) or not all(_is_number(e) for e in v):
            raise SpecError(f"{bad} (expected a list of numbers)")
        if len(v) < k.min_len:
            raise SpecError(f"key '{key}': needs at least {k.min_len} eps, got an empty list")
        for e in v:
            if not math.isfinite(e) or not _in_range(k, e):
                what = ", the pixel range" if k.hi == 1 else ""
                raise SpecError(f"key '{key}': eps must be finite and {k.range_text()}{what}, got {e!r}")
        if len(set(map(float, v))) != len(v):
            raise SpecError(f"key '{key}': duplicate eps in {v}")
    else:  # pragma: no cover - a declaration error
        raise AssertionError(f"SCHEMA['{key}']: unknown kind {k.kind!r}")


def validate(spec: dict) -> None:
    """Every key against SCHEMA (type, range, choices; lists only on sweep axes), then the rules between keys.

    Unknown models and datasets are checked against their registries before any cell runs (bench.run.check_inputs).
    """
    for key in spec:
        _check_key(key, "spec")
    for key, k in SCHEMA.items():
        value = spec[key]
        if isinstance(value, list) and not k.sweep and k.kind not in LIST_KINDS:
            raise SpecError(f"key '{key}': takes one value, not a list {value!r} "
                            f"(lists are for the sweep axes: {', '.join(SWEEP_AXES)})")
        if k.sweep and isinstance(value, list):
            if not value:
                raise SpecError(f"key '{key}': empty list")
            values = value
        else:
            values = [value]
        for v in values:
            check_value(key, v)
    if _as_list(spec["d"]) != [0] and "d" in spec["data_options"]:
        raise SpecError("key 'd': also set as data_options.d; give the input dimension once")
    if _as_list(spec["target_params"]) != [0] and isinstance(spec["width"], list) and len(spec["width"]) > 1:
        raise SpecError("key 'target_params': chooses each cell's width; drop the width list "
                        f"{spec['width']} (or set target_params=0)")
    executor_options(spec["executor"])
    check_attack_options(spec)
    if spec["autoattack_impl"] == "native" and spec["autoattack"] != "off":
        try:
            check_native(spec["autoattack"])
        except Exception as exc:
            raise SpecError(f"key 'autoattack': {exc}") from None
    for threat in THREATS:
        missing = set(spec[f"aa_eps_{threat}"]) - set(spec[f"eps_{threat}"])
        if missing:
            raise SpecError(f"key 'aa_eps_{threat}': {sorted(missing)} not in eps_{threat}")


def check_attack_options(spec: dict) -> None:
    """[attack.NAME] tables: each for an attack the spec runs, each option one the attack accepts, an `eps` list
    inside the eps sweep of every threat swept."""
    threats = _as_list(spec["threat"])
    for name, options in spec["attack"].items():
        if name not in spec["attacks"]:
            raise SpecError(f"key 'attack.{name}': options for an attack not in attacks {spec['attacks']}")
        if not isinstance(options, dict):
            raise SpecError(f"key 'attack.{name}': expected a table of options, got {options!r}")
        known = set(attack_options(name)) | {"eps"}
        for option, value in options.items():
            where = f"key 'attack.{name}.{option}'"
            if option not in known:
                raise SpecError(f"{where}: unknown option of attack '{name}' (known: {', '.join(sorted(known))})")
            _check_option_value(where, value, attack_options(name).get(option))
            choices = option_choices(name).get(option)
            if choices is not None and value not in choices:
                raise SpecError(f"{where}: must be one of {list(choices)}, got {value!r}")
            if name == "autoattack" and option == "version":
                raise SpecError(f"{where}: AutoAttack's version is the autoattack key (autoattack = \"plus\")")
            if option == "eps":
                check_value(f"attack.{name}.eps", value, Key("eps", [], lo=0, min_len=1))
                for threat in threats:
                    missing = sorted(set(map(float, value)) - set(map(float, spec[f"eps_{threat}"])))
                    if missing:
                        raise SpecError(f"{where}: {missing} not in eps_{threat}")


def _check_option_value(where: str, value, default) -> None:
    """An attack option takes its default's type (bool, int, number, string), and a number whose default is
    positive (steps, queries, restarts, step sizes) must be positive: `square_queries = -5` would run no query and
    store every point as robust."""
    if default is None or option_is_free(default):
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise SpecError(f"{where}: expected {type(default).__name__} like its default {default!r}, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0 and not value > 0:
        raise SpecError(f"{where}: must be > 0, got {value!r}")


def option_is_free(default) -> bool:
    """Defaults of no checkable type (tuples, callables) leave the value to the attack."""
    return not isinstance(default, (bool, int, float, str))


def _fold_pgd_options(spec: dict, overridden: set, preset: dict) -> None:
    """[attack.pgd] steps/restarts/step_size are pgd_steps/pgd_restarts/pgd_step_size: one setting, one place in
    the cell. They override the preset's pgd_* keys; both given at one level (preset, or command line) with
    different values is refused."""
    table = spec["attack"]
    if not isinstance(table, dict) or not isinstance(table.get("pgd", {}), dict):
        return  # validate() names what is wrong
    options = dict(table.get("pgd", {}))
    preset_attack = preset.get("attack")
    preset_pgd = preset_attack.get("pgd", {}) if isinstance(preset_attack, dict) else {}
    for option, key in PGD_OPTIONS.items():
        if option in options:
            value = options.pop(option)
            same_level = key in overridden and "attack" in overridden or key in preset and option in preset_pgd
            if same_level and spec[key] != value:
                raise SpecError(f"key 'attack.pgd.{option}': {value!r} contradicts {key} = {spec[key]!r}")
            spec[key] = value
    if "pgd" in spec["attack"]:
        spec["attack"] = {**spec["attack"], "pgd": options} if options else {
            k: v for k, v in spec["attack"].items() if k != "pgd"}


def executor_options(table: dict) -> dict:
    """The [executor] table checked against EXECUTOR_OPTIONS (each option known, read by the executor named, its
    value in range) and completed with the defaults of the options that executor reads."""
    name = table.get("name", "local")
    check_value("executor.name", name, EXECUTOR_OPTIONS["name"][0])
    out = {}
    for option, (k, users) in EXECUTOR_OPTIONS.items():
        if name in users:
            out[option] = table.get(option, k.default)
    for option, value in table.items():
        if option not in EXECUTOR_OPTIONS:
            raise SpecError(f"key 'executor.{option}': unknown executor option{did_you_mean(option, EXECUTOR_OPTIONS)}")
        k, users = EXECUTOR_OPTIONS[option]
        if name not in users:
            raise SpecError(f"key 'executor.{option}': an option of {'/'.join(users)}, not of executor '{name}'")
        check_value(f"executor.{option}", value, k)
    if name == "slurm" and out["num_gpus_per_cell"] != int(out["num_gpus_per_cell"]):
        raise SpecError(f"key 'executor.num_gpus_per_cell': SLURM allocates whole GPUs, got "
                        f"{out['num_gpus_per_cell']!r}")
    for option, (k, _) in EXECUTOR_OPTIONS.items():
        if k.kind == "float" and option in out:
            out[option] = float(out[option])
    return out


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
        if cell["recipe"] == "ibp" and cell["train_norm"] != "Linf":
            raise SpecError(f"key 'train_norm': recipe 'ibp' trains against Linf balls only, got {cell['train_norm']!r}")
        if cell["recipe"] not in TRAIN_EPS_RECIPES:
            cell["train_eps"] = 0.0
        at_epochs = cell.pop("at_epochs")  # a pgd-at cell's epochs: the cell reads as one given epochs=at_epochs
        if cell["recipe"] == "pgd-at" and at_epochs:
            cell["epochs"] = at_epochs
        d = cell.pop("d")
        if d:  # the d axis is the dataset's d option: a cell names it there, as data_options.d=... would
            cell["data_options"] = {**cell["data_options"], "d": d}
        if not cell["target_params"]:  # a cell sized by its width alone: no key, so its id is as before
            cell.pop("target_params")
        if cell["autoattack_impl"] == ABSENT_MEANS["autoattack_impl"]:  # cells with no key: ids as before
            cell.pop("autoattack_impl")
        if cell["attacks"] == LEGACY_ATTACKS and not cell["attack"]:  # the suite of cells with no key: ids as before
            cell.pop("attacks"), cell.pop("attack")
        for recipe, keys in (("smooth", SMOOTH_KEYS), ("ibp", IBP_KEYS)):
            if cell["recipe"] != recipe:  # other recipes ignore them: their cells (and ids) do not change with them
                for key in keys:
                    cell.pop(key)
        cells.append(cell)
    unique = {cell_id(c): c for c in cells}  # recipes without train_eps collapse its axis
    return list(unique.values())


def _entry_cells(spec: dict, entry) -> list[dict]:
    """Cells of an external checkpoint: identified by the entry's name and the checkpoint's sha256, not its path."""
    from lawbench import models
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
    return _digest({k: cell[k] for k in TRAIN_KEYS if k in cell})
