"""The runner: each cell not yet in the store goes data -> model -> train (or cached checkpoint) -> evaluate -> one row.

Evaluation of a trained model is `evaluate_model`, shared by trained cells and by external checkpoint entries.
"""
from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from lawbench import attacks
from lawbench import certify
from lawbench import datasets
from lawbench import models
from bench import __version__
from bench.device import resolve_device
from bench import smooth
from bench import threads
from bench.store import json_safe
from bench.spec import ABSENT_MEANS, KEY_OPTIONS, LEGACY_ATTACKS, SCHEMA, SMOOTH_KEYS, cell_id, train_key
from bench.train import TrainConfig, train
from lawbench.base.files import atomic_write_text
from lawbench.base.modes import eval_mode
from lawbench.base.timing import Timer
from lawbench.reports.schema import (ACC_CHAIN, FIELDS, REQUIRED_KEYS, TRUST_FLAGS, check_row, eps_key,
                                     indicator_flags, undeclared)

INVARIANT_TOL = 1e-9
# what a smooth row records of its search
MARGIN_QUANTILE = 0.01  # the training-margin percentile rows record beside the smallest margin
SMOOTH_ROW_KEYS = tuple(f.name for f in FIELDS if f.name.startswith("smooth_"))


class InvariantError(AssertionError):
    """A row broke cert <= robust <= pgd <= clean or lip_lower <= lip_upper: a bug, never a result."""


_DATA_CACHE: dict[str, datasets.Split] = {}


def load_data(cell: dict, data_dir: str | None) -> datasets.Split:
    """One load per distinct data configuration within a process."""
    key = json.dumps([cell["dataset"], cell["n_train"], cell["n_test"], cell["label_noise"], cell["seed"],
                      cell["data_options"], data_dir], sort_keys=True)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = datasets.load_dataset(
            cell["dataset"], n_train=cell["n_train"] or None, n_test=cell["n_test"] or None,
            label_noise=cell["label_noise"], seed=cell["seed"], data_dir=data_dir, **cell["data_options"])
    return _DATA_CACHE[key]


def train_config(cell: dict) -> TrainConfig:
    return TrainConfig(**{k: cell[k] for k in TrainConfig.__dataclass_fields__ if k in cell})


def erm_cell(cell: dict) -> dict:
    """The ERM cell a smooth cell starts from: the same data, model and training settings, recipe erm."""
    return {**{k: v for k, v in cell.items() if k not in SMOOTH_KEYS}, "recipe": "erm"}


def _write_meta(meta_path: Path, meta: dict) -> None:
    atomic_write_text(meta_path, json.dumps(meta))


def _cached_meta(meta_path: Path, key: str) -> dict:
    """A checkpoint's sidecar: what the row reads of it, or ValueError saying what is wrong."""
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    if meta.get("train_key") != key:
        raise ValueError(f"its train_key is {str(meta.get('train_key'))[:40]!r}, not {key!r}")
    if type(meta.get("epochs_run")) is not int or meta["epochs_run"] < 0:
        raise ValueError("no epochs_run count")
    acc = meta.get("train_acc")
    if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0 <= acc <= 1:
        raise ValueError("no train_acc in [0, 1]")
    return meta


def _load_cached(model, ckpt: Path, meta_path: Path, key: str, say) -> dict | None:
    """The cached training of ``key``, or None when its checkpoint or sidecar does not load: both are moved aside
    (renamed ``*.damaged-N``, never deleted), a line names them, and the model, as it was built, is trained again."""
    built = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        meta = _cached_meta(meta_path, key)
        models.load_checkpoint(model, ckpt)
        return meta
    except (OSError, ValueError, models.ModelError) as exc:  # JSON, UTF-8 and checkpoint errors alike
        model.load_state_dict(built)
        moved = [move_aside(p) for p in (ckpt, meta_path)]
        say(f"warning: cached checkpoint {ckpt} does not load ({' '.join(str(exc).split())[:200]}); moved aside "
            f"to {', '.join(str(m) for m in moved if m)}; training again")
        return None


def move_aside(path: Path) -> Path | None:
    """``path`` renamed to the first free ``path.damaged-N`` (kept for inspection); None if it cannot be."""
    for n in range(1, 1000):
        dest = path.with_name(f"{path.name}.damaged-{n}")
        if not dest.exists():
            try:
                path.rename(dest)
                return dest
            except OSError:
                return None
    return None


def _train_or_load(model, data, cell, ckpt_dir: Path, device, phase, chooser: threads.ThreadChooser,
                   say=None) -> dict:
    """Train, or reuse the checkpoint of an identical training configuration (a damaged one is moved aside and the
    model trained again)."""
    say = say or phase
    key = train_key(cell)
    ckpt, meta_path = ckpt_dir / f"{key}.pt", ckpt_dir / f"{key}.json"
    if ckpt.exists() and meta_path.exists():
        meta = _load_cached(model, ckpt, meta_path, key, say)
        if meta is not None:
            model.to(device).eval()
            meta["cached"] = True
            return meta
    cfg = train_config(cell)
    if cell["recipe"] == "smooth":  # ERM's interpolator first (its own checkpoint, shared with the ERM cell)
        base = _train_or_load(model, data, erm_cell(cell), ckpt_dir, device, phase, chooser, say)
        with chooser.phase("train", cfg.batch_size):
            found = smooth.search(model, data.x_train, data.y_train, cfg, device,
                                  progress=lambda a, k, lam, ok, lip: phase(
                                      f"smooth attempt {a} stage {k} lambda {lam:.3g} "
                                      f"{'fits' if ok else 'breaks the fit'}"))
        meta = {"train_key": key, "epochs_run": base["epochs_run"], "train_acc": base["train_acc"],
                "train_seconds": found.seconds, "smooth_base": base["train_key"], "smooth_penalty": found.penalty,
                "smooth_searched": found.searched, "smooth_trace": found.trace,
                "smooth_output_scale": found.output_scale, "smooth_attempts": found.attempts,
                "smooth_winner": found.winner, "smooth_erm_bound": found.erm_bound,
                "smooth_bound_method": found.bound_method, "smooth_no_gain": found.no_gain}
    else:
        with chooser.phase("train", cfg.batch_size):
            result = train(model, data.x_train, data.y_train, cfg, device,
                           progress=lambda e, n, acc: phase(f"train epoch {e}/{n} acc {acc:.3f}"))
        meta = {"train_key": key, "epochs_run": result.epochs_run, "train_acc": result.train_acc,
                "train_seconds": result.seconds}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    models.save_checkpoint(model, ckpt)
    _write_meta(meta_path, meta)
    meta["cached"] = False
    return meta


FINITE_PROBE = 256  # test points whose logits and input gradients must be finite before any phase runs


def finite_model(model: torch.nn.Module, x: torch.Tensor, device) -> None:
    """A model with non-finite weights, or whose logits or input gradients overflow, has no accuracy, robustness or
    Lipschitz constant to measure: the cell fails with that reason (a ModelError naming the parameter or the
    points), before a later phase fails on it with an internal error."""
    for name, p in model.named_parameters():
        bad = int((~torch.isfinite(p)).sum())
        if bad:
            raise models.ModelError(f"parameter {name} has {bad} non-finite value(s) (NaN or inf): the model cannot "
                                    f"be evaluated")
    xs = x[:FINITE_PROBE].to(device).clone().requires_grad_(True)
    devices = [xs.device] if xs.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):  # a noisy model's later draws are unchanged
        out = model(xs)
        rows = ~torch.isfinite(out.detach()).all(1)
        if bool(rows.any()):
            big = max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)
            raise models.ModelError(f"the model's logits are not finite at {int(rows.sum())} of {len(xs)} test "
                                    f"points (its largest weight is {big:.3g}): the model cannot be evaluated")
        g = None  # a forward that cuts the graph (a thermometer code) has no gradient to judge
        if out.requires_grad:
            (g,) = torch.autograd.grad(out.logsumexp(1).sum(), xs, allow_unused=True)
    if g is not None and not bool(torch.isfinite(g).all()):
        bad = int((~torch.isfinite(g.reshape(len(xs), -1))).any(1).sum())
        raise models.ModelError(f"the model's input gradients are not finite at {bad} of {len(xs)} test points: "
                                f"gradient attacks and the Lipschitz bounds cannot run on it")


def training_fit(model: torch.nn.Module, data: datasets.Split, device) -> dict:
    """The law's premise, measured after training in eval mode: accuracy on the labels trained on (flipped ones
    included), the fraction of flipped labels the model reproduces (None without label noise), whether it
    interpolates (fits every training label) and its smallest logit margin on them (the output scale its
    Lipschitz constant is measured at; negative where a label is missed)."""
    model.to(device)
    margin = smooth.train_margins(model, data.x_train.to(device), data.y_train.to(device))
    fit = margin > 0
    flipped = data.noisy_mask.to(device)
    n_flipped = int(flipped.sum())
    return {"train_acc": int(fit.sum()) / max(1, fit.numel()),
            "noisy_fit": int(fit[flipped].sum()) / n_flipped if n_flipped else None,
            "interpolates": bool(fit.all()), "train_margin": float(margin.min()) if len(margin) else None,
            "train_margin_q01": float(torch.quantile(margin.double(), MARGIN_QUANTILE)) if len(margin) else None}


def unit_margin_bounds(row: dict) -> dict:
    """The Lipschitz bounds at the output scale where the smallest training margin is 1 (bound / train_margin), and
    where the 1st percentile of the training margins is 1 (bound / train_margin_q01), for an interpolating row: a
    classifier's logits scale freely without changing a prediction, so constants of two models compare only at equal
    margins (the smooth recipe's rows are at margin 1 already). The smallest margin is one point's story (ERM stops at
    the first epoch that fits, so its smallest margin is whatever the last memorised point got); the percentile is
    the many points' view of the same scale. None elsewhere."""
    out = {}
    for suffix, key in (("unit_margin", "train_margin"), ("q01_margin", "train_margin_q01")):
        m = row.get(key)
        ok = row.get("interpolates") and m is not None and m > 0
        for bound in ("lip_upper", "lip_lower"):
            v = row.get(bound)
            out[f"{bound}_{suffix}"] = None if not ok or v is None else v / m
    return out


def _subset(x: torch.Tensor, k: int) -> torch.Tensor:
    return x[:k] if k else x


def evaluate_model(model: torch.nn.Module, data: datasets.Split, cell: dict, device, timer: Timer,
                   chooser: threads.ThreadChooser, phase=lambda s: None, log=None) -> dict:
    """Clean accuracy, attacks over the eps sweep, Lipschitz bounds, certified accuracy and the law's quantities.
    Everything runs at the "attack" phase's threads except AutoAttack, which gets its own (it sees only survivors)."""
    with chooser.phase("attack", len(data.y_test)):
        return _evaluate(model, data, cell, device, timer, chooser, phase, log)


def _evaluate(model, data, cell, device, timer, chooser, phase, log) -> dict:
    model.to(device).eval()
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    threat, eps = cell["threat"], cell["eps"]
    suite = attack_suite(cell)
    with timer("attacks"):
        phase(f"PGD {threat} over {len(eps)} eps")
        ev = attacks.robust_eval(model, x_test, y_test, norm=threat, eps=eps, steps=cell["pgd_steps"],
                                 restarts=cell["pgd_restarts"], step_size=cell["pgd_step_size"] or None,
                                 seed=cell["seed"], log=log, aa_phase=lambda n: chooser.phase("autoattack", n),
                                 pgd="pgd" in cell_attacks(cell), suite=suite)
    for name, secs in getattr(ev, "timings", {}).items():
        timer.seconds[name] = secs
    n = len(y_test)

    def acc(mask) -> float:
        return float(mask.float().sum().item()) / n

    clean_acc = acc(ev.clean)  # the attacks' own verdict (a randomized model: the majority of its draws)
    pgd_acc = {eps_key(e): acc(ev.pgd_robust[e]) for e in eps}
    aa_acc = {eps_key(e): (acc(ev.aa_robust[e]) if e in ev.aa_robust else None) for e in eps}
    robust_acc = {eps_key(e): acc(ev.robust[e]) for e in eps}
    errors: dict = {}
    with timer("lipschitz"):
        phase("Lipschitz bounds")
        upper, refusal = _certified_upper(model, tuple(data.meta.in_shape))
        k = cell["lip_points"]
        points = [_subset(data.x_train, k).to(device), _subset(x_test, k)]
        pairs = []
        for e in eps:
            adv = ev.x_adv[e]
            points.append(_subset(adv, k))
            pairs.append((_subset(x_test, k), _subset(adv, k)))
        lower = _phase(errors, "lip_lower", lambda: certify.lipschitz_lower(model, points, pairs))
    certs = None
    if upper is not None:
        with timer("certify"):
            phase("certified accuracy (Lipschitz, IBP, CROWN) and radii")
            certs = _phase(errors, "cert_acc", lambda: certify.certify_points(model, x_test, y_test, eps, threat,
                                                                             upper=upper))
        if certs is not None:
            sound_certificates(certs, ev.robust)
    return {
        "clean_acc": clean_acc, "pgd_acc": pgd_acc, "autoattack_acc": aa_acc, "robust_acc": robust_acc,
        **certificate_keys(certs, eps), "attack_radius": attack_radius(ev, eps),
        "lip_upper": None if upper is None else float(upper.value),
        "lip_lower": None if lower is None else float(lower.value),
        "lip_upper_method": None if upper is None else upper.method,
        "lip_lower_method": None if lower is None else lower.method,
        "lip_upper_linf": getattr(upper, "linf", None),
        "lip_gap": (float(upper.value) / float(lower.value)
                    if upper is not None and lower is not None and lower.value > 0 else None),
        "uncertified": refusal, "phase_errors": errors or None,
        "aa_flags": list(ev.aa_flags), "aa_eps": list(cell["aa_eps"]),
        "autoattack_impl": cell.get("autoattack_impl", ABSENT_MEANS["autoattack_impl"]),
        "attack_passes": {name: {(k if k == "all" else eps_key(k)): v for k, v in per_eps.items()}
                          for name, per_eps in ev.info["passes"].items()},
        "verified": {eps_key(e): bool(v) for e, v in ev.info["verified"].items()},
        "randomized": ev.info["randomized"],
        "aa_attacks": {eps_key(e): list(i.get("attacks", [])) for e, i in ev.info["autoattack"].items()},
        "reattacked": {eps_key(e): int(n) for e, n in ev.info["reattacked"].items()},
        "suite": ev.info["suite"],
        "attack_breaks": {eps_key(e): dict(b) for e, b in ev.info["breaks"].items()},
        "attack_seconds": {name: round(t, 4) for name, t in ev.info["seconds"].items()},
        "attack_details": {name: {eps_key(e): d for e, d in per_eps.items()}
                           for name, per_eps in ev.info["details"].items()},
        "attack_settings": {**({"pgd": {"steps": cell["pgd_steps"], "restarts": cell["pgd_restarts"],
                                        "step_size": cell["pgd_step_size"] or None}}
                               if "pgd" in ev.info["suite"] else {}),
                            **{step.name: {"eps": sorted(step.eps), **step.options} for step in suite}},
        "attack_check": {eps_key(e): c for e, c in ev.info["check"].items()},
        "attack_indicators": ({eps_key(e): ind for e, ind in ev.info["indicators"].items()}
                              if "adaptive" in ev.info["suite"] else None),
    }


def certificate_keys(certs, eps) -> dict:
    """The row's certificate keys: accuracy per eps, points per method and eps, the radius quartiles (null where
    certify refused the model or its phase failed)."""
    if certs is None:
        return {"cert_acc": {eps_key(e): None for e in eps}, "cert_methods": None, "cert_radius": None,
                "cert_local_refused": None}
    acc = certs.accuracy()
    return {"cert_acc": {eps_key(e): acc[float(e)] for e in eps},
            "cert_methods": {eps_key(e): certs.by_method[float(e)] for e in eps},
            "cert_radius": certify.radius_quartiles(certs.radii, certs.top), "cert_local_refused": certs.local_refused}


def sound_certificates(certs, robust: dict) -> None:
    """No certified point was broken by an attack, at any eps: a certificate that fails this is wrong, and the cell
    fails saying so rather than store it."""
    for e, ok in certs.certified.items():
        broken = ok & ~robust[e].to("cpu")
        if bool(broken.any()):
            raise InvariantError(f"eps {eps_key(e)}: {int(broken.sum())} certified point(s) broken by an attack "
                                 f"(a certificate is unsound)")


def attack_radius(ev, eps) -> dict:
    """Quartiles over the test points of the smallest eps of the sweep at which an attack broke the point (0 where
    it is misclassified; null where a quartile's point survives every eps)."""
    n = len(ev.clean)
    r = torch.full((n,), float("inf"), dtype=torch.float64)
    for e in sorted(eps, reverse=True):
        r[~ev.robust[e].to("cpu")] = float(e)
    r[~ev.clean.to("cpu")] = 0.0
    return certify.radius_quartiles(r)


def attack_suite(cell: dict) -> list:
    """The attacks after the PGD sweep, in the cell's order, with their options, each at its own eps ([attack.NAME]
    eps), else: an AutoAttack-grade attack that sweeps (fast) at every eps no other AutoAttack-grade attack of the
    suite covers, any other at the cell's AutoAttack eps (else the largest eps). AutoAttack takes its version from
    the autoattack key and is left out when that is off."""
    names = [n for n in cell_attacks(cell) if n != "pgd" and not (n == "autoattack" and cell["autoattack"] == "off")]
    headline = cell["aa_eps"] or [max(cell["eps"])]
    steps, sweeping = [], []
    for name in names:
        options = dict(cell.get("attack", {}).get(name, {}))
        for option, key in KEY_OPTIONS.get(name, {}).items():
            options[option] = cell.get(key, ABSENT_MEANS.get(key, SCHEMA[key].default))
        if attacks.attack_entry(name).sweeps and "eps" not in options:
            sweeping.append(len(steps))
        if name == "fast" and "pgd" in cell_attacks(cell):  # the sweep's PGD already ran at every eps
            options.setdefault("steps", 0)
        where = cell["eps"] if attacks.attack_entry(name).every_eps else headline
        steps.append(attacks.SuiteStep(name, tuple(float(e) for e in options.pop("eps", where)), options))
    covered = {e for i, st in enumerate(steps) if st.verifies and i not in sweeping for e in st.eps}
    rest = tuple(float(e) for e in cell["eps"] if float(e) not in covered)
    for i in sweeping:
        steps[i] = attacks.SuiteStep(steps[i].name, rest, steps[i].options)
    return steps


def cell_attacks(cell: dict) -> list:
    """The cell's `attacks` (a cell without the key runs the suite it was made with, LEGACY_ATTACKS)."""
    return list(cell.get("attacks", LEGACY_ATTACKS))


PHASE_NAMES = {"lip_lower": "the Lipschitz lower bound", "cert_acc": "certified accuracy"}


def _phase(errors: dict, key: str, fn):
    """``fn()``, or None with ``errors[key]`` saying why when that phase cannot run on this model: the row keeps
    every other phase's numbers (the attacks' above all) and a `phase-failed` flag."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any failure of one phase; the cell's other phases stand
        where = traceback.extract_tb(exc.__traceback__)[-1]
        errors[key] = (f"{PHASE_NAMES[key]} could not run: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
                       f"(at {Path(where.filename).name}:{where.lineno})")
        return None


def _certified_upper(model, in_shape):
    """(bound, None), or (None, the reason) when certify refuses a layer it cannot verify exactly: the model is
    still attacked and its row is ok, with lip_upper and cert_acc null and an `uncertified` flag."""
    try:
        return certify.lipschitz_upper(model, in_shape), None
    except certify.CertifyError as exc:
        return None, str(exc)


def isoperimetry_constant(meta) -> float:
    """Theorem 3's c: known for the Gaussian synthetic data (x = 0.5 + scale·g, g ~ N(0, I_d/d)); 1 elsewhere."""
    scale = getattr(meta, "scale", None)
    if meta.name == "gauss" and scale:
        return certify.isoperimetry_constant_gaussian(scale / math.sqrt(meta.d), meta.d)
    return 1.0


def check_invariants(row: dict) -> None:
    """The row matches its schema (reports.schema: every key declared, every value of its type and range), and
    cert_acc <= robust_acc <= pgd_acc <= clean_acc per eps (ACC_CHAIN), robust_acc <= autoattack_acc, and
    lip_lower <= lip_upper."""
    extra = undeclared(row)
    if extra:
        raise InvariantError(f"row keys not declared in reports.schema: {', '.join(extra)}")
    problems = check_row(json_safe(row))  # as it will be stored: a NaN where null is allowed is a null
    if problems:
        raise InvariantError(f"row breaks reports.schema: {'; '.join(problems)}")
    for e in row["eps"]:
        k = eps_key(e)
        chain = [(key[:-4], row[key] if key == "clean_acc" else row[key][k]) for key in ACC_CHAIN]
        chain = [(name, v) for name, v in chain if v is not None]  # an uncertified row has no cert_acc
        aa = row["autoattack_acc"].get(k)
        if aa is not None and row["robust_acc"][k] > aa + INVARIANT_TOL:
            raise InvariantError(f"eps {k}: robust_acc {row['robust_acc'][k]} > autoattack_acc {aa}")
        for (lo_name, lo), (hi_name, hi) in zip(chain, chain[1:]):
            if lo > hi + INVARIANT_TOL:
                raise InvariantError(f"eps {k}: {lo_name}_acc {lo} > {hi_name}_acc {hi}")
    if row["lip_upper"] is not None and row["lip_lower"] is not None and \
            row["lip_lower"] > row["lip_upper"] * (1 + 1e-6):
        raise InvariantError(f"lip_lower {row['lip_lower']} > lip_upper {row['lip_upper']}")


def base_row(cell: dict) -> dict:
    """The identifying part of a row: every required key of reports.schema, the measured ones null until measured,
    so a failed row has them all."""
    row = dict.fromkeys(REQUIRED_KEYS)
    row.update({
        "cell_id": cell_id(cell), "bench_version": __version__, "status": "failed",
        "dataset": cell["dataset"], "label_noise": cell["label_noise"], "model": cell["model"],
        "width": cell["width"], "recipe": cell["recipe"], "train_eps": cell["train_eps"], "seed": cell["seed"],
        "threat": cell["threat"], "eps": list(cell["eps"]), "aa_flags": [], "timings": {},
        "autoattack": cell["autoattack"], "cell": cell, "interpolates": None, "noisy_fit": None,
        "data_source": None,
    })
    return row


@dataclass(frozen=True)
class CellTask:
    """One cell as the driver hands it to an executor: everything a worker needs to run it (plain and picklable).
    budget: the threads the cell may use (None: every CPU the worker's process may use); see bench.threads."""
    cell: dict
    out_dir: str
    device: str = "auto"
    data_dir: str | None = None
    budget: threads.ThreadBudget | None = None
    plugins: tuple = ()  # --plugin modules (absolute paths or module names): a worker process imports them first

    @property
    def cell_id(self) -> str:
        return cell_id(self.cell)


def run_cell(task: CellTask, phase=lambda s: None, log=None) -> dict:
    """One cell -> one row. Failures become a `failed` row with the error; they never stop the sweep."""
    budget = task.budget or threads.ThreadBudget.for_cells(threads.available_cpus())
    row = base_row(task.cell)
    timer = Timer()
    start = time.perf_counter()
    try:
        with threads.use_threads(budget.per_cell):  # phases without their own choice stay inside the budget
            _fill_row(row, task, budget, timer, phase, log)
        row["status"] = "ok"
    except Exception as exc:  # a failed cell is recorded, not fatal
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=8)
    timer.seconds["total"] = time.perf_counter() - start
    row["timings"] = {k: round(v, 4) for k, v in timer.seconds.items()}
    return row


def _fill_row(row: dict, task: CellTask, budget: threads.ThreadBudget, timer: Timer, phase, log) -> None:
    """run_cell's work: data, model, training or checkpoint, evaluation, the law's quantities, the invariants."""
    cell = task.cell
    device = resolve_device(task.device)
    row["device"] = str(device)
    with timer("data"):
        phase("loading data")
        data = load_data(cell, task.data_dir)
    meta = data.meta
    row.update(n_train=len(data.y_train), n_test=len(data.y_test), d=meta.d, d_eff=meta.d_eff,
               num_classes=meta.num_classes, n_noisy=getattr(meta, "n_noisy", None),
               data_source=getattr(meta, "data_source", None), data_scale=getattr(meta, "scale", None),
               data_margin=meta.options.get("margin"))
    entry = models.get_entry(cell["model"])
    torch.manual_seed(cell["seed"])
    model = models.get_model(cell["model"], in_shape=tuple(meta.in_shape), num_classes=meta.num_classes,
                             width=cell["width"], **cell["model_options"])
    params = models.count_params(model)
    row.update(family=entry.family, params=params)
    chooser = threads.ThreadChooser(model, data.x_train, budget, device)
    if "entry" in cell:  # an external checkpoint: evaluated as it is, never trained
        with timer("load"):
            phase("loading checkpoint")
            models.load_checkpoint(model, cell["entry"]["checkpoint"], sha256=cell["entry"]["sha256"])
            row.update(model=cell["entry"]["name"], architecture=cell["model"],
                       checkpoint_sha256=cell["entry"]["sha256"])
    else:
        with timer("train"):
            trained = _train_or_load(model, data, cell, Path(task.out_dir) / "checkpoints", device, phase,
                                     chooser, log)
        row.update(epochs_run=trained["epochs_run"], checkpoint_cached=trained["cached"],
                   train_key=trained["train_key"])
        row.update({k: trained[k] for k in SMOOTH_ROW_KEYS if k in trained})
    finite_model(model, data.x_test, device)
    row.update(training_fit(model, data, device))
    row.update(evaluate_model(model, data, cell, device, timer, chooser, phase, log))
    row["threads"] = chooser.record()
    row.update(unit_margin_bounds(row))
    row.update(certify.law_quantities(params, row["n_train"], meta.d, meta.d_eff, num_classes=meta.num_classes,
                                      label_noise=cell["label_noise"], c=isoperimetry_constant(meta)))
    row["flags"] = [] if row.get("law_applicable") else ["law-vacuous"]  # Theorem 3 says nothing at this n
    row["flags"] += [f for f in row["aa_flags"] if f in TRUST_FLAGS]  # signs the attacks may have been fooled
    row["flags"] += indicator_flags(row.get("attack_indicators"))  # indicators of attack failure that fired
    if not all(row["verified"].values()):
        row["flags"].append("unverified")  # an eps where only PGD (or weaker) ran: reports mark its numbers
    if row.get("smooth_no_gain"):
        row["flags"].append("smooth-no-gain")  # no attempt of the search (retry included) beat ERM's interpolator
    if row.get("uncertified"):
        row["flags"].append("uncertified")
    if row.get("phase_errors"):
        row["flags"].append("phase-failed")  # a phase that could not run: its numbers are null, the reason is kept
    if any(row.get("reattacked", {}).values()):
        row["flags"].append("reattacked")
    check_invariants(row)
