"""Attacks by name in the spec: the registry drives the run. Per-attack counts add up to the robust-accuracy drop at
every eps, each attack's time and settings are in the row, and the default suite keeps its cell ids."""
from __future__ import annotations

import json

import pytest

from bench.spec import build_spec, cell_id, expand
from lawbench.attacks.fast import MASKED_STARTS
from conftest import TINY, bench_cli, run_in_process

# TINY's AutoAttack is the custom [apgd-ce]; these sweeps name their own attacks
BASE = [a for a in TINY if not a.startswith(("autoattack=", "attacks="))] + ["width=[8]"]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def assert_breaks_add_up(row):
    n = row["n_test"]
    for k, breaks in row["attack_breaks"].items():
        drop = round((row["clean_acc"] - row["robust_acc"][k]) * n)
        assert sum(breaks.values()) == drop, (k, breaks, drop)
        assert set(breaks) <= set(row["suite"])


def test_pgd_then_square_through_the_cli(tmp_path):
    out = tmp_path / "out"
    res = bench_cli("run", *BASE, "attacks=[pgd,ta-square]", "attack.ta-square.n_queries=200",
                    "attack.ta-square.eps=[0.05,0.1]", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = rows(out)
    assert row["suite"] == ["pgd", "ta-square"]
    assert row["attack_settings"]["ta-square"] == {"eps": [0.05, 0.1], "n_queries": 200}
    assert row["attack_settings"]["pgd"]["steps"] == 10
    assert set(row["attack_seconds"]) == {"pgd", "ta-square"}
    assert all(v is None for v in row["autoattack_acc"].values())  # AutoAttack did not run
    assert_breaks_add_up(row)
    assert set(row["attack_breaks"]["0.05"]) == {"pgd", "ta-square"}
    log = (out / "logs" / f"{row['cell_id']}.log").read_text()
    assert "ta-square: Linf eps=0.05" in log and "ta-square: Linf eps=0.1" in log


def test_an_attack_alone_without_pgd(tmp_path):
    out = tmp_path / "out"
    res = bench_cli("run", *BASE, "attacks=[ta-fgsm]", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = rows(out)
    assert row["suite"] == ["ta-fgsm"]
    assert row["pgd_acc"] == {k: row["clean_acc"] for k in row["pgd_acc"]}  # no PGD ran: nothing broken by it
    assert_breaks_add_up(row)
    assert row["attack_breaks"]["0.05"] == {}  # FGSM ran only at the AutoAttack eps, 0.1


def _ids(overrides) -> set:
    return {cell_id(c) for c in expand(build_spec("default", overrides))}


def test_default_suite_verifies_every_eps_and_legacy_ids_hold(tmp_path):
    default = _ids(BASE)
    assert default == _ids([*BASE, "attacks=[pgd,fast,autoattack,adaptive]"])
    assert _ids([*BASE, "attacks=[pgd,fast,autoattack]"]).isdisjoint(default)  # rows without the adaptive stage re-run
    # the suite cells had before every eps was verified keeps their ids (they carry no attacks key) ...
    legacy = expand(build_spec("default", [*BASE, "attacks=[pgd,autoattack]"]))
    assert all("attacks" not in c for c in legacy)
    # ... and is not the default any more: a store of such rows is re-run, not read as verified
    assert {cell_id(c) for c in legacy}.isdisjoint(default)
    assert _ids([*BASE, "attacks=[pgd]"]).isdisjoint(default)
    out = tmp_path / "out"
    res = bench_cli("run", *BASE, "autoattack=[apgd-ce]", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = rows(out)
    assert row["suite"] == ["pgd", "fast", "autoattack", "adaptive"]
    assert set(row["attack_indicators"]) <= set(row["robust_acc"])  # measured at every eps with survivors
    # a custom AutoAttack list (TINY's [apgd-ce]) verifies nothing: fast covers every eps, and every eps is verified
    assert row["attack_settings"]["autoattack"]["eps"] == [0.1] and row["attack_settings"]["fast"]["eps"] == row["eps"]
    assert row["verified"] == {k: True for k in row["robust_acc"]} and "unverified" not in row["flags"]
    assert_breaks_add_up(row)
    # AutoAttack standard verifies its headline eps: fast takes the others
    from bench.runner import attack_suite
    (cell,) = expand(build_spec("default", [*BASE, "autoattack=standard"]))
    assert [(st.name, st.eps, st.verifies) for st in attack_suite(cell)] == [
        ("fast", (0.05,), True), ("autoattack", (0.1,), True), ("adaptive", (0.05, 0.1), False)]
    (cell,) = expand(build_spec("default", [*BASE, "autoattack=standard", "attack.fast.eps=[0.1]"]))
    assert [(st.name, st.eps) for st in attack_suite(cell)] == [("fast", (0.1,)), ("autoattack", (0.1,)),
                                                               ("adaptive", (0.05, 0.1))]


def test_pgd_alone_is_marked_unverified(tmp_path):
    out = tmp_path / "out"
    res = bench_cli("run", *BASE, "attacks=[pgd,autoattack]", "autoattack=[apgd-ce]", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = rows(out)
    # no AutoAttack-grade attack ran: unverified unless nothing is left standing
    for k, v in row["verified"].items():  # a custom AutoAttack list ([apgd-ce]) verifies nothing either
        assert v == (row["robust_acc"][k] == 0), (k, row["verified"])
    assert ("unverified" in row["flags"]) == (not all(row["verified"].values()))


@pytest.mark.parametrize("override, culprit", [
    ("attacks=[pgd,nope]", "attacks"),
    ("attacks=[]", "attacks"),
    ("attacks=[pgd,pgd]", "attacks"),
    ("attack.ta-square.bogus=1", "attack.ta-square"),  # not in attacks
    ("attack.autoattack.version=plus", "autoattack"),
    ("attack.pgd.steps=0", "pgd_steps"),
    ("attack.fast.square_queries=-5", "attack.fast.square_queries"),  # no query run: every point "robust"
    ("attack.fast.square_queries=2.5", "attack.fast.square_queries"),
    ("attack.fast.targets=true", "attack.fast.targets"),
])
def test_bad_attack_settings_are_refused(override, culprit, tmp_path, capsys):
    extra = [] if "bogus" in override else ["attacks=[fast]"] if "fast" in override else ["attacks=[pgd,ta-square]"]
    code, _, err = run_in_process(["run", *BASE, *extra, override, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and culprit in err
    assert not (tmp_path / "out").exists()


def test_attack_options_are_checked_against_the_attack():
    from bench.spec import SpecError
    with pytest.raises(SpecError, match="unknown option of attack 'ta-square'"):
        build_spec("default", ["attacks=[pgd,ta-square]", "attack.ta-square.steps=3"])
    with pytest.raises(SpecError, match=r"\[0.7\] not in eps_Linf"):
        build_spec("default", ["attacks=[pgd,ta-fgsm]", "attack.ta-fgsm.eps=[0.7]"])


def test_fast_suite_through_the_cli(tmp_path):
    out = tmp_path / "out"
    res = bench_cli("run", *BASE, "attacks=[fast]", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = rows(out)
    assert row["suite"] == ["fast"]
    assert row["attack_settings"]["fast"]["eps"] == [0.05, 0.1]  # a sweeping attack: every eps of the sweep
    assert row["verified"] == {"0.05": True, "0.1": True}
    n = row["n_test"]
    standing = {"0.05": round(row["clean_acc"] * n), "0.1": round(row["robust_acc"]["0.05"] * n)}
    for k in ("0.05", "0.1"):  # each eps attacks what nothing broke yet (breaks at 0.05 carry to 0.1)
        stages = row["attack_details"]["fast"][k]
        assert list(stages) == ["pgd", "apgd-t", "square"][:len(stages)]
        assert stages["pgd"]["attacked"] == standing[k]
    assert_breaks_add_up(row)
    assert sum(s["broke"] for s in stages.values()) == row["attack_breaks"]["0.1"]["fast"] - row["attack_breaks"][
        "0.05"]["fast"]


def quantized(model, levels=8):
    """A gradient-masking input quantization in front of a model (zero gradient almost everywhere)."""
    from bench.attacks_perf import Quantize
    import torch
    return torch.nn.Sequential(Quantize(levels), model).eval()


@pytest.fixture(scope="module")
def zoo():
    from conftest import digits_split, train_digits_mlp
    xtr, ytr, xte, yte = digits_split(600, slice(1000, 1060))
    plain = train_digits_mlp(0, xtr, ytr, width=64, epochs=80)
    return {"mlp": plain, "quantized": quantized(plain)}, xte, yte


@pytest.mark.parametrize("name", ["mlp", "quantized"])
def test_fast_suite_at_or_below_autoattack(zoo, name):
    """On the same points and seed the fast suite keeps no more points than AutoAttack standard, and on the
    gradient-masked model it raises AutoAttack's zero-gradient flag and spends the full Square budget."""
    from lawbench.attacks import run_autoattack
    from lawbench.attacks.fast import run_fast
    models, x, y = zoo
    model, eps = models[name], 0.08
    aa = run_autoattack(model, x, y, eps, norm="Linf", version="standard", seed=0)
    robust, x_adv, info = run_fast(model, x, y, eps, norm="Linf", seed=0)
    assert int(robust.sum()) <= int(aa.robust.sum())
    broke = ~robust
    with __import__("torch").no_grad():
        assert bool((model(x_adv[broke]).argmax(1) != y[broke]).all())  # every break is a real example
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    if name == "quantized":
        assert "zero_gradients" in info["flags"]
        assert info["stages"]["square"]["queries"] == 5000
        assert info["stages"]["square"]["starts"] == MASKED_STARTS
        assert "apgd-t" not in info["stages"] and "pgd" not in info["stages"]  # no gradient stage can move them
    else:
        assert "apgd-t" in info["stages"] or int(robust.sum()) == 0


def test_square_starts_folds_its_starts_per_point(zoo):
    """Square from several starts in one batch: a point is robust only when every start failed; a broken point's
    example is a real one inside the ball, and the starts do at least what each start alone did in that batch."""
    import torch
    from lawbench.attacks.autoattack import square_starts
    models, x, y = zoo
    model, eps = models["quantized"], 0.08
    res = square_starts(model, x, y, eps, "Linf", starts=3, queries=300, seed=0, batch_size=1000, log=None)
    assert res.robust.shape == (x.shape[0],) and res.info["starts"] == 3 and res.x_adv.shape == x.shape
    with torch.no_grad():
        wrong = model(res.x_adv).argmax(1) != y
    clean_wrong = model(x).argmax(1) != y
    assert bool((wrong | clean_wrong)[~res.robust].all())
    assert bool((res.x_adv[res.robust] == x[res.robust]).all())
    assert float((res.x_adv - x).abs().max()) <= eps + 1e-6
    assert 0 < int((~res.robust).sum()) < x.shape[0]


def test_zero_jacobian_flags_only_flat_points(zoo):
    """Exactly-zero logit Jacobians: every point of the quantized model, none of the plain one (saturated softmax
    points included: their logits still move)."""
    from lawbench.attacks.fast import zero_jacobian
    models, x, _ = zoo
    assert bool(zero_jacobian(models["quantized"], x).all())
    assert not bool(zero_jacobian(models["mlp"], x).any())
    assert not bool(zero_jacobian(models["mlp"], x * 50.0).any())


def test_perf_attacks_quick_writes_json(tmp_path, capsys):
    """`bench perf --attacks --quick`: three masked MLPs (scaled logits, quantized input, input noise) measured three
    ways at every eps of the sweep; the maxima recomputed from them."""
    import bench.perf as perf
    out = tmp_path / "attacks.json"
    assert perf.main(["--attacks", "--quick", "--models", "mlp-scaled,mlp-quant16,mlp-noisy", "--json",
                      str(out), "--cache", str(tmp_path / "cache")]) == 0
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"mlp-scaled", "mlp-quant16", "mlp-noisy"}
    assert res["sweep"] == [0.05, 0.1, 0.2, 0.3]
    per = res["models"].values()
    assert res["fast_acc_gap_max"] == max(m["fast_acc_gap"] for m in per)
    assert res["fast_time_ratio"] == max(m["fast_time_ratio"] for m in per)
    assert res["pipeline_time_ratio"] == max(m["pipeline_time_ratio"] for m in per)
    assert res["masked_pipeline_time_ratio"] == max(res["models"][k]["pipeline_time_ratio"]
                                                    for k in ("mlp-scaled", "mlp-quant16", "mlp-noisy"))
    gaps = [g[k] for m in per for g in m["eps"].values() for k in ("pipeline_gap", "fast_gap")]
    assert res["gap_max_all_eps"] == max(gaps + [m["fast_acc_gap"] for m in per])  # the headline-alone run too
    for name, m in res["models"].items():
        assert set(m["eps"]) == {"0.05", "0.1", "0.2", "0.3"}
        for k, g in m["eps"].items():
            assert g["pipeline_gap"] == round(g["pipeline"] - g["autoattack"], 2)
            assert g["pipeline_verified"], (name, k)  # the default pipeline verifies every eps
    # on the deterministic models the fast suite is AutoAttack grade point for point: every point pyautoattack breaks,
    # fast breaks too, at every eps (the noisy model's verdicts are draws: its spread is the reference's own)
    for name in ("mlp-scaled", "mlp-quant16"):
        for k, g in res["models"][name]["eps"].items():
            assert g["fast_misses"] == 0 and g["fast"] <= g["autoattack"], (name, k, g)
            assert g["fast_gap"] == round(g["fast"] - g["autoattack"], 2)
            assert g["native_misses"] == 0 and g["native"] <= g["autoattack"], (name, k, g)  # native: the same
    # the native engine beside the original, and every method's passes
    assert res["native_gap_max"] == max(m["native_gap_max"] for m in per)
    assert res["native_agreement_min"] == min(m["native_agreement_min"] for m in per)
    assert res["native_time_ratio"] == max(m["native_time_ratio"] for m in per)
    for m in per:
        assert set(m["passes_per_point"]) == {"autoattack", "native", "pipeline", "fast"}
        assert m["passes_per_point"]["autoattack"]["forward"] > 0 and m["passes_per_point"]["native"]["forward"] > 0
        for g in m["eps"].values():
            assert 0 <= g["native_agreement"] <= 1
    assert set(res["passes_per_point"]) == {"autoattack", "native", "pipeline", "fast"}
    assert "randomized" in res["models"]["mlp-noisy"]["flags_pipeline"]
    assert "softmax_saturated" in res["models"]["mlp-scaled"]["flags_pipeline"]
    assert "zero_gradients" in res["models"]["mlp-quant16"]["flags_pipeline"]
    assert res["fast_gap_max"] == max(g["fast_gap"] for m in per for g in m["eps"].values())
    assert res["fast_gap_max_deterministic"] == max(g["fast_gap"] for k in ("mlp-scaled", "mlp-quant16")
                                                    for g in res["models"][k]["eps"].values())
    pp = res["passes_per_point"]["fast"]
    assert res["targets"]["passes_per_point.fast<=650+320"] == (pp["forward"] <= 650 and pp["backward"] <= 320)
    # the engines' equivalence is its own command's (kept beside the zoo): not measured in this cache
    assert res["equivalence"]["models"] == {"mlp-scaled": None, "mlp-quant16": None, "mlp-noisy": None}
    assert "fast_time_ratio" in capsys.readouterr().out


PLUGIN_ATTACK = '''
import torch
from lawbench.attacks import register_attack
from lawbench.attacks.registry import AttackOutput


@register_attack("plugin-shift", kind="plugin", description="a user's attack: every pixel moved down by scale·eps")
def shift(model, x, y, eps, *, norm, seed, log=None, scale=1.0):
    x_adv = (x - scale * eps).clamp(0, 1)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    if log:
        log(f"plugin-shift: scale {scale}")
    return AttackOutput(robust, x_adv, {"scale": scale})
'''


def test_a_plugin_attack_runs_by_name_through_the_cli(tmp_path):
    """An attack a --plugin module registers can be named in the spec (names are resolved after plugins load), takes
    its options from [attack.NAME], goes through the one check (its examples judged in the exact ball) and shows in
    the row like any other."""
    plugin = tmp_path / "my_attacks.py"
    plugin.write_text(PLUGIN_ATTACK)
    out = tmp_path / "out"
    res = bench_cli("run", *BASE, "attacks=[pgd,plugin-shift]", "attack.plugin-shift.scale=0.5", "--plugin",
                    str(plugin), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = rows(out)
    assert row["status"] == "ok", row.get("error")
    assert row["suite"] == ["pgd", "plugin-shift"]
    assert row["attack_settings"]["plugin-shift"] == {"eps": [0.1], "scale": 0.5}
    assert "plugin-shift" in row["attack_check"]["0.1"]  # validated by the suite's check
    assert_breaks_add_up(row)
    log = (out / "logs" / f"{row['cell_id']}.log").read_text()
    assert "plugin-shift: scale 0.5" in log
    # without the plugin the name is unknown: one line, exit 2, with the close match
    res = bench_cli("run", *BASE, "attacks=[pgd,plugin-shift]", "--out", str(tmp_path / "other"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "unknown name 'plugin-shift'" in res.stderr


def test_autoattack_has_one_door():
    """The suite runs every attack through the registry: its module never names one."""
    import inspect
    from lawbench.attacks import evaluate
    src = inspect.getsource(evaluate._SuiteState)
    assert '"autoattack"' not in src and "run_autoattack" not in src
