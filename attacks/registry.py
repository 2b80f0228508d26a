"""Attack registry: our PGD family, AutoAttack (pyautoattack) and torchattacks adapters under one convention.

    atk = get_attack("fgsm")                       # keyword arguments configure the attack
    out = atk.run(model, x, y, eps=0.1, norm="Linf", seed=0)
    out.robust  # Bool (N,): still correctly classified (False where clean-misclassified or broken)
    out.x_adv   # like x, inside the eps ball and [0,1]

Minimum-norm attacks (CW, DeepFool, FAB from torchattacks) are unbounded: their example is projected onto the eps
ball (and [0,1]) before it is judged, so every attack answers the same question: is the point robust at eps?
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from lawbench.base.modes import eval_mode
from lawbench.base.names import did_you_mean

from .autoattack import AA_ATTACKS, DEFAULT_IMPL, _ImageView, image_shape_for, masking_restarts, run_autoattack
from .pgd import AttackError, check_norm, pgd_sweep
from .threat import check_attack


@dataclass(frozen=True)
class AttackEntry:
    name: str
    kind: str            # "pgd" | "autoattack" | "torchattacks"
    norms: tuple         # threat models it supports
    bounded: bool        # True if it searches inside the eps ball itself
    description: str
    factory: Callable = field(repr=False, compare=False, default=None)
    # AutoAttack grade: a robust accuracy this attack leaves at an eps is verified there (rows' `verified`). With no
    # eps of its own in a suite, such an attack runs at every eps of the sweep no other one of the suite verifies
    # when `sweeps` (the fast suite), else at the headline eps (AutoAttack).
    verifies: bool = False
    sweeps: bool = False
    # the pipeline's AutoAttack stage: robustness after it is the row's autoattack_acc, and its info (the attacks
    # it ran, what each broke) the row's aa_attacks
    autoattack_stage: bool = False
    # with no eps of its own in a suite, the attack runs at every eps of the sweep (the adaptive stage)
    every_eps: bool = False


@dataclass
class AttackOutput:
    robust: torch.Tensor
    x_adv: torch.Tensor
    info: dict = field(default_factory=dict)


class Attack:
    """A configured attack: ``run(model, x, y, eps, *, norm, seed=0, log=None) -> AttackOutput``.

    The output's info may carry "flags" (signs the attack may have been fooled: the row's aa_flags) and "check"
    (the record of attacks.threat.check_attack when the attack validated its examples itself through it; a suite
    then takes its verdict, and validates every other attack's examples through it)."""

    def __init__(self, entry: AttackEntry, kw: dict):
        self.entry = entry
        self.name = entry.name
        self.kw = dict(kw)

    def __repr__(self):
        return f"Attack({self.name!r}, {self.kw})"

    def run(self, model, x, y, eps: float, *, norm: str = "Linf", seed: int = 0, log=None) -> AttackOutput:
        check_norm(norm)
        if norm not in self.entry.norms:
            raise AttackError(f"attack {self.name!r} supports {list(self.entry.norms)}, not {norm!r}")
        return self.entry.factory(model, x, y, float(eps), norm=norm, seed=int(seed), log=log, **self.kw)


_REGISTRY: dict[str, AttackEntry] = {}


def register_attack(name: str, *, kind: str, norms=("Linf", "L2"), bounded: bool = True, description: str = "",
                    verifies: bool = False, sweeps: bool = False, autoattack_stage: bool = False,
                    every_eps: bool = False):
    """Decorator registering ``fn(model, x, y, eps, *, norm, seed, log, **kw) -> AttackOutput`` under ``name``.
    verifies: the attack is AutoAttack grade; sweeps: with no eps of its own it covers the sweep;
    autoattack_stage: it is the pipeline's AutoAttack; every_eps: with no eps of its own it runs at every eps
    (AttackEntry). A factory with a ``batch_size`` or ``n_total`` option gets the suite's batch and the size of the
    whole evaluation set unless the spec sets them; one with an ``evidence`` parameter gets what the suite knows at
    that eps (attacks.evaluate.SuiteState.evidence)."""

    def deco(fn):
        if name in _REGISTRY:
            raise AttackError(f"attack {name!r} is already registered")
        _REGISTRY[name] = AttackEntry(name, kind, tuple(norms), bounded, description, fn, bool(verifies),
                                      bool(sweeps), bool(autoattack_stage), bool(every_eps))
        return fn

    return deco


def list_attacks(pattern: str = "*") -> list[AttackEntry]:
    return [e for n, e in sorted(_REGISTRY.items()) if fnmatch.fnmatch(n, pattern)]


_CALL_PARAMS = {"model", "x", "y", "eps", "norm", "seed", "log", "n_total", "evidence"}  # the suite gives the last two


def attack_options(name: str) -> dict:
    """The options ``get_attack(name, **options)`` accepts, with their defaults (None where the default is None or
    the attack's own): the factory's keyword parameters, and for torchattacks adapters those of the wrapped class."""
    import inspect
    entry = _REGISTRY[name] if name in _REGISTRY else get_attack(name).entry
    params = inspect.signature(entry.factory).parameters
    out = {k: (None if p.default is inspect.Parameter.empty else p.default) for k, p in params.items()
           if k not in _CALL_PARAMS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    extra = getattr(entry.factory, "extra_options", ())
    for k in (extra() if callable(extra) else extra):
        out.setdefault(k, None)
    return out


def option_choices(name: str) -> dict:
    """{option: allowed values} an attack declares for its options (its factory's ``option_choices``), so a spec
    is refused before it runs."""
    entry = _REGISTRY[name] if name in _REGISTRY else get_attack(name).entry
    return dict(getattr(entry.factory, "option_choices", {}))


def attack_entry(name: str) -> AttackEntry:
    if name not in _REGISTRY:
        raise AttackError(f"unknown attack {name!r}{did_you_mean(name, _REGISTRY)}; known: "
                          f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_attack(name: str, **kw) -> Attack:
    return Attack(attack_entry(name), kw)


# ----------------------------------------------------------------------------------------------------------------
# our PGD family

def _pgd_factory(loss: str, targeted: bool):
    def run(model, x, y, eps, *, norm, seed, log=None, steps=100, restarts=1, step_size=None, random_start=True,
            max_batch=None, loss=loss):
        with eval_mode(model):
            r = pgd_sweep(model, x, y, [eps], norm=norm, steps=steps, step_size=step_size, restarts=restarts,
                          loss=loss, targeted=targeted, random_start=random_start, seed=seed,
                          max_batch=max_batch, log=log)
        info = {k: v for k, v in r.info.items() if k not in ("clean", "broken_step")}
        return AttackOutput(r.robust[0], r.x_adv[0], info)

    return run


register_attack("pgd", kind="pgd", description="our batched PGD, cross-entropy, early exit, restarts")(
    _pgd_factory("ce", False))
register_attack("pgd-margin", kind="pgd", description="our batched PGD on the CW margin loss")(
    _pgd_factory("margin", False))
register_attack("pgd-dlr", kind="pgd", description="our batched PGD on the DLR loss")(_pgd_factory("dlr", False))
register_attack("pgd-t", kind="pgd", description="our batched targeted PGD (margin), restart r aims at the "
                "r-th most likely wrong class")(_pgd_factory("margin", True))


# ----------------------------------------------------------------------------------------------------------------
# AutoAttack (pyautoattack)

def _aa_factory(version):
    def run(model, x, y, eps, *, norm, seed, log=None, batch_size=1000, version=version, impl=DEFAULT_IMPL,
            n_total=None):
        """AutoAttack (its examples validated by attacks.threat.check_attack inside run_autoattack), then, where it
        flags gradient masking, Square again from fresh starts on its survivors (masking_restarts)."""
        r = run_autoattack(model, x, y, eps, norm=norm, version=version, seed=seed, batch_size=batch_size, log=log,
                           n_total=n_total, impl=impl)
        extra = masking_restarts(model, x, y, eps, norm, r, seed, batch_size, log, impl)
        info = dict(r.info, broken=int((~r.robust).sum()), masking_restarts=extra, flags=list(r.flags))
        return AttackOutput(r.robust, r.x_adv, info)

    return run


register_attack("autoattack", kind="autoattack", description="AutoAttack standard (pyautoattack, or our engine: "
                "autoattack_impl): APGD-CE, APGD-T, FAB-T, Square; its rand version on a randomized model",
                verifies=True, autoattack_stage=True)(_aa_factory("standard"))
register_attack("autoattack-plus", kind="autoattack", description="AutoAttack plus (pyautoattack)", verifies=True,
                autoattack_stage=True)(_aa_factory("plus"))
for _a in AA_ATTACKS:
    register_attack(f"aa-{_a}", kind="autoattack", description=f"pyautoattack {_a.upper()} alone (standard "
                    "settings)")(_aa_factory([_a]))


# ----------------------------------------------------------------------------------------------------------------
# the fast suite

@register_attack("fast", kind="suite", description="AutoAttack-grade suite at a fraction of its cost: PGD with "
                 "early exit, APGD-T on each point's nearest ranked targets, Square with an adaptive budget",
                 verifies=True, sweeps=True)
def _fast(model, x, y, eps, *, norm, seed, log=None, steps=100, targets=4, square_queries=1000, batch_size=1000,
          impl=DEFAULT_IMPL):
    from .fast import run_fast
    robust, x_adv, info = run_fast(model, x, y, eps, norm=norm, seed=seed, log=log, steps=steps, targets=targets,
                                   square_queries=square_queries, batch_size=batch_size, impl=impl)
    return AttackOutput(robust, x_adv, info)


# ----------------------------------------------------------------------------------------------------------------
# the adaptive stage

@register_attack("adaptive", kind="adaptive", every_eps=True,
                 description="indicators of attack failure, then where one fires or a masking flag was raised: "
                 "straight-through and smoothed gradients found at run time, EOT until the gradient is stable, "
                 "APGD-DLR, APGD-T, PGD on the margin, transfer from the smooth surrogate")
def _adaptive(model, x, y, eps, *, norm, seed, log=None, evidence=None, mode="auto", steps=100, apgd_iter=100,
              targets=3, eot_cos=0.9, eot_max=160):
    from .adaptive import MODES, AdaptiveConfig, run_adaptive
    if mode not in MODES:
        raise AttackError(f"adaptive: mode must be one of {MODES}, got {mode!r}")
    cfg = AdaptiveConfig(steps=int(steps), apgd_iter=int(apgd_iter), targets=int(targets), eot_cos=float(eot_cos),
                         eot_max=int(eot_max))
    robust, x_adv, info = run_adaptive(model, x, y, eps, norm, seed=seed, evidence=evidence, mode=mode, cfg=cfg,
                                       log=log)
    flags = info.pop("flags")
    return AttackOutput(robust, x_adv, {"stages": info, "indicators": info.pop("indicators"), "flags": flags})


_adaptive.option_choices = {"mode": ("auto", "always")}  # attacks.adaptive.MODES


# ----------------------------------------------------------------------------------------------------------------
# torchattacks adapters

def _ta_factory(cls_name: str, build: Callable, needs_image: bool = False, bounded: bool = True):
    def raw(model, x, y, eps, norm, seed, kw):
        """torchattacks' own output for (x, y) at eps, before any check."""
        import torchattacks
        cls = getattr(torchattacks, cls_name)
        in_shape = tuple(x.shape[1:])
        # torchattacks assumes (N, C, H, W) (PGDL2 / CW reshape norms to 4-d, Square needs H == W)
        view = image_shape_for(in_shape) if (needs_image or len(in_shape) != 3) else None
        if view is None:
            net, xi = model, x.detach()
        else:
            d = math.prod(in_shape)
            net = _ImageView(model, d, in_shape)
            xf = x.detach().reshape(x.shape[0], -1)
            pad = view[1] * view[2] - d
            xi = (torch.cat([xf, xf.new_zeros(xf.shape[0], pad)], 1) if pad else xf).reshape(x.shape[0], *view)
        with eval_mode(model):
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                xa = build(cls, net, eps, norm, **kw)(xi, y)
        return xa.reshape(x.shape[0], -1)[:, : math.prod(in_shape)].reshape(x.shape).detach()

    def run(model, x, y, eps, *, norm, seed, log=None, **kw):
        try:
            import torchattacks  # noqa: F401
        except ImportError as exc:  # pragma: no cover
            raise AttackError("torchattacks is not installed") from exc
        # Every output goes through the one check: projection into the exact ball, then a re-attack at a smaller
        # eps where the projection is no longer adversarial (minimum-norm attacks take no eps: projected only)
        rerun = (lambda idx, e, k: raw(model, x[idx], y[idx], e, norm, seed + k, kw)) if bounded else None
        checked = check_attack(model, x, y, raw(model, x, y, eps, norm, seed, kw), eps, norm, rerun=rerun, log=log)
        return AttackOutput(~checked.broken, checked.x_adv,
                            {"attack": cls_name, "torchattacks_kw": kw, "check": checked.info})

    run.extra_options = lambda: _torchattacks_options(cls_name, build)  # imports torchattacks only when asked
    return run


def _torchattacks_options(cls_name: str, build: Callable) -> tuple:
    """The keyword options a torchattacks adapter passes on: its builder's own and the wrapped class's."""
    import inspect
    names = [k for k, p in inspect.signature(build).parameters.items()
             if k not in ("cls", "net", "eps", "norm") and p.kind != p.VAR_KEYWORD]
    try:
        import torchattacks
        cls = getattr(torchattacks, cls_name)
        names += [k for k, p in inspect.signature(cls.__init__).parameters.items()
                  if k not in ("self", "model", "eps", "norm", "seed", "verbose", "device")
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - torchattacks is a dependency
        pass
    return tuple(dict.fromkeys(names))


def _b_fgsm(cls, net, eps, norm, **kw):
    return cls(net, eps=eps, **kw)


def _b_pgd(cls, net, eps, norm, steps=100, alpha=None, random_start=True, **kw):
    return cls(net, eps=eps, alpha=alpha if alpha is not None else 2.5 * eps / steps, steps=steps,
               random_start=random_start, **kw)


def _b_pgd_norm(cls_linf, cls_l2):
    def b(cls, net, eps, norm, steps=100, alpha=None, random_start=True, **kw):
        import torchattacks
        c = getattr(torchattacks, cls_linf if norm == "Linf" else cls_l2)
        return c(net, eps=eps, alpha=alpha if alpha is not None else 2.5 * eps / steps, steps=steps,
                 random_start=random_start, **kw)
    return b


def _b_square(cls, net, eps, norm, n_queries=5000, **kw):
    return cls(net, norm=norm, eps=eps, n_queries=n_queries, **kw)


def _b_apgd(cls, net, eps, norm, steps=100, loss="ce", **kw):
    return cls(net, norm=norm, eps=eps, steps=steps, loss=loss, **kw)


def _b_free(cls, net, eps, norm, **kw):
    return cls(net, **kw)


def _b_fab(cls, net, eps, norm, steps=100, **kw):
    return cls(net, norm=norm, eps=eps, steps=steps, **kw)


for _name, _cls, _b, _norms, _bounded, _img, _desc in (
    ("ta-fgsm", "FGSM", _b_fgsm, ("Linf",), True, False, "torchattacks FGSM (one signed-gradient step)"),
    ("ta-bim", "BIM", _b_fgsm, ("Linf",), True, False, "torchattacks BIM (iterative FGSM, no random start)"),
    ("ta-pgd", "PGD", _b_pgd_norm("PGD", "PGDL2"), ("Linf", "L2"), True, False,
     "torchattacks PGD / PGDL2 (reference implementation)"),
    ("ta-mifgsm", "MIFGSM", _b_fgsm, ("Linf",), True, False, "torchattacks momentum iterative FGSM"),
    ("ta-apgd", "APGD", _b_apgd, ("Linf", "L2"), True, False, "torchattacks APGD"),
    ("ta-square", "Square", _b_square, ("Linf", "L2"), True, True, "torchattacks Square (black box)"),
    ("ta-fab", "FAB", _b_fab, ("Linf", "L2"), True, False, "torchattacks FAB (minimum norm, projected)"),
    ("ta-cw", "CW", _b_free, ("L2",), False, False, "torchattacks Carlini-Wagner L2 (minimum norm, projected)"),
    ("ta-deepfool", "DeepFool", _b_free, ("L2",), False, False, "torchattacks DeepFool (minimum norm, projected)"),
):
    register_attack(_name, kind="torchattacks", norms=_norms, bounded=_bounded, description=_desc)(
        _ta_factory(_cls, _b, _img, _bounded))
# short aliases for the attacks we do not implement ourselves
for _alias in ("fgsm", "cw", "deepfool", "square", "bim", "mifgsm", "fab"):
    _e = _REGISTRY[f"ta-{_alias}"]
    _REGISTRY[_alias] = AttackEntry(_alias, _e.kind, _e.norms, _e.bounded, _e.description + f" (= ta-{_alias})",
                                    _e.factory, _e.verifies, _e.sweeps, _e.autoattack_stage, _e.every_eps)
