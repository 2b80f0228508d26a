"""AutoAttack adapter around ``pyautoattack`` (the original implementation by Croce & Hein, PyPI 0.2.0).

* standard: APGD-CE, APGD-T, FAB-T, Square (5000 queries), 100 iterations; targets capped at num_classes - 1.
* plus: APGD-CE, APGD-DLR, FAB, Square, APGD-T, FAB-T with restarts, as in the original.
* a list of attack names runs the original attacks with the standard settings in that order ("custom").
* a randomized model (attacks.randomized.Randomized) gets the original's rand version instead of standard (APGD-CE
  and APGD-DLR with EOT 20), and EOT in every APGD of a custom list; examples are judged by majority vote.

Vector inputs (N, d) are shown to pyautoattack as square images (N, 1, s, s) through a wrapper (Square needs an
image); pixels beyond d are padding the model never sees. pyautoattack's gradient-masking checks become flags;
its log lines go to the ``log`` callable instead of the terminal. The global torch RNG is left untouched.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lawbench.base.modes import eval_mode

from .cost import counted
from .pgd import AttackError, check_norm
from .randomized import Randomized
from .standard import NATIVE_ATTACKS, RAND, STANDARD, run_native
from .apgd import APGDConfig, apgd
from .rows import Found, channels_last, chunked
from .square import SquareConfig
from .threat import check_attack, misclassified

DEFAULT_IMPL = "native"  # the engine wherever none is named: the spec's autoattack_impl and every function here
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")

# pyautoattack warning text -> our flag name
FLAG_PATTERNS = (
    ("randomized", re.compile(r"randomized defense")),
    ("softmax_output", re.compile(r"output is a probability distribution")),
    ("zero_gradients", re.compile(r"points with zero gradient")),
    ("square_beats_whitebox", re.compile(r"Square Attack has decreased")),
    ("dynamic", re.compile(r"dynamic defense")),
    ("n_classes", re.compile(r"target classes|not possible to use")),
)
FLAG_DOC = {
    "randomized": "outputs change between identical forward passes (randomized defense)",
    "softmax_output": "the model seems to output probabilities instead of logits",
    "zero_gradients": "some points have an exactly zero input gradient (gradient masking?)",
    "square_beats_whitebox": "black-box Square broke points the white-box attacks could not",
    "dynamic": "the forward pass calls backward/grad (dynamic defense)",
    "n_classes": "too few classes for the DLR / targeted losses",
    "softmax_saturated": "most points have a softmax saturated at their label (scaled logits?): cross-entropy has no "
                         "gradient there, PGD ascended the margin loss instead",
}

_BATCH_LINE = re.compile(r"^(?P<attack>[a-z\-]+) - \d+/\d+ - (?P<k>\d+) out of (?P<m>\d+) successfully perturbed")


@dataclass
class AAResult:
    """robust: Bool (N,) (False where clean-misclassified or broken); x_adv like x; flags: sorted unique flag
    names; info: version, attacks, eps, norm, seconds, broken_by {attack: count}, n_attacked, warnings, ..."""

    robust: torch.Tensor
    x_adv: torch.Tensor
    flags: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


class _Connected(torch.nn.Module):
    """Keeps the logits attached to the input in autograd: a model whose forward cuts the graph (a hard step,
    a detached quantizer) gets exact zero gradients instead of crashing pyautoattack's gradient attacks."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z):
        out = self.model(z)
        if z.requires_grad and not out.requires_grad:  # parameters are frozen during the attack
            out = out + 0.0 * z.reshape(z.shape[0], -1)[:, :1]
        return out


class _ImageView(torch.nn.Module):
    """Shows a vector model (N, d) to AutoAttack as images (N, 1, s, s); coordinates >= d are ignored padding."""

    def __init__(self, model: torch.nn.Module, d: int, in_shape: tuple):
        super().__init__()
        self.model = model
        self.d = d
        self.in_shape = tuple(in_shape)

    def forward(self, z):
        return self.model(z.reshape(z.shape[0], -1)[:, : self.d].reshape(z.shape[0], *self.in_shape))


# The smallest image side Square can attack: its L2 initialisation tiles the image with squares of side h // 5 (a
# 4x4 view of d=16 divided by zero).
SQUARE_MIN_SIDE = 5


def image_shape_for(in_shape: Sequence[int]) -> tuple | None:
    """None when ``in_shape`` is already (C, H, W) with H == W; else the (1, s, s) view used for AutoAttack."""
    in_shape = tuple(in_shape)
    if len(in_shape) == 3 and in_shape[1] == in_shape[2]:
        return None
    d = math.prod(in_shape)
    s = max(SQUARE_MIN_SIDE, math.isqrt(d - 1) + 1) if d > 1 else SQUARE_MIN_SIDE
    while not _square_tiles_fit(s):
        s += 1
    return (1, s, s)


def _square_tiles_fit(h: int) -> bool:
    """Square's L2 start tiles an h x h image with squares of side h // 5 from an offset of (h - 5 (h // 5)) // 2; a
    square cut by the border (12 x 12: squares of 2 from 1, the last over pixels 11..12) fails to broadcast, so the
    view's side is one whose squares each lie wholly inside or wholly outside the image."""
    side = h // 5
    start = (h - 5 * side) // 2
    return all(start + k * side + side <= h or start + k * side >= h for k in range(h // side))


class _Capture(logging.Handler):
    def __init__(self, sink: Callable[[str], None] | None):
        super().__init__(level=logging.DEBUG)
        self.sink = sink
        self.warnings: list[str] = []
        self.broken_by: dict[str, int] = {}
        self.lines = 0

    def emit(self, record):  # noqa: D401
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover
            return
        self.lines += 1
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg)
        m = _BATCH_LINE.match(msg)
        if m:
            a = m.group("attack")
            self.broken_by[a] = self.broken_by.get(a, 0) + int(m.group("k"))
        if self.sink is not None:
            try:
                self.sink(("warning: " if record.levelno >= logging.WARNING else "") + msg)
            except Exception:  # pragma: no cover - a broken sink never stops the attack
                pass


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """Parameters temporarily not requiring grad: attacks need input gradients only (FAB calls .backward())."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in flags:
            p.requires_grad_(r)


def flags_from_warnings(warnings: Sequence[str]) -> list[str]:
    out = set()
    for w in warnings:
        for name, pat in FLAG_PATTERNS:
            if pat.search(w):
                out.add(name)
    return sorted(out)


def run_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str,
                   version: str | Sequence[str] = "standard", seed: int = 0, batch_size: int = 1000,
                   log: Callable[[str], None] | None = None, n_total: int | None = None,
                   num_classes: int | None = None, n_target_classes: int | None = None,
                   n_queries: int | None = None, square_discard: float = 0.0,
                   impl: "str | Engine | None" = None) -> AAResult:
    """Run AutoAttack on (x, y) at ``eps``: the original (pyautoattack, ``impl="original"``) or our engine
    (``impl="native"``, attacks.standard: the standard and rand versions and lists of its attacks). No ``impl``:
    DEFAULT_IMPL where it runs the version, else the original (plus, untargeted fab). Either way the
    forward and backward passes are counted (info["passes"], per attack for native) and every example goes through
    the one validation path.

    n_target_classes / n_queries: for a custom list only, the targets of APGD-T and FAB-T (default min(9, C-1)) and
    Square's query budget (default 5000), as the fast suite sets them; square_discard: Square's statistics-based
    discarding (attacks.square.discard; native engine only, 0 = every row its whole budget, as the original).

    version: "standard", "plus", or a list of attack names from AA_ATTACKS (run with standard settings).
    n_total: size of the full evaluation set when (x, y) is a subset (used for the Square check threshold:
    Square breaking more than 0.2% of the full set beyond the white-box attacks raises ``square_beats_whitebox``).
    """
    check_norm(norm)
    engine = get_engine(impl if impl is not None else default_engine(version))
    if isinstance(version, str):
        if version not in ("standard", "plus"):
            raise AttackError(f"autoattack version must be 'standard', 'plus' or a list of {AA_ATTACKS}, "
                              f"got {version!r}")
        attacks = None
        vname = version
    else:
        attacks = list(version)
        bad = [a for a in attacks if a not in AA_ATTACKS]
        if bad or not attacks:
            raise AttackError(f"unknown AutoAttack attack(s) {bad}; choose from {AA_ATTACKS}")
        vname = "custom"
    engine.check(version)
    t0 = time.perf_counter()
    N = x.shape[0]
    n_total = N if n_total is None else int(n_total)
    dev = x.device
    y = y.to(dev)
    view = image_shape_for(tuple(x.shape[1:]))
    info = {"version": vname, "eps": float(eps), "norm": norm, "seed": int(seed), "n_attacked": N,
            "image_view": list(view) if view else None, "impl": engine.name}
    if N == 0:
        info.update(attacks=attacks or [], seconds=0.0, broken_by={}, warnings=[], check={})
        return AAResult(torch.zeros(0, dtype=torch.bool, device=dev), x.detach().clone(), [], info)
    if (n_target_classes or n_queries) and attacks is None:
        raise AttackError("n_target_classes and n_queries apply to a custom list of attacks, not a version")
    if isinstance(model, Randomized) and vname == "standard":  # the original's protocol for randomized defenses
        vname = "rand"
    info["version"] = vname
    net, counter = counted(model)
    square = SquareConfig(n_queries=int(n_queries or 5000), discard=float(square_discard))
    run = engine.runner(net, counter, norm, vname, attacks, int(batch_size), log, num_classes, n_target_classes,
                        square)
    x_raw, cap = run(x, y, engine.eps(float(eps), norm), int(seed))
    info.update(attacks=run.attacks_run, n_target_classes=run.n_target_classes,
                n_queries=square.n_queries if "square" in run.attacks_run else None)
    if square.discard and "square" in run.attacks_run:
        info["square_discard"] = square.discard
    info["passes_attack"] = counter.passes.as_dict()
    # One validation path: pyautoattack clips with x +- eps in float32 and may overshoot the ball by an ulp (it runs
    # at inner_eps, so that is rare). An example that is no longer adversarial once projected into the exact ball is
    # re-attacked at a slightly smaller eps, never silently counted robust.
    checked = check_attack(net, x, y, x_raw, float(eps), norm,
                           rerun=lambda idx, e, k: run(x[idx], y[idx], e, int(seed) + k)[0], batch=batch_size, log=log)
    robust = ~checked.broken
    # Square check against the full evaluation set (pyautoattack's own threshold is relative to the subset)
    warnings = [w for w in cap.warnings if "Square Attack has decreased" not in w]
    sq = cap.broken_by.get("square", 0)
    if "square" in info["attacks"] and len(info["attacks"]) > 1 and sq > 0.002 * n_total:
        warnings.append(f"Square Attack has decreased the robust accuracy of {sq / n_total:.2%}")
    flags = flags_from_warnings(warnings)
    info.update(seconds=time.perf_counter() - t0, broken_by=dict(cap.broken_by), warnings=warnings,
                log_lines=cap.lines, n_total=n_total, check=checked.info, passes=counter.passes.as_dict(),
                passes_by_attack=getattr(cap, "passes", None))
    return AAResult(robust=robust, x_adv=checked.x_adv, flags=flags, info=info)


def default_engine(version) -> str:
    """DEFAULT_IMPL where it runs ``version``, else the original."""
    try:
        get_engine(DEFAULT_IMPL).check(version)
        return DEFAULT_IMPL
    except AttackError:
        return "original"


def inner_eps(eps: float, norm: str) -> float:
    """The radius pyautoattack is given: a hair below eps, so that its float32 clipping (x +- eps rounded to the
    nearest float, or a float32 L2 rescale) lands inside the exact ball instead of one ulp outside. An ulp outside
    matters: a model that quantizes its input rounds such an example back, and re-attacking it costs a whole run."""
    eps = float(eps)
    slack = eps * 2.0 ** -20 if norm == "L2" else max(eps * 2.0 ** -20, 2.0 ** -22)
    return max(eps - slack, eps * 0.5)


class _Run:
    """One configured pyautoattack run: (x, y, eps) -> (raw examples like x, captured log). Raw means as
    pyautoattack returns them: not yet checked against the exact ball."""

    def __init__(self, model, norm, vname, attacks, batch_size, log, num_classes, n_target_classes=None,
                 square: SquareConfig = SquareConfig()):
        self.model, self.norm, self.vname, self.attacks = model, norm, vname, attacks
        self.batch_size, self.log, self.num_classes = batch_size, log, num_classes
        self.targets, self.queries = n_target_classes, square.n_queries
        self.attacks_run: list = []
        self.n_target_classes = None

    def __call__(self, x, y, eps, seed):
        from pyautoattack import AutoAttack
        from pyautoattack import checks as aa_checks
        model = self.model
        dev = x.device
        net, xi, back = aa_view(model, x)
        with eval_mode(model):
            with torch.no_grad():
                z = net(xi[:1])
            C = int(self.num_classes or z.shape[1])
            devices = [dev] if dev.type == "cuda" else []
            with captured(self.log) as cap:
                for k in aa_checks.funcs:  # pyautoattack never resets its global call counters
                    aa_checks.funcs[k] = 0
                with torch.random.fork_rng(devices=devices), _frozen(model):
                    aa = AutoAttack(net, norm=self.norm, eps=float(eps),
                                    version=self.vname if self.attacks is None else "custom", device=dev,
                                    seed=seed, attacks=self.attacks)
                    ntc = max(1, min(self.targets or 9, C - 1))
                    aa.apgd_targeted.n_target_classes = ntc
                    aa.fab.n_target_classes = ntc
                    if isinstance(model, Randomized):  # every gradient stage averages draws (EOT)
                        aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = model.eot
                    if self.attacks is not None:  # custom list: standard settings of each attack
                        aa.apgd.n_restarts = 1
                        aa.fab.n_restarts = 1
                        aa.apgd_targeted.n_restarts = 1
                        aa.square.n_queries = int(self.queries)
                    self.attacks_run = list(aa.attacks_to_run)
                    self.n_target_classes = ntc
                    x_adv_i, _ = aa.run_standard_evaluation(xi, y, batch_size=self.batch_size)
        return back(x_adv_i), cap


def check_native(version) -> None:
    """The native engine runs the standard and rand versions and lists of its own attacks (attacks.standard)."""
    if isinstance(version, str):
        if version != "standard":
            raise AttackError(f"the native AutoAttack engine runs version 'standard' (and 'rand' for randomized "
                              f"models) or a list of {list(NATIVE_ATTACKS)}; version {version!r} needs "
                              f"autoattack_impl = \"original\"")
        return
    bad = [a for a in version if a not in NATIVE_ATTACKS]
    if bad:
        raise AttackError(f"the native AutoAttack engine has no {bad} (it runs {list(NATIVE_ATTACKS)}); use "
                          f"autoattack_impl = \"original\"")


@dataclass
class _NativeLog:
    """What attacks.autoattack reads from a run: its warnings, points broken per attack, log lines, passes."""
    warnings: list
    broken_by: dict
    lines: int
    passes: dict


class _Native:
    """One configured native run: (x, y, eps, seed) -> (raw examples like x, _NativeLog)."""

    def __init__(self, net, counter, norm, vname, attacks, log, n_target_classes, square: SquareConfig):
        self.net, self.counter, self.norm, self.log = net, counter, norm, log
        self.attacks_run = list(RAND if vname == "rand" else STANDARD if attacks is None else attacks)
        self.targets, self.square = n_target_classes, square
        self.n_target_classes = None

    def __call__(self, x, y, eps, seed):
        model = chunked(self.net, x)
        with eval_mode(model), channels_last(model, x):
            with torch.no_grad():
                C = int(model(x[:1]).shape[1])
            self.n_target_classes = max(1, min(self.targets or 9, C - 1))
            view = aa_view(model, x) if image_shape_for(tuple(x.shape[1:])) is not None else None
            with _frozen(model):
                res = run_native(model, self.counter, x, y, eps, self.norm, self.attacks_run, seed=seed,
                                 n_target_classes=self.n_target_classes, square=self.square,
                                 square_view=view, log=self.log)
        for w in res.warnings:
            if self.log:
                self.log("warning: " + w)
        return res.x_raw, _NativeLog(res.warnings, res.broken_by, len(res.attacks), res.passes)


class Engine:
    """Where AutoAttack's attacks run: the original (pyautoattack) or ours (attacks.standard). One object per name
    (ENGINES, get_engine), chosen once from a cell's autoattack_impl and handed down as is; everything that differs
    between the two engines is a method or an attribute here."""
    name = ""
    square_discard = False  # runs Square with statistics-based discarding (attacks.square.discard)

    def check(self, version) -> None:
        """Refuse (AttackError) a version or list of attacks this engine does not run."""

    def runner(self, net, counter, norm, vname, attacks, batch_size, log, num_classes, n_target_classes, square):
        """A configured run: (x, y, eps, seed) -> (raw examples like x, what the run logged); attributes
        attacks_run and n_target_classes once it has run."""
        raise NotImplementedError

    def eps(self, eps: float, norm: str) -> float:
        """The radius the engine is given for the exact ball of radius eps."""
        return float(eps)

    def apgd_targeted(self, model, x, y, eps, norm, seed, log, ranked, batch_size) -> AAResult:
        """APGD-T (standard settings) on each point's own targets ``ranked`` (N, k), a point's later targets only
        while it stands; examples checked against the exact ball."""
        raise NotImplementedError


class OriginalEngine(Engine):
    name = "original"

    def check(self, version) -> None:
        try:
            import pyautoattack  # noqa: F401
        except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
            raise AttackError("pyautoattack is not installed (pip install pyautoattack)") from exc

    def runner(self, net, counter, norm, vname, attacks, batch_size, log, num_classes, n_target_classes, square):
        if square.discard:
            raise AttackError("Square's statistics-based discarding runs on the native engine only")
        return _Run(net, norm, vname, attacks, batch_size, log, num_classes, n_target_classes, square)

    def eps(self, eps: float, norm: str) -> float:
        return inner_eps(eps, norm)

    def apgd_targeted(self, model, x, y, eps, norm, seed, log, ranked, batch_size) -> AAResult:
        """pyautoattack's APGDAttack_targeted (100 iterations, one restart), run target by target, each on the
        points still robust; only the choice of targets is the caller's (AutoAttack takes the 2nd..10th largest
        logits)."""
        from pyautoattack.autopgd_base import APGDAttack_targeted
        from pyautoattack import checks as aa_checks
        net, xi, back = aa_view(model, x)
        examples = xi.detach().clone()
        per_target = []
        with eval_mode(model):
            devices = [x.device] if x.device.type == "cuda" else []
            robust = ~misclassified(model, x, y)
            with captured(log) as cap, torch.random.fork_rng(devices=devices), _frozen(model):
                for k in aa_checks.funcs:  # pyautoattack never resets its global call counters
                    aa_checks.funcs[k] = 0
                eot = model.eot if isinstance(model, Randomized) else 1
                atk = APGDAttack_targeted(net, n_iter=100, norm=norm, n_restarts=1, eps=self.eps(eps, norm),
                                          seed=seed,
                                          eot_iter=eot, rho=.75, n_target_classes=ranked.shape[1], device=x.device,
                                          logger=logging.getLogger("auto-attack"))
                atk.init_hyperparam(xi)
                for j in range(ranked.shape[1]):
                    idx = robust.nonzero().flatten()
                    if idx.numel() == 0:
                        break
                    torch.random.manual_seed(seed)
                    broke = 0
                    for start in range(0, idx.numel(), batch_size):
                        part = idx[start:start + batch_size]
                        atk.y_target = ranked[part, j]
                        _, acc, _, adv = atk.attack_single_run(xi[part], y[part])
                        hit = acc == 0
                        if isinstance(model, Randomized) and bool(hit.any()):  # one lucky draw is no break
                            hit[hit.clone()] = misclassified(model, back(adv[hit]), y[part][hit])
                        fooled = part[hit]
                        examples[fooled] = adv[hit].detach()
                        robust[fooled] = False
                        broke += int(fooled.numel())
                    per_target.append(broke)
                    if log:
                        log(f"apgd-t (ranked target {j + 1}): broke {broke} of {idx.numel()}")
        ck = check_attack(model, x, y, back(examples), eps, norm, log=log)
        flags = flags_from_warnings(cap.warnings)
        return AAResult(robust=~ck.broken, x_adv=ck.x_adv, flags=flags,
                        info={"per_target": per_target, "warnings": cap.warnings, "check": ck.info})


class NativeEngine(Engine):
    name = "native"
    square_discard = True

    def check(self, version) -> None:
        check_native(version)

    def runner(self, net, counter, norm, vname, attacks, batch_size, log, num_classes, n_target_classes, square):
        return _Native(net, counter, norm, vname, attacks, log, n_target_classes, square)

    def apgd_targeted(self, model, x, y, eps, norm, seed, log, ranked, batch_size) -> AAResult:
        """attacks.apgd (the original's algorithm) with each point's targets as rows of one batch: a point broken
        by one target drops the rest."""
        with eval_mode(model):
            warnings: list = []
            with _frozen(model), channels_last(model, x):
                found = Found.start(x, misclassified(model, x, y))
                clean_broken = found.broken.clone()
                apgd(chunked(model, x), x, y, eps, norm, APGDConfig(loss="dlr-targeted"), seed=seed, targets=ranked,
                     found=found, warnings=warnings)
        if log:
            log(f"apgd-t (ranked targets as rows): broke {int((found.broken & ~clean_broken).sum())} of "
                f"{int((~clean_broken).sum())}")
        ck = check_attack(model, x, y, found.x_adv, eps, norm, log=log)
        return AAResult(robust=~ck.broken, x_adv=ck.x_adv, flags=flags_from_warnings(warnings),
                        info={"warnings": warnings, "check": ck.info, "impl": "native"})


ENGINES = {e.name: e for e in (NativeEngine(), OriginalEngine())}
IMPLS = tuple(ENGINES)


def get_engine(impl: "str | Engine") -> Engine:
    """The engine named ``impl`` (or ``impl`` itself when it is one)."""
    if isinstance(impl, Engine):
        return impl
    if impl not in ENGINES:
        raise AttackError(f"autoattack impl must be one of {IMPLS}, got {impl!r}")
    return ENGINES[impl]


def aa_view(model: torch.nn.Module, x: torch.Tensor):
    """(net, xi, back): the model as pyautoattack sees it (image-shaped input where the data is not, see
    image_shape_for), x in that shape, and back(examples) -> examples shaped like x."""
    N = x.shape[0]
    in_shape = tuple(x.shape[1:])
    view = image_shape_for(in_shape)
    d = math.prod(in_shape)
    if view is None:
        net, xi = _Connected(model), x.detach()
    else:
        net = _Connected(_ImageView(model, d, in_shape))
        xf = x.detach().reshape(N, -1)
        pad = view[1] * view[2] - d
        xi = (torch.cat([xf, xf.new_zeros(N, pad)], 1) if pad else xf).reshape(N, *view)

    def back(xa):
        return xa.reshape(xa.shape[0], -1)[:, :d].to(x.dtype).reshape(xa.shape[0], *in_shape).detach()

    return net, xi, back


@contextlib.contextmanager
def captured(log: Callable[[str], None] | None):
    """pyautoattack's "auto-attack" logger routed into a _Capture (warnings, per-attack breaks, lines) and `log`."""
    logger = logging.getLogger("auto-attack")
    cap = _Capture(log)
    old_level, old_prop = logger.level, logger.propagate
    logger.addHandler(cap)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield cap
    finally:
        logger.removeHandler(cap)
        logger.setLevel(old_level)
        logger.propagate = old_prop


def square_starts(model, x, y, eps, norm, *, starts, queries, seed, batch_size, log, n_total=None,
                  impl: "str | Engine" = DEFAULT_IMPL, discard: float = 0.0) -> AAResult:
    """Square (on the engine ``impl``) with `starts` random starts per point run as rows of one batch: a point is
    robust when every start fails. Restarts cost one loop instead of `starts` loops: on the few points left at the
    end of a run, Square's time is its per-iteration overhead, not its rows. pyautoattack draws one square per iteration for the
    whole batch, so the starts share proposals and differ in their initial stripes and in what each accepts."""
    n = x.shape[0]
    rep = lambda t: t.repeat(starts, *([1] * (t.dim() - 1)))  # noqa: E731
    res = run_autoattack(model, rep(x), rep(y), eps, norm=norm, version=["square"], seed=seed,
                         batch_size=batch_size, log=log, n_total=n_total, n_queries=queries, impl=impl,
                         **({"square_discard": discard} if discard else {}))
    still = res.robust.reshape(starts, n)
    first = (~still).to(torch.int8).argmax(0)  # the first start that broke each point
    pick = first * n + torch.arange(n, device=x.device)
    res.robust = still.all(0)
    res.x_adv = torch.where(res.robust.reshape(-1, *([1] * (x.dim() - 1))), x.detach(), res.x_adv[pick])
    # counts per point, not per (start, point) row
    res.info.update(starts=int(starts), n_attacked=n, broken_by={"square": int((~res.robust).sum())},
                    rows_broken=int((~still).sum()))
    return res


# pyautoattack's own advice when these flags appear: run Square with more restarts
MASKING_FLAGS = ("zero_gradients", "square_beats_whitebox", "randomized")
MASKING_SQUARE_RESTARTS = 2


def masking_restarts(model, x, y, eps, norm, res, seed, batch_size, log,
                     impl: "str | Engine" = DEFAULT_IMPL) -> dict:
    """Where AutoAttack saw signs of gradient masking, gradient-based attacks cannot be trusted on the survivors:
    Square (black box) runs again from MASKING_SQUARE_RESTARTS fresh random starts per survivor (another seed, the
    starts as rows of one batch, see square_starts), so the pipeline does strictly more than AutoAttack alone on every
    point it calls robust. Updates ``res`` in place; returns what it did."""
    done = {"restarts": 0, "broken": 0}
    if not set(res.flags) & set(MASKING_FLAGS) or "square" not in res.info.get("attacks", ()):
        return done
    alive = res.robust.nonzero().flatten()
    if alive.numel() == 0:
        return done
    if log:
        log(f"autoattack flags {res.flags}: Square, {MASKING_SQUARE_RESTARTS} more random starts on each of "
            f"{alive.numel()} survivors")
    sq = square_starts(model, x[alive], y[alive], eps, norm, starts=MASKING_SQUARE_RESTARTS, queries=5000,
                       seed=seed + 1000, batch_size=batch_size, log=log, impl=impl)
    got = alive[~sq.robust]
    res.robust[got] = False
    res.x_adv[got] = sq.x_adv[~sq.robust]
    done["restarts"] = MASKING_SQUARE_RESTARTS
    done["broken"] = int(got.numel())
    return done
