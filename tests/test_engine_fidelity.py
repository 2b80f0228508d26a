"""Our AutoAttack engine pinned to the algorithm, not only to its verdicts: APGD follows the original's trajectory
iteration by iteration from the same start; every attack spends exactly the passes its closed form says on points no
attack can break (every target of APGD-T and FAB-T attacked, every pass counted once, per attack); Square's Linf
search stays on the ball's vertices; FAB drops the rows of broken points; the native engine raises the original's
masking flags on masked models. Each test names the change to the engine it catches."""
from __future__ import annotations

import pytest
import torch

import lawbench.attacks.apgd as apgd_mod
from conftest import digits_split, train_digits_mlp
from lawbench.attacks.apgd import APGDConfig, _loss, apgd
from lawbench.attacks.autoattack import run_autoattack
from lawbench.attacks.errors import AttackError
from lawbench.attacks.cost import Counted
from lawbench.attacks.fab import FABConfig, fab_targeted
from lawbench.attacks.rows import Found
from lawbench.attacks.square import _propose_linf, _start


@pytest.fixture(scope="module")
def setting():
    """A trained digits MLP and 40 test points it classifies with a logit margin above 3: no attack breaks them at
    the small radii below, so every row runs every iteration on both engines."""
    xtr, ytr, x, y = digits_split(800, slice(1300, 1500))
    model = train_digits_mlp(0, xtr, ytr)
    with torch.no_grad():
        z = model(x)
    zs = z.sort(1)[0]
    keep = (z.argmax(1) == y) & (zs[:, -1] - zs[:, -2] > 3)
    return model, x[keep][:40], y[keep][:40]


class Recorded(torch.nn.Module):
    """The model, recording the logits of every forward that will be differentiated (one per APGD iteration)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.logits = model, []

    def forward(self, v):
        z = self.model(v)
        if torch.is_grad_enabled() and v.requires_grad:
            self.logits.append(z.detach())
        return z


def _losses(rec: Recorded, y, target, loss) -> torch.Tensor:
    return torch.stack([_loss(z, y, target, loss) for z in rec.logits])


def _trajectories(model, x, y, norm, eps, loss, ulp: bool = False):
    """(original's, ours) loss of every point at every iteration from one shared start (``ulp``: the original's
    start moved by one ulp towards the middle of the box, the original's own float sensitivity)."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    gen = torch.Generator().manual_seed(1)
    t = 2 * torch.rand(x.shape, generator=gen) - 1
    d = t / (t.abs().amax(1, keepdim=True) if norm == "Linf" else t.norm(dim=1, keepdim=True))
    start = (x + eps * d).clamp(0, 1)
    theirs_start = torch.nextafter(start, torch.full_like(start, 0.5)) if ulp else start
    target = None
    if loss == "dlr-targeted":
        with torch.no_grad():
            target = model(x).argsort(1, descending=True)[:, 1]
        theirs = Recorded(model)
        atk = APGDAttack_targeted(theirs, norm=norm, eps=eps, n_iter=100, device="cpu", n_target_classes=1)
        atk.y_target = target
    else:
        theirs = Recorded(model)
        atk = APGDAttack(theirs, norm=norm, eps=eps, n_iter=100, loss=loss, device="cpu")
    atk.init_hyperparam(x)
    atk.attack_single_run(x, y, x_init=theirs_start)
    ours = Recorded(model)
    found = apgd(ours, x, y, eps, norm, APGDConfig(loss=loss), targets=None if target is None else target[:, None],
                 x_init=start)
    assert not bool(found.broken.any()), "a point broke: the rows would leave and the trajectories part"
    return _losses(theirs, y, target, loss), _losses(ours, y, target, loss)


# (norm, eps, loss): the cases where both of APGD's ingredients move the trajectory (on Linf cross-entropy every step
# reaches a vertex and halving the step changes nothing there)
CASES = [("Linf", 0.02, "dlr-targeted"), ("L2", 0.15, "ce")]
# largest |loss difference| allowed over 40 points x 101 iterations: float noise, or where the original's own
# trajectory moves more when its start moves by one ulp, four times that. Measured: 4e-7 and 9e-7 on one x86 CPU; on
# another (AMD EPYC), L2 cross-entropy parted by 4.1e-4 after iteration 58 on two points, and the original from a
# start one ulp away parted from itself by the same 4.1e-4 (a step's float rounding decides a later checkpoint)
FLOAT_NOISE = 1e-5


@pytest.mark.parametrize("norm, eps, loss", CASES)
def test_apgd_follows_the_originals_trajectory(setting, norm, eps, loss, monkeypatch):
    """Same start, same model: the loss of every point at every iteration equals the original's to float noise. The
    comparison has power: without momentum, or without halving the step at a checkpoint, the same trajectories part
    by more than a thousand times that (measured 0.012 to 0.034). Catches: a dropped momentum term, a checkpoint that
    never halves, a wrong checkpoint schedule or oscillation count, a wrong loss."""
    model, x, y = setting
    theirs, ours = _trajectories(model, x, y, norm, eps, loss)
    assert theirs.shape == ours.shape == (101, x.shape[0])
    gap = float((theirs - ours).abs().max())
    if gap >= FLOAT_NOISE:  # the original's own sensitivity to one ulp of its start is the yardstick
        moved, _ = _trajectories(model, x, y, norm, eps, loss, ulp=True)
        sensitivity = float((theirs - moved).abs().max())
        # still far below what a mutant moves (more than 1000 x FLOAT_NOISE, below)
        assert gap <= 4 * sensitivity < 1000 * FLOAT_NOISE / 2, (gap, sensitivity)
    step, checkpoint = apgd_mod._step, apgd_mod._checkpoint

    def no_halving(r, i, period, rho):
        kept = r.step.clone()
        checkpoint(r, i, period, rho)
        r.step = kept

    for name, broken in (("_step", lambda r, a, e, n: step(r, 1.0, e, n)), ("_checkpoint", no_halving)):
        with monkeypatch.context() as m:
            m.setattr(apgd_mod, name, broken)
            theirs, mutant = _trajectories(model, x, y, norm, eps, loss)
        assert float((theirs - mutant).abs().max()) > 1000 * FLOAT_NOISE, name


def test_every_attack_spends_its_closed_form_on_points_none_can_break(setting):
    """At Linf 1e-4 nothing breaks, so each attack runs every row to its last iteration: APGD-CE (1 + 100) forwards
    and backwards per point; APGD-T one ranking forward, then (1 + 100) of each per point and target (9 targets);
    FAB-T one ranking forward, then per point, target and iteration two forwards and one backward; Square one
    forward per point and query plus its start. Counted per attack, each pass once. Catches: a target dropped
    (APGD-T's or FAB-T's last), a backward counted twice, counts cumulative across attacks, an extra pass per step."""
    model, x, y = setting
    n, k, q = x.shape[0], 9, 50
    res = run_autoattack(model, x, y, 1e-4, norm="Linf", version=["apgd-ce", "apgd-t", "fab-t", "square"],
                         impl="native", n_queries=q)
    assert bool(res.robust.all()) and set(res.info["broken_by"].values()) == {0}
    assert res.info["passes_by_attack"] == {
        "apgd-ce": {"forward": 101 * n, "backward": 101 * n},
        "apgd-t": {"forward": n + 101 * k * n, "backward": 101 * k * n},
        "fab-t": {"forward": n + 200 * k * n, "backward": 100 * k * n},
        "square": {"forward": n + q * n, "backward": 0},
    }
    # and nothing else is spent but the engine's own checks and the clean forward (5 randomness draws, the
    # probability check, the dynamic-defense trace: 7 forwards of the points, then 1 to find the clean verdicts),
    # and one point's forward to read the class count
    spent = res.info["passes_attack"]
    per_attack = res.info["passes_by_attack"].values()
    assert spent["forward"] == 8 * n + 1 + sum(p["forward"] for p in per_attack)
    assert spent["backward"] == sum(p["backward"] for p in per_attack)


def test_a_suites_passes_are_counted_per_stage_and_eps(setting):
    """robust_eval keeps each stage's passes at each eps apart: on points nothing breaks, AutoAttack at 1e-4 and at
    2e-4 does the same work, so both eps spend the same passes, and the stages' passes add up to what the model was
    asked for (PGD's, then the suite's; the saturation check's forwards besides). Catches: counts cumulative across
    eps or stages."""
    from lawbench.attacks import SuiteStep, robust_eval
    model, x, y = setting
    counted = Counted(model)
    aa = {"version": ["apgd-ce", "fab-t"], "impl": "native"}
    ev = robust_eval(counted, x, y, norm="Linf", eps=[1e-4, 2e-4], steps=5, restarts=1, seed=0,
                     suite=[SuiteStep("autoattack", (1e-4, 2e-4), aa)])
    per = ev.info["passes"]
    assert set(per) == {"pgd", "autoattack"}
    first, second = per["autoattack"][1e-4], per["autoattack"][2e-4]
    assert first == second and first["backward"] == 101 * x.shape[0] + 100 * 9 * x.shape[0]
    spent = {d: sum(p[d] for stage in per.values() for p in stage.values()) for d in ("forward", "backward")}
    assert counted.passes.backward == spent["backward"]
    assert 0 <= counted.passes.forward - spent["forward"] <= 4 * x.shape[0]  # the saturation check's


def test_fab_drops_the_rows_of_broken_points(setting):
    """At Linf 0.1 FAB-T breaks some points early: their rows leave, so the backward passes fall short of 100 per
    row, while the survivors' rows run every iteration. Catches: FAB never dropping rows of broken points."""
    model, x, y = setting
    counted = Counted(model)
    targets = model(x).argsort(1, descending=True)[:, 1:10]
    found = fab_targeted(counted, x, y, 0.1, "Linf", targets, FABConfig(), found=Found.start(x))
    broken = int(found.broken.sum())
    assert 0 < broken < x.shape[0]
    assert counted.passes.backward < 100 * 9 * x.shape[0]
    assert counted.passes.backward >= 100 * 9 * (x.shape[0] - broken)


def test_square_linf_moves_between_the_balls_vertices(setting):
    """The original's Linf Square starts on vertical stripes at ±eps and moves a square by ±2·eps, clipped to the
    ball: every coordinate of every proposal lies at x0 ± eps (or on the [0, 1] box). Catches: a square moving by
    less than 2·eps (a proposal inside the ball is never one of Square's)."""
    _, x, _ = setting
    x0 = x.reshape(-1, 1, 8, 8)
    eps = 0.05
    lo, hi = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    gen = torch.Generator().manual_seed(0)
    xb = _start(x0, lo, hi, eps, "Linf", gen)
    for p in (0.8, 0.1, 0.02):
        prop = _propose_linf(x0, xb, lo, hi, eps, p, gen)
        at_vertex = ((prop - x0).abs() - eps).abs() < 1e-6
        on_box = (prop == 0) | (prop == 1)
        assert bool((at_vertex | on_box).all()), p
        assert bool((prop != xb).any()), p  # it moved


@pytest.mark.parametrize("wrap, flag", [("quantize", "zero_gradients"), ("noise", "randomized")])
def test_the_native_engine_raises_the_originals_masking_flags(setting, wrap, flag):
    """On a model that quantizes its input (zero gradients) and one that adds noise at every forward (randomized),
    our engine raises the flags the original's checks raise (they buy the masking restarts, attacks.autoattack).
    Catches: the native engine never raising the randomized or zero-gradient warning."""
    from bench.masked_zoo import Noise, Quantize
    model, x, y = setting
    front = Quantize(16) if wrap == "quantize" else Noise(0.05)
    masked = torch.nn.Sequential(front, model).eval()
    flags = {}
    for impl in ("native", "original"):
        torch.manual_seed(0)
        res = run_autoattack(masked, x[:20], y[:20], 0.05, norm="Linf", version=["apgd-ce", "apgd-t"], impl=impl)
        flags[impl] = set(res.flags)
    assert flag in flags["original"]
    assert flags["native"] == flags["original"], flags


@pytest.fixture(scope="module")
def pgd_trained():
    """A digits MLP trained with PGD (Linf 0.1, 5 steps, 60 full-batch epochs): APGD-CE leaves survivors that the
    later attacks of the standard version still break, so each attack's own verdicts are compared where they matter."""
    xtr, ytr, x, y = digits_split(1000, slice(1300, 1500))
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        d = (torch.rand_like(xtr) * 2 - 1) * 0.1
        for _ in range(5):
            d.requires_grad_(True)
            (g,) = torch.autograd.grad(nn.functional.cross_entropy(model((xtr + d).clamp(0, 1)), ytr), d)
            d = (d.detach() + 0.025 * g.sign()).clamp(-0.1, 0.1)
        opt.zero_grad()
        nn.functional.cross_entropy(model((xtr + d).clamp(0, 1)), ytr).backward()
        opt.step()
    return model.eval(), x, y


@pytest.mark.parametrize("attack, eps", [("apgd-t", 0.15), ("fab-t", 0.15), ("square", 0.2)])
def test_each_attack_alone_agrees_with_the_original_where_apgd_ce_left_survivors(pgd_trained, attack, eps):
    """On the points the original's APGD-CE leaves on a PGD-trained MLP, each later attack of the standard version
    runs alone on both engines: both break some, and the white-box verdicts agree point for point (at most one point
    apart); our Square, whose squares may touch the last row and column, is at least as strong (measured: 13 kept
    against 15 of 18)."""
    model, x, y = pgd_trained
    first = run_autoattack(model, x, y, eps, norm="Linf", version=["apgd-ce"], impl="original")
    xs, ys = x[first.robust], y[first.robust]
    assert xs.shape[0] >= 15
    kept = {}
    for impl in ("native", "original"):
        res = run_autoattack(model, xs, ys, eps, norm="Linf", version=[attack], impl=impl, n_queries=2000)
        kept[impl] = res.robust
    n = xs.shape[0]
    assert int(kept["original"].sum()) < n and int(kept["native"].sum()) < n, (attack, n, kept)
    if attack == "square":
        assert int(kept["native"].sum()) <= int(kept["original"].sum()) + 1
    else:
        assert abs(int(kept["native"].sum()) - int(kept["original"].sum())) <= 1
        assert float((kept["native"] == kept["original"]).float().mean()) >= 0.97


def test_the_equivalence_check_reads_the_originals_own_seed_spread(setting):
    """`bench perf --attacks --equivalence`'s verdict at one eps: both engines at two seeds on the same points, the
    gap between their means against the original's spread over its seeds (at least one point), mean passes per point
    against the original's mean and its spread over seeds; a masked model needs native at or below the original instead."""
    from bench.equivalence import compare
    model, x, y = setting
    v = compare(model, x[:16], y[:16], 0.3, seeds=2, masked=False)
    assert len(v["original"]) == len(v["native"]) == 2 and v["point_evaluations"] == 32
    assert v["gap"] == pytest.approx(sum(v["native"]) / 2 - sum(v["original"]) / 2, abs=0.01)
    assert v["original_spread"] >= 100 / 16
    pp = v["passes_per_point"]
    assert all(pp[e][k] == pytest.approx(sum(s[k] for s in v["passes_per_seed"][e]) / 2, abs=0.01)
               for e in ("original", "native") for k in ("forward", "backward"))
    spread = {k: max(s[k] for s in v["passes_per_seed"]["original"]) - min(s[k] for s in v["passes_per_seed"]["original"])
              for k in ("forward", "backward")}
    assert v["original_passes_spread"] == pytest.approx(spread, abs=0.01)
    assert v["native_more_passes"] == any(pp["native"][k] > pp["original"][k] + spread[k] for k in ("forward", "backward"))
    assert v["equivalent"] == (abs(v["gap"]) <= v["original_spread"] and not v["native_more_passes"])


def test_square_discards_rows_by_their_own_pace(setting):
    """Square's statistics-based discarding (the fast suite's, native engine only): at Linf 1e-4 no row can break
    and every margin stalls, so every row leaves at the first checkpoint, a fifth of the budget (closed form: the
    start plus q/5 queries per point); where Square breaks some points (Linf 0.1 on the digits MLP, 2000 queries) as
    many fall as without it, for at most 0.6 of the forwards (a dropped row shifts the random draws of the others, so
    the count, not the set, is what can be compared). The rule keeps a row on
    pace (its margin falls as much per doubling of queries as is left) and drops a stalled one. The original engine
    refuses it. Catches: a mark taken after the rule (every row dropped), rows never dropped, discarding in
    AutoAttack's own Square."""
    from lawbench.attacks.square import SquareConfig, checkpoints, discard, square
    model, x, y = setting
    xi = x.reshape(-1, 1, 8, 8)
    net = torch.nn.Sequential(torch.nn.Flatten(), model)
    q = 500
    assert checkpoints(q) == {100: 50, 200: 100, 400: 200}
    counted = Counted(net)
    found = square(counted, xi, y, 1e-4, "Linf", SquareConfig(n_queries=q, discard=2.0), seed=0)
    assert not bool(found.broken.any())
    assert counted.passes.forward == x.shape[0] * (1 + q // 5)
    broken, passes = {}, {}
    for k in (0.0, 2.0):
        counted = Counted(net)
        broken[k] = int(square(counted, xi, y, 0.1, "Linf", SquareConfig(n_queries=2000, discard=k), seed=0).broken.sum())
        passes[k] = counted.passes.forward
    assert 0 < broken[0.0] < x.shape[0]
    assert broken[2.0] == broken[0.0] and passes[2.0] <= 0.6 * passes[0.0], (broken, passes)
    # at a fifth of the budget log2(5) = 2.32 doublings are left: a row 3 above zero that fell by 1 over the last
    # doubling may still fall 2 x 1 x 2.32 = 4.6 and stays; one that fell by 0.1 is dropped
    mark, now = torch.tensor([4.0, 4.0, 4.0]), torch.tensor([2.0, 3.0, 3.9])
    assert discard(mark, now, 100, q, 2.0).tolist() == [False, False, True]
    assert run_autoattack(model, x, y, 1e-4, norm="Linf", version=["square"], impl="native", n_queries=q,
                          square_discard=2.0).info["passes_attack"]["forward"] < x.shape[0] * q
    with pytest.raises(AttackError, match="native engine only"):
        run_autoattack(model, x, y, 0.1, norm="Linf", version=["square"], impl="original", n_queries=q,
                       square_discard=2.0)


def test_the_equivalence_run_is_kept_beside_the_zoo_for_bench_perf(tmp_path, capsys):
    """`bench perf --attacks --equivalence` keeps each model's verdicts beside the zoo as it ends; `bench perf
    --attacks` reports them per model and eps, and says which models were never measured."""
    import json
    from bench.equivalence import main, saved, summary
    cache = tmp_path / "cache"
    assert main(["--quick", "--models", "mlp-erm", "--seeds", "2", "--points", "4", "--cache", str(cache),
                 "--json", str(tmp_path / "eq.json")]) == 0
    kept = json.loads(saved(cache, quick=True).read_text())
    assert kept["models"] == json.loads((tmp_path / "eq.json").read_text())["models"]
    got = summary(cache, ["mlp-erm", "cnn-erm"], quick=True)
    assert got["models"]["cnn-erm"] is None and got["points"] == 4 and got["seeds"] == 2
    assert got["models"]["mlp-erm"] == {e: v["equivalent"] for e, v in kept["models"]["mlp-erm"].items()}
    assert set(got["models"]["mlp-erm"]) == {"0.05", "0.1", "0.2", "0.3"}
    assert summary(cache, ["mlp-erm"])["models"] == {"mlp-erm": None}  # the full zoo's are apart
    assert "equivalent on every model and eps" in capsys.readouterr().out
    # a second run on the same points and seeds keeps what the first saved; --again measures it anew
    import bench.equivalence as equivalence
    args = ["--quick", "--models", "mlp-erm", "--seeds", "2", "--points", "4", "--cache", str(cache)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(equivalence, "compare", lambda *a: pytest.fail("measured again what was saved"))
        assert main(args) == 0
        assert capsys.readouterr().err.count("(saved)") == 4
        with pytest.raises(pytest.fail.Exception, match="measured again"):
            main(args + ["--again"])
    assert json.loads(saved(cache, quick=True).read_text())["models"] == kept["models"]
    # results are taken again only for the same weights; --keep FILE saves and resumes there instead
    assert {v["weights"] for v in kept["models"]["mlp-erm"].values()} == {
        equivalence.fingerprint(equivalence.zoo(True, cache, print, "mlp-erm")[0]["mlp-erm"])}
    other = {e: {**v, "weights": "0" * 16} for e, v in kept["models"]["mlp-erm"].items()}
    other = {**kept, "models": {"mlp-erm": other}}
    (tmp_path / "keep.json").write_text(json.dumps(other))
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = equivalence.compare
        mp.setattr(equivalence, "compare", lambda *a: calls.append(a[3]) or real(*a))
        assert main(args + ["--keep", str(tmp_path / "keep.json")]) == 0
    assert calls == [0.05, 0.1, 0.2, 0.3]
    again = json.loads((tmp_path / "keep.json").read_text())["models"]["mlp-erm"]
    assert {v["weights"] for v in again.values()} == {kept["models"]["mlp-erm"]["0.1"]["weights"]}
    assert not list(tmp_path.glob("*.lock"))  # the lock stays beside the zoo
    # a saved verdict is judged again by today's test as it is read (a model since counted as masked, say)
    kept["models"]["mlp-erm"]["0.1"]["equivalent"] = not kept["models"]["mlp-erm"]["0.1"]["equivalent"]
    saved(cache, quick=True).write_text(json.dumps(kept))
    assert summary(cache, ["mlp-erm"], quick=True)["models"]["mlp-erm"] == got["models"]["mlp-erm"]  # as before
    # bench perf --attacks counts only verdicts measured on its own zoo's weights (a file from another machine)
    mine = {"mlp-erm": kept["models"]["mlp-erm"]["0.1"]["weights"]}
    assert summary(cache, ["mlp-erm"], quick=True, weights=mine)["models"] == {"mlp-erm": got["models"]["mlp-erm"]}
    assert summary(cache, ["mlp-erm"], quick=True, weights={"mlp-erm": "0" * 16})["models"] == {"mlp-erm": None}


class _Noise(torch.nn.Module):
    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return x + self.sigma * torch.randn_like(x)


def test_the_rand_version_attacks_a_randomized_model_for_its_whole_budget(monkeypatch):
    """AutoAttack's rand version on a randomized model (the original's protocol): APGD's rows run every iteration
    and a point's example is the iterate most of its step's EOT draws misclassified, so a fresh vote rarely reverses
    it; a row leaves early only when all 20 draws of a step misclassify its iterate. So the rows of the points left
    robust spend 20 draws x (100 iterations + the start) each, and the others less. Catches: rows stopping at their
    first hit (3 + 4 examples reversed by a fresh vote at eps 0.2, against 0 and 1 here), and the standard engine
    not asking for it."""
    import lawbench.attacks.standard as standard
    from lawbench.attacks.randomized import Randomized, majority_misclassified
    xtr, ytr, x, y = digits_split(800, slice(1300, 1600))
    model = train_digits_mlp(0, xtr, ytr)
    reversed_ = 0
    for sigma in (0.1, 0.3):
        inner = Counted(torch.nn.Sequential(_Noise(sigma), model).eval())
        net = Randomized(inner)
        torch.manual_seed(0)
        found = apgd(net, x, y, 0.2, "Linf", APGDConfig(loss="ce", eot=20, run_on=True), seed=0)
        left = int((~found.broken).sum())
        assert 20 * 101 * max(left, 1) <= inner.passes.forward < 20 * 101 * x.shape[0], (left, inner.passes)
        torch.manual_seed(1)
        reversed_ += int((~majority_misclassified(net, found.x_adv[found.broken], y[found.broken])).sum())
    assert reversed_ <= 2, reversed_
    asked = []
    real = standard.apgd
    monkeypatch.setattr(standard, "apgd", lambda m, *a, **k: asked.append(a[4]) or real(m, *a, **k))
    run_autoattack(Randomized(Counted(torch.nn.Sequential(_Noise(0.1), model).eval())), x[:20], y[:20], 0.1,
                   norm="Linf", version=["apgd-ce"], impl="native")
    assert [c.run_on for c in asked] == [True]


def test_a_masked_model_needs_native_at_or_below_and_a_randomized_one_within_a_means_noise(tmp_path):
    """Masked: native's mean at or below the original's. Randomized (each verdict a draw): within the original's
    seed spread over sqrt(seeds), since the same engine run twice fails a strict test half the time (the noisy MLP
    at 0.1: original 10.0, 9.6, 10.8, 10.4 against native 11.2, 9.2, 10.8, 10.0). RANDOMIZED names the zoo's
    randomized models, as the engines see them."""
    from bench.attacks_perf import MASKED, RANDOMIZED, zoo
    from bench.equivalence import verdict
    from lawbench.attacks import is_randomized
    pp = {"original": {"forward": 1940.84, "backward": 1910.92}, "native": {"forward": 1957.1, "backward": 1929.1}}
    seen = {"gap": 0.1, "original_spread": 1.2, "original": [10.0, 9.6, 10.8, 10.4], "passes_per_point": pp,
            "original_passes_spread": {"forward": 16.18, "backward": 16.16}}
    # the passes too (the noisy MLP at 0.3: one point more attacked on average, the clean verdict being a vote)
    assert verdict(seen, masked=True, randomized=True) and not verdict(seen, masked=True)
    assert not verdict({**seen, "gap": 0.61}, masked=True, randomized=True)
    fewer = {**seen, "passes_per_point": {**pp, "native": {"forward": 1950.0, "backward": 1920.0}}}
    assert verdict({**fewer, "gap": 0.61}, masked=False) and not verdict({**fewer, "gap": 1.21}, masked=False)
    assert verdict(fewer, masked=True, randomized=True) and not verdict({**fewer, "gap": 0.1}, masked=True)
    more = {**seen, "passes_per_point": {**pp, "native": {"forward": 1966.0, "backward": 1929.1}}}
    assert not verdict({**more, "gap": -1.0}, masked=True, randomized=True)
    assert set(RANDOMIZED) <= set(MASKED)
    models, x, _ = zoo(True, tmp_path, lambda m: None, "mlp-noisy,mlp-quant16")
    assert {name for name, m in models.items() if is_randomized(m, x[:8])} == set(RANDOMIZED)


def test_an_interrupted_equivalence_run_resumes_after_the_seeds_it_ended(tmp_path):
    """A CNN's eps takes an hour on one core: each seed's record is kept as it ends (``partial``), an interrupted
    run resumes from the next seed and takes the ended ones as they are, and a partial eps is no verdict yet."""
    import json
    import bench.equivalence as equivalence
    cache, keep = tmp_path / "cache", tmp_path / "keep.json"
    args = ["--quick", "--models", "mlp-erm", "--seeds", "3", "--points", "4", "--cache", str(cache),
            "--keep", str(keep)]
    real_native, real_reference, calls = equivalence.native, equivalence.reference, []

    def dies_at_third_seed(model, x, y, eps, seed):
        if seed == 2:
            raise KeyboardInterrupt
        return real_native(model, x, y, eps, seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(equivalence, "native", dies_at_third_seed)
        with pytest.raises(KeyboardInterrupt):
            equivalence.main(args)
    ended = json.loads(keep.read_text())["models"]["mlp-erm"]
    assert list(ended) == ["0.05"] and len(ended["0.05"]["partial"]) == 2
    assert "equivalent" not in ended["0.05"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(equivalence, "reference", lambda m, x, y, e, s: calls.append((e, s)) or real_reference(m, x, y, e, s))
        assert equivalence.main(args) == 0
    assert calls == [(0.05, 2)] + [(e, s) for e in (0.1, 0.2, 0.3) for s in range(3)]
    done = json.loads(keep.read_text())["models"]["mlp-erm"]
    assert set(done) == {"0.05", "0.1", "0.2", "0.3"} and all("partial" not in v for v in done.values())
    first = ended["0.05"]["partial"]
    assert done["0.05"]["original"][:2] == [r["original"] for r in first]
    assert done["0.05"]["seconds_per_seed"]["native"][:2] == [r["seconds"]["native"] for r in first]
    assert done["0.05"]["point_evaluations"] == 12 and isinstance(done["0.05"]["equivalent"], bool)


def test_native_runs_big_batches_of_rows_in_cache_sized_chunks():
    """The native engine runs a batch of rows in chunks of CHUNK_BYTES of activations: a small CNN's 300 rows in
    pieces, an MLP's whole. The same logits and input gradients, the same passes counted; the probe that sizes the
    chunks is no pass; a randomized model keeps its wrapper outside. Catches: chunks that drop or reorder rows, a
    probe counted as an attack pass, a wrapper that hides randomness from the attacks."""
    from bench.zoo import small_cnn
    from lawbench.attacks.randomized import Randomized
    from lawbench.attacks.rows import CHUNK_BYTES, Chunked, activation_bytes, chunked
    torch.manual_seed(0)
    cnn = small_cnn().eval()
    x = torch.rand(300, 1, 28, 28)
    counted = Counted(cnn)
    net = chunked(counted, x)
    assert isinstance(net, Chunked) and 64 <= net.rows < 300
    assert net.rows == max(64, CHUNK_BYTES // activation_bytes(cnn, x[:1])) and counted.passes.forward == 0
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xs).logsumexp(1).sum(), xs)
    xp = x.clone().requires_grad_(True)
    (g_plain,) = torch.autograd.grad(cnn(xp).logsumexp(1).sum(), xp)
    assert torch.allclose(g, g_plain, atol=1e-6) and torch.allclose(net(x), cnn(x), atol=1e-5)
    assert counted.passes.forward == 2 * 300 and counted.passes.backward == 300
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    assert chunked(mlp, torch.rand(5, 64)).rows >= 2000  # an MLP's 9 targets x 250 points stay one batch
    noisy = chunked(Randomized(mlp, 7, 5), torch.rand(5, 64))
    assert isinstance(noisy, Randomized) and isinstance(noisy.model, Chunked) and (noisy.eot, noisy.votes) == (7, 5)


class _Viewed(torch.nn.Module):
    """A CNN written the old way: ``.view`` of a convolution's output, which fails in channels-last memory."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def test_attacks_run_a_cnn_in_channels_last_memory_and_give_it_back():
    """Inside attacks.rows.channels_last a CNN's weights are channels-last (even a one-channel conv, whose default
    strides pass the flag), the logits equal to float rounding, the probe no attack pass; afterwards every weight
    has its own strides and values back. A model that fails in that layout (a ``.view``) keeps its own and the
    attack runs. Catches: weights left channels-last after an attack, a probe counted as a pass, a view model broken
    by the layout, a CNN silently left in the slow layout."""
    from bench.zoo import small_cnn
    from lawbench.attacks.autoattack import run_autoattack
    from lawbench.attacks.rows import channels_last, chunked
    torch.manual_seed(0)
    cnn, x = small_cnn().eval(), torch.rand(40, 1, 28, 28)
    before = {n: (p.stride(), p.detach().clone()) for n, p in cnn.named_parameters()}
    counted = Counted(cnn)
    with channels_last(chunked(counted, x), x):
        inside = {n: p.stride() for n, p in cnn.named_parameters() if p.dim() == 4}
        logits = cnn(x)
    assert all(s == torch.empty_like(dict(cnn.named_parameters())[n], memory_format=torch.channels_last).stride()
               for n, s in inside.items()) and inside["0.weight"] != before["0.weight"][0]
    assert counted.passes.forward == 0 and torch.allclose(logits, cnn(x), atol=1e-5)
    assert all(p.stride() == before[n][0] and torch.equal(p, before[n][1]) for n, p in cnn.named_parameters())
    viewed = _Viewed().eval()
    with channels_last(viewed, x):
        assert viewed.conv.weight.stride() == (9, 9, 3, 1)
    y = cnn(x).argmax(1)
    res = run_autoattack(viewed, x[:8], viewed(x[:8]).argmax(1), 0.1, norm="Linf", version=["apgd-ce"])
    assert res.info["impl"] == "native" and res.info["passes"]["forward"] > 0
    res = run_autoattack(cnn, x[:8], y[:8], 0.1, norm="Linf", version=["apgd-ce"])
    assert all(p.stride() == before[n][0] for n, p in cnn.named_parameters())


def test_the_equivalence_run_refuses_bad_input_in_one_line_and_keeps_its_file(tmp_path, capsys):
    """Negative points, an unwritable --keep, and a kept file of other points or seeds: one line, exit 2, nothing
    measured, the file untouched (a run at --points -5 once relabelled the kept evidence as 5 points short)."""
    import json
    from bench.equivalence import main
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"n": 250, "seeds": 4, "models": {"mlp-erm": {}}}))
    before = keep.read_text()
    for args in (["--points", "-5"], ["--keep", "/proc/nope/x.json"], ["--points", "100", "--keep", str(keep)]):
        assert main(["--quick", "--models", "mlp-erm", "--cache", str(tmp_path / "c"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bench perf --attacks --equivalence:"), err
    assert keep.read_text() == before
