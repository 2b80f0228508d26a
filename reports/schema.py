"""The result row, declared once: every key a row of `results.jsonl` may carry, with its type, unit, whether every row
has it, the phase of a cell that writes it and what it means. The mirror of the spec's SCHEMA (bench/spec.py).

The runner builds rows from it (every required key starts null) and refuses to write a key it does not declare; the
invariant check, the reports' columns and accuracy maps, `bench report`'s row check, the README's row table and the
tests all read it. Accuracy maps are keyed by eps as text: ``eps_key`` writes the key, ``parse_eps_key`` reads it
back, the one pair every reader and writer goes through (a key another writer spelt "0.10" reads back as 0.1).

    check_row(row)      -> the problems of one row ([] when it matches the schema)
    undeclared(row)     -> the keys a row carries that the schema does not declare
    markdown_table()    -> the README's row table
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache

# kinds: what a value must be (null is allowed where `nullable`, and in every measured key of a failed row), in words
# and as a test of a value against its field (the field gives a number's range)
def _number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer past every float: no number a report can read
        return False


def _in_range(f, v) -> bool:
    return (f.lo is None or v >= f.lo) and (f.hi is None or v <= f.hi)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _eps_map(v, value_ok) -> bool:
    return isinstance(v, dict) and all(parse_eps_key(k) is not None and value_ok(a) for k, a in v.items())


KINDS = {
    "str": ("string", lambda f, v: isinstance(v, str)),
    "int": ("integer", lambda f, v: isinstance(v, int) and not isinstance(v, bool) and _in_range(f, v)),
    "float": ("finite number", lambda f, v: _number(v) and _in_range(f, v)),
    "bool": ("boolean", lambda f, v: isinstance(v, bool)),
    "names": ("list of strings", lambda f, v: _strings(v)),
    "eps_list": ("list of finite numbers", lambda f, v: isinstance(v, list)
                 and all(_number(e) and _in_range(f, e) for e in v)),
    "acc_map": ("map eps → accuracy in [0,1] or null",
                lambda f, v: _eps_map(v, lambda a: a is None or (_number(a) and _in_range(f, a)))),
    "bool_map": ("map eps → boolean", lambda f, v: _eps_map(v, lambda b: isinstance(b, bool))),
    "object": ("JSON object", lambda f, v: isinstance(v, dict)),
    "list": ("JSON array", lambda f, v: isinstance(v, list)),
    "version": ("string or list of strings", lambda f, v: isinstance(v, str) or _strings(v)),
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    phase: str
    meaning: str
    unit: str = ""
    required: bool = False
    nullable: bool = True  # may be null in an ok row
    lo: float | None = None  # inclusive bounds of a number (or of every accuracy in a map)
    hi: float | None = None
    detail: bool = False  # the store keeps it for the record; no report reads it, so their reader leaves it out


ACC = dict(unit="fraction", lo=0.0, hi=1.0)

# phases: cell (from the cell's config), data, model, train, fit (after training), attack, lipschitz, certify, law,
# run (how the cell ran)
FIELDS: tuple[Field, ...] = (
    # identity
    Field("cell_id", "str", "cell", "hash of the cell's canonical config (a re-run skips it)", required=True,
          nullable=False),
    Field("bench_version", "str", "cell", "lawbench version that wrote the row", required=True, nullable=False),
    Field("status", "str", "run", '"ok" or "failed"', required=True, nullable=False),
    Field("error", "str", "run", "the failure, one line (null when ok)", required=True),
    Field("traceback", "str", "run", "the failure's traceback (failed rows)"),
    Field("cell", "object", "cell", "the cell's full config as it was run"),
    Field("dataset", "str", "cell", "dataset registry name", required=True, nullable=False),
    Field("label_noise", "float", "cell", "fraction of training labels flipped", "fraction", True, False, 0.0, 1.0),
    Field("model", "str", "cell", "model registry name, or the checkpoint entry's name", required=True, nullable=False),
    Field("width", "int", "cell", "the family's width parameter", required=True, nullable=False),
    Field("recipe", "str", "cell", "erm, pgd-at, ibp or smooth", required=True, nullable=False),
    Field("train_eps", "float", "cell", "adversarial or certified training radius (pgd-at, ibp)", "pixels", True,
          lo=0.0),
    Field("seed", "int", "cell", "the cell's seed (data subset, init, attacks)", required=True, nullable=False, lo=0),
    Field("threat", "str", "cell", "Linf or L2", required=True, nullable=False),
    Field("eps", "eps_list", "cell", "the attacked radii", "pixels", True, False, 0.0),
    Field("autoattack", "version", "cell", "AutoAttack version (standard, plus, off) or its list of attacks"),
    # data
    Field("data_source", "str", "data", "where the data came from (embedded, file, synthetic)"),
    Field("n_train", "int", "data", "training points n", "points", True, lo=0),
    Field("n_test", "int", "data", "evaluation points", "points", True, lo=0),
    Field("d", "int", "data", "input dimension d", required=True, lo=1),
    Field("d_eff", "float", "data", "Levina-Bickel intrinsic dimension of the training inputs", required=True,
          lo=0.0),
    Field("num_classes", "int", "data", "classes", required=True, lo=1),
    Field("n_noisy", "int", "data", "training labels flipped", "points", lo=0),
    Field("data_scale", "float", "data", "the synthetic data's pixel scale (gauss)"),
    Field("data_margin", "float", "data", "the teacher's margin gamma in the law's units (gauss; 0: none): every "
          "input lies at least gamma from the teacher's boundary", lo=0.0),
    # model
    Field("family", "str", "model", "model family (mlp, cnn, ...)", required=True),
    Field("params", "int", "model", "trainable parameters p (a model has at least one)", required=True,
          nullable=False, lo=1),
    Field("architecture", "str", "model", "registry model of a checkpoint entry"),
    Field("checkpoint_sha256", "str", "model", "sha256 of a checkpoint entry's file"),
    # training
    Field("epochs_run", "int", "train", "epochs trained", lo=0),
    Field("checkpoint_cached", "bool", "train", "the checkpoint was reused, not trained"),
    Field("train_key", "str", "train", "hash of the training config (checkpoint name)"),
    Field("smooth_penalty", "float", "train", "smooth: the penalty of the chosen model"),
    Field("smooth_searched", "bool", "train", "smooth: a search ran (false: ERM's start did not interpolate)"),
    Field("smooth_trace", "list", "train", "smooth: every stage of every attempt", detail=True),
    Field("smooth_base", "str", "train", "smooth: the ERM interpolator's train_key"),
    Field("smooth_output_scale", "float", "train", "smooth: logit scale applied to reach margin 1"),
    Field("smooth_attempts", "list", "train", "smooth: each attempt's outcome"),
    Field("smooth_winner", "int", "train", "smooth: index of the winning attempt (null: ERM's interpolator stands)"),
    Field("smooth_erm_bound", "float", "train", "smooth: ERM's certified bound at margin 1"),
    Field("smooth_bound_method", "str", "train", "smooth: how the search bounded its candidates"),
    Field("smooth_no_gain", "bool", "train", "smooth: no attempt beat ERM's interpolator"),
    # fit
    Field("train_acc", "float", "fit", "accuracy on the (noisy) training labels", required=True, nullable=False,
          **ACC),
    Field("noisy_fit", "float", "fit", "fraction of flipped labels fitted (null without noise)", **ACC),
    Field("interpolates", "bool", "fit", "fits every training label (the law's premise; rows of versions before it "
          "lack it)"),
    Field("train_margin", "float", "fit", "smallest training logit margin", "logits"),
    Field("train_margin_q01", "float", "fit", "1st percentile of the training logit margins", "logits"),
    # attacks
    Field("clean_acc", "float", "attack", "clean test accuracy (the attacks' own verdict)", required=True,
          nullable=False, **ACC),
    Field("pgd_acc", "acc_map", "attack", "accuracy under the PGD sweep", required=True, nullable=False, **ACC),
    Field("autoattack_acc", "acc_map", "attack", "accuracy under AutoAttack (null where it did not run)",
          required=True, nullable=False, **ACC),
    Field("robust_acc", "acc_map", "attack", "per-point worst case over every attack", required=True, nullable=False,
          **ACC),
    Field("aa_flags", "names", "attack", "AutoAttack's and the suite's warnings", required=True, nullable=False),
    Field("aa_eps", "eps_list", "attack", "the eps AutoAttack ran at", "pixels", lo=0.0),
    Field("autoattack_impl", "str", "attack", "AutoAttack's engine: native or original"),
    Field("attack_passes", "object", "attack", "forward/backward passes per attack and eps", "rows", detail=True),
    Field("verified", "bool_map", "attack", "an AutoAttack-grade attack verified the robust accuracy at eps"),
    Field("randomized", "object", "attack", "randomized model: EOT and vote draws (null otherwise)", detail=True),
    Field("aa_attacks", "object", "attack", "AutoAttack's attacks per eps", detail=True),
    Field("reattacked", "object", "attack", "examples re-attacked after the ball check, per eps", "points",
          detail=True),
    Field("suite", "names", "attack", "the attacks run, in order"),
    Field("attack_breaks", "object", "attack", "points each attack broke first, per eps", "points"),
    Field("attack_seconds", "object", "attack", "seconds per attack", "seconds", detail=True),
    Field("attack_details", "object", "attack", "per attack and eps, what it reports of itself", detail=True),
    Field("attack_settings", "object", "attack", "options each attack ran with", detail=True),
    Field("attack_check", "object", "attack", "the ball and misclassification check per eps", detail=True),
    Field("attack_indicators", "object", "attack", "indicators of attack failure per eps and name: value, threshold, "
          "fired (the adaptive stage; null where it did not run)"),
    # Lipschitz
    Field("lip_upper", "float", "lipschitz", "certified global L2 upper bound (null: uncertified)", required=True,
          lo=0.0),
    Field("lip_lower", "float", "lipschitz", "empirical L2 lower bound (null: the phase could not run, "
          "phase_errors says why)", required=True, lo=0.0),
    Field("lip_upper_method", "str", "lipschitz", "how lip_upper was certified"),
    Field("lip_lower_method", "str", "lipschitz", "where lip_lower was found (gradient or secant)"),
    Field("lip_upper_linf", "float", "lipschitz", "certified Linf bound: |f_i(x) - f_i(x')| <= it · ||x - x'||_inf",
          lo=0.0),
    Field("lip_gap", "float", "lipschitz", "lip_upper / lip_lower", lo=0.0),
    Field("uncertified", "str", "lipschitz", "why certify refused the model (null: certified)"),
    Field("phase_errors", "object", "lipschitz", "phases that could not run on this model, each with its reason "
          "(the row keeps every other phase's numbers)"),
    Field("lip_upper_unit_margin", "float", "lipschitz", "lip_upper / train_margin (interpolating rows)", lo=0.0),
    Field("lip_lower_unit_margin", "float", "lipschitz", "lip_lower / train_margin (interpolating rows)", lo=0.0),
    Field("lip_upper_q01_margin", "float", "lipschitz", "lip_upper / train_margin_q01 (interpolating rows)", lo=0.0),
    Field("lip_lower_q01_margin", "float", "lipschitz", "lip_lower / train_margin_q01 (interpolating rows)", lo=0.0),
    # certification
    Field("cert_acc", "acc_map", "certify", "certified accuracy: the per-point best of the global Lipschitz, IBP "
          "and CROWN certificates (null where uncertified)", required=True, nullable=False, **ACC),
    Field("cert_methods", "object", "certify", "points each method certified per eps: lipschitz, ibp, crown",
          detail=True),
    Field("cert_radius", "object", "certify", "certified radius quartiles over the test points (q1, median, q3; 0 "
          "for a misclassified point; null: beyond twice the largest eps)", "eps"),
    Field("cert_local_refused", "str", "certify", "why IBP and CROWN could not run (the global certificate still "
          "counts; null: they ran)"),
    Field("attack_radius", "object", "attack", "attacked radius quartiles over the test points: the smallest eps of "
          "the sweep at which an attack broke the point (q1, median, q3; 0 for a misclassified point; null: unbroken "
          "at every eps)", "eps"),
    # the law
    Field("ratio", "float", "law", "p/(n·d)", required=True, nullable=False, lo=0.0),
    Field("ratio_eff", "float", "law", "p/(n·d_eff)", required=True, lo=0.0),
    Field("law_scale", "float", "law", "sqrt(n·d/p)", required=True, nullable=False, lo=0.0),
    Field("law_scale_eff", "float", "law", "sqrt(n·d_eff/p)", lo=0.0),
    Field("law_bound", "float", "law", "Theorem 3's lower bound on the Lipschitz constant"),
    Field("law_bound_eff", "float", "law", "Theorem 3's bound with d_eff"),
    Field("law_applicable", "bool", "law", "n is large enough for Theorem 3 to say something"),
    Field("law_flag", "str", "law", "why Theorem 3 is vacuous here ('' when it applies)"),
    Field("law_params", "object", "law", "Theorem 3's eps, delta, c, W, J, k", detail=True),
    # how it ran
    Field("device", "str", "run", "torch device", required=True),
    Field("timings", "object", "run", "seconds per phase", "seconds", True, False),
    Field("threads", "object", "run", "torch threads per phase and the rule that chose them", detail=True),
    Field("flags", "names", "run", "what a reader must know (law-vacuous, unverified, randomized, ...)"),
)

FIELD: dict[str, Field] = {f.name: f for f in FIELDS}
DETAIL_KEYS = frozenset(f.name for f in FIELDS if f.detail)
REQUIRED_KEYS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.required)
_MAX = sys.float_info.max
ACC_KEYS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.kind == "acc_map")
# the invariant chain per eps, lowest first: cert_acc <= robust_acc <= pgd_acc <= clean_acc
STATUSES = ("ok", "failed")
# flags that say a row's attacks may have been fooled (gradient masking, randomness, scaled logits); the runner copies
# AutoAttack's and the suite's into the row's `flags`, reports mark rows carrying one (in `flags` or `aa_flags`)
TRUST_FLAGS = ("randomized", "softmax_output", "zero_gradients", "square_beats_whitebox", "dynamic",
               "softmax_saturated", "adaptive")
# a row's flag for each indicator of attack failure that fired at some eps (`attack_indicators`): "indicator:NAME"
INDICATOR_FLAG = "indicator:"


def indicator_flags(indicators) -> list[str]:
    """The flags of the indicators that fired at any eps of a row's `attack_indicators` (sorted, once each)."""
    if not isinstance(indicators, dict):
        return []
    names = {name for per in indicators.values() if isinstance(per, dict)
             for name, v in per.items() if isinstance(v, dict) and v.get("fired") is True}
    return [INDICATOR_FLAG + n for n in sorted(names)]


def is_trust_flag(flag) -> bool:
    """A flag saying a row's attacks may have been fooled: TRUST_FLAGS, or an indicator of attack failure."""
    return isinstance(flag, str) and (flag in TRUST_FLAGS or flag.startswith(INDICATOR_FLAG))
ACC_CHAIN: tuple[str, ...] = ("cert_acc", "robust_acc", "pgd_acc", "clean_acc")


def eps_key(eps: float) -> str:
    """The key of an eps in a row's maps: the shortest text that round-trips the float ("0.1", "1.0")."""
    return repr(float(eps))


def parse_eps_key(key) -> float | None:
    """The eps of a map key, as ``eps_key`` wrote it (or any numeric text); None for anything else."""
    if isinstance(key, str):
        return _parse_eps_text(key)
    if isinstance(key, bool):
        return None
    try:
        e = float(key)
    except (TypeError, ValueError):
        return None
    return e if math.isfinite(e) else None


@lru_cache(maxsize=4096)
def _parse_eps_text(key: str) -> float | None:
    """parse_eps_key of a text key, remembered: a report of 20,000 rows reads the same few keys millions of times."""
    try:
        e = float(key.strip())
    except ValueError:
        return None
    return e if math.isfinite(e) else None


def undeclared(row: dict) -> list[str]:
    """The keys of ``row`` the schema does not declare."""
    return [k for k in row if k not in FIELD]


def _problem(f: Field, v) -> str | None:
    """Why value ``v`` does not fit field ``f`` (None when it does; null is judged by the caller)."""
    if _SURE[f.name](v):
        return None
    words, fits = KINDS[f.kind]
    return None if fits(f, v) else f"{f.name} is {_show(v)}, expected {_article(words)}{_range(f)}"


def _sure(f: Field):
    """A quick test of a value against ``f`` for what JSON gives (exact types): True only where KINDS's test says
    fits; False where it cannot tell, and KINDS's test judges (a report reads 20,000 rows of 30 fields and more)."""
    lo, hi = (-math.inf if f.lo is None else f.lo), (math.inf if f.hi is None else f.hi)

    def number(v) -> bool:  # NaN fails every comparison; infinity and integers past every float the last two
        return (type(v) is float or type(v) is int) and lo <= v <= hi and -_MAX <= v <= _MAX

    def acc(a) -> bool:
        return a is None or number(a)

    def eps_map(v, value) -> bool:
        return type(v) is dict and all(type(k) is str and _parse_eps_text(k) is not None and value(a)
                                       for k, a in v.items())
    return {"str": lambda v: type(v) is str,
            "int": lambda v: type(v) is int and lo <= v <= hi,
            "float": number,
            "bool": lambda v: type(v) is bool,
            "acc_map": lambda v: eps_map(v, acc),
            "bool_map": lambda v: eps_map(v, lambda b: type(b) is bool),
            "eps_list": lambda v: type(v) is list and all(number(e) for e in v),
            }.get(f.kind, lambda v: False)


_SURE = {f.name: _sure(f) for f in FIELDS}


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _range(f: Field) -> str:
    if f.lo is not None and f.hi is not None:
        return f" in [{f.lo:g}, {f.hi:g}]"
    if f.lo is not None:
        return f" >= {f.lo:g}"
    return "" if f.hi is None else f" <= {f.hi:g}"


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def check_row(row) -> list[str]:
    """The ways ``row`` breaks the schema: not an object, a required key missing, a value of the wrong type, not
    finite or out of range, null where an ok row must have a value. Keys it does not declare are not judged here
    (``undeclared``): a report reads rows of other versions."""
    if not isinstance(row, dict):
        return [f"the row is {type(row).__name__}, expected a JSON object"]
    out = [f"{k} is missing" for k in REQUIRED_KEYS if k not in row]
    ok = row.get("status") == "ok"
    for k, v in row.items():
        f = FIELD.get(k)
        if f is None:
            continue
        if v is None:
            # an ok row has every non-nullable value; a failed row at least what its cell gave it
            if not f.nullable and (ok or f.phase == "cell" or k == "status"):
                out.append(f"{k} is null")
            continue
        why = _problem(f, v)
        if why:
            out.append(why)
    if isinstance(row.get("status"), str) and row["status"] not in STATUSES:
        out.append(f"status is {_show(row['status'])}, expected one of {', '.join(STATUSES)}")
    return out


def markdown_table() -> str:
    """The README's row table: one line per field."""
    lines = ["| key | type | unit | every row | written by | meaning |", "|---|---|---|---|---|---|"]
    for f in FIELDS:
        typ = KINDS[f.kind][0] + ("" if not f.nullable else " or null")
        lines.append(f"| `{f.name}` | {typ} | {f.unit} | {'yes' if f.required else ''} | {f.phase} | "
                     f"{f.meaning} |")
    return "\n".join(lines)
