"""The law, measured: the smooth recipe against ERM on the law's own data (Gaussian inputs, noisy teacher labels),
through the CLI; the frontier and exponent reports read back against the rows."""
import math

import pytest
import torch

from lawbench import certify
from lawbench import datasets
from lawbench import models
from lawbench.reports import markdown
from lawbench.reports.rows import read_rows
from conftest import run_in_process

# Gaussian d=16, n=200, 20% flipped labels: widths 256 and 1024 (p/(n·d) 1.5 and 6) interpolate under ERM.
LAW_TINY = ["law", "width=[256,1024]", "seed=[0,1]", "label_noise=0.2", "n_train=200", "n_test=100",
            "d=16", "recipe=[erm,smooth]", "pgd_steps=5", "eps_L2=[0.5]", "smooth_epochs=25", "smooth_restarts=1",
            "lip_points=64", "executor=local"]


@pytest.fixture(scope="module")
def law_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("law")
    from bench.cli import main
    assert main(["run", *LAW_TINY, "--out", str(out)]) == 0
    return out, [r for r in read_rows(out / "results.jsonl")]


def _pairs(rows):
    by = {(r["recipe"], r["width"], r["seed"]): r for r in rows}
    return [(by[("erm", w, s)], by[("smooth", w, s)]) for (rec, w, s) in by if rec == "erm"]


def _reload(out, row):
    data = datasets.load_dataset("gauss", n_train=200, n_test=100, label_noise=0.2, seed=row["seed"], d=16,
                                 margin=row["data_margin"] or 0.0)
    model = models.get_model("mlp", in_shape=(16,), num_classes=2, width=row["width"])
    models.load_checkpoint(model, out / "checkpoints" / f"{row['train_key']}.pt")
    return model.eval(), data


def test_smooth_recipe_interpolates_below_erm_at_every_width_and_seed(law_run):
    """Both fit every (noisy) training label; the smooth model's certified bound lies below ERM's, although it fits
    at margin 1 and ERM at whatever margin it stopped with; the numbers are recomputed from the checkpoints."""
    out, rows = law_run
    pairs = _pairs(rows)
    assert len(pairs) == 4 and all(r["status"] == "ok" for r in rows)
    for erm, smooth in pairs:
        assert erm["interpolates"] is True and smooth["interpolates"] is True, (erm["width"], erm["seed"])
        assert smooth["noisy_fit"] == 1.0
        assert smooth["lip_upper"] < erm["lip_upper"], (erm["width"], erm["seed"], smooth["lip_upper"],
                                                        erm["lip_upper"])
        assert smooth["train_margin"] == pytest.approx(1.0, rel=1e-3)  # the output scale the search fixes
        assert smooth["lip_upper_unit_margin"] < erm["lip_upper_unit_margin"]  # and at equal margins, by far
        # independent of how tight the certificate is: the smooth model's certified bound lies below a slope the
        # ERM model was seen to have (its empirical lower bound), at equal margins
        assert smooth["lip_upper_unit_margin"] < erm["lip_lower_unit_margin"]
        for row in (erm, smooth):
            model, data = _reload(out, row)
            with torch.no_grad():
                logits = model(data.x_train)
            assert bool((logits.argmax(1) == data.y_train).all())
            true = logits.gather(1, data.y_train[:, None]).squeeze(1)
            other = logits.scatter(1, data.y_train[:, None], float("-inf")).max(1).values
            assert row["train_margin"] == pytest.approx(float((true - other).min()), rel=1e-5)
            upper = certify.lipschitz_upper(model, (16,)).value
            assert row["lip_upper"] == pytest.approx(upper, rel=1e-9)
            # exact for a one-hidden-layer net at most by the product of the layers' spectral norms
            w1, w2 = (m.weight.detach().double() for m in model if isinstance(m, torch.nn.Linear))
            assert upper <= float(torch.linalg.matrix_norm(w2, 2) * torch.linalg.matrix_norm(w1, 2)) * (1 + 1e-9)


def test_smooth_rows_record_the_search(law_run):
    """The trace starts at ERM's checkpoint (the ERM row's own); the row records every attempt (bench.smooth.starts)
    and which won: the lowest certified bound at margin 1 of them all, below ERM's, which is the ERM row's own bound
    at margin 1; the row's bound at margin 1 is the winner's (tests/test_smooth.py checks the search itself)."""
    out, rows = law_run
    for erm, smooth in _pairs(rows):
        trace = smooth["smooth_trace"]
        assert smooth["smooth_base"] == erm["train_key"] and smooth["smooth_searched"] is True
        assert trace[0]["lambda"] == 0.0 and trace[0]["start"] == "erm"
        assert trace[0]["min_margin"] == pytest.approx(erm["train_margin"], rel=1e-5)
        attempts = smooth["smooth_attempts"]
        assert [a["method"] for a in attempts[:3]] == ["erm", "erm", "scratch"]  # smooth_restarts=1
        # the same certified bound over the same smallest margin, the margin measured twice in float32 (in the search
        # and in the row: they agree to 1e-5, above)
        assert smooth["smooth_erm_bound"] == pytest.approx(erm["lip_upper_unit_margin"], rel=1e-5)
        won = attempts[smooth["smooth_winner"]]
        assert won["won"] and won["bound_unit_margin"] == min(a["bound_unit_margin"] for a in attempts
                                                              if a["bound_unit_margin"] is not None)
        assert smooth["lip_upper_unit_margin"] == pytest.approx(won["bound_unit_margin"], rel=1e-4)
        assert smooth["smooth_penalty"] == won["penalty"] and "smooth-no-gain" not in smooth["flags"]


def test_smooth_rerun_reuses_both_checkpoints(law_run, capsys, tmp_path):
    """A second run with one more seed trains only that seed's cells; the smooth cell of a new seed reuses its ERM
    cell's checkpoint (trained once, shared)."""
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(law_run[0], out)  # the module's store stays as the other tests read it
    code, stdout, err = run_in_process(["run", *LAW_TINY, "width=256", "seed=[0,1,2]", "--out", str(out)], capsys)
    assert code == 0, err
    assert "2 cells: " not in stdout and "6 cells: 4 already in" in stdout
    new = [r for r in read_rows(out / "results.jsonl") if r["seed"] == 2]
    assert {r["recipe"] for r in new} == {"erm", "smooth"}
    erm = next(r for r in new if r["recipe"] == "erm")
    smooth = next(r for r in new if r["recipe"] == "smooth")
    assert smooth["smooth_base"] == erm["train_key"] and smooth["train_key"] != erm["train_key"]
    assert erm["checkpoint_cached"] is False and smooth["checkpoint_cached"] is False


def _md_tables(md: str, heading: str) -> list[dict]:
    """The GitHub table right after `heading`, read back as {header: cell}."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(heading))
    while not lines[i].startswith("|"):
        i += 1
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    out = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        out.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def test_report_frontier_and_exponents_read_back_against_the_rows(law_run):
    """The frontier table's 'ERM → smooth' cells are the seeds' means of the rows; the envelope lies under every
    interpolating row and touches one; the p exponent is the mean over seeds of independent per-seed fits."""
    import numpy as np
    from lawbench import reports
    out, rows = law_run
    reports.render(out / "results.jsonl", out, formats=("md", "png"))
    md = (out / "report" / "leaderboard.md").read_text()
    table = _md_tables(md, "### Frontier: gauss · L2 · mlp · noise 0.2 · n=200 · d=16")
    assert [t["width"] for t in table] == ["256", "1024"]
    for t in table:
        width = int(t["width"])
        for key, column in (("lip_upper", "lip_upper"), ("lip_lower", "lip_lower"), ("train_margin", "train margin"),
                            ("lip_upper_unit_margin", "lip_upper at margin 1"),
                            ("lip_lower_unit_margin", "lip_lower at margin 1")):
            erm, smooth = (float(v) for v in t[column].split(" → "))
            for recipe, shown in (("erm", erm), ("smooth", smooth)):
                mean = _mean([r[key] for r in rows if r["width"] == width and r["recipe"] == recipe])
                assert shown == pytest.approx(mean, rel=1e-3), (width, key, recipe)
        assert t["interpolating"] == "2/2 → 2/2"
        erm, smooth = (float(v) for v in t["robust @0.5"].split(" → "))
        assert erm == pytest.approx(100 * _mean([r["robust_acc"]["0.5"] for r in rows if r["width"] == width
                                                 and r["recipe"] == "erm"]), abs=0.006)
    note = next(line for line in md.splitlines() if "law's scale under every interpolating" in line)
    c = float(note.split(": ")[1].split("·")[0])
    for r in rows:  # at margin 1: the bound over the smallest training margin
        assert r["lip_upper_unit_margin"] == pytest.approx(r["lip_upper"] / r["train_margin"], rel=1e-12)
    margins = [r["lip_lower"] / r["train_margin"] / math.sqrt(1 / r["ratio"]) for r in rows if r["interpolates"]]
    assert min(margins) >= c * (1 - 5e-3) and min(margins) == pytest.approx(c, rel=5e-3)  # c shown to 3 digits
    exps = _md_tables(md, "### Exponents")
    line = next(t for t in exps if t["study"] == "gauss · L2 · mlp · erm · noise 0.2" and t["bound"] == "lip_upper")
    assert line["b (n; law +0.5)"] == "not varied" and line["c (d; law +0.5)"] == "not varied"
    per_seed = []
    for seed in (0, 1):
        pts = [(math.log(r["params"]), math.log(r["lip_upper"] * r["data_scale"])) for r in rows
               if r["recipe"] == "erm" and r["seed"] == seed]
        per_seed.append(np.polyfit(*zip(*pts), 1)[0])
    assert float(line["a (p; law −0.5)"].split()[0]) == pytest.approx(np.mean(per_seed), abs=6e-4)
    assert (out / "report" / "frontier.png").stat().st_size > 10_000


def test_smooth_below_erm_on_noisy_mnist(tmp_path, capsys):
    """law-mnist, tiny: 300 real digits with 10% flipped labels; at each width both recipes interpolate and the
    smooth model's certified bound at margin 1 is below ERM's (raw bounds compare only at equal margins)."""
    code, _, err = run_in_process(["run", "law-mnist", "n_train=300", "n_test=50", "width=[64,256]", "seed=0",
                                   "pgd_steps=3", "eps_Linf=[0.05]", "aa_eps_Linf=[]", "autoattack=off",
                                   "lip_points=32", "smooth_restarts=0", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = read_rows(tmp_path / "results.jsonl")
    for erm, smooth in _pairs(rows):
        assert erm["interpolates"] and smooth["interpolates"] and smooth["noisy_fit"] == 1.0
        assert smooth["smooth_searched"] and smooth["smooth_penalty"] > 0, smooth["smooth_trace"]
        assert smooth["lip_upper_unit_margin"] < erm["lip_upper_unit_margin"], (erm["width"], smooth["lip_upper"],
                                                                                erm["lip_upper"], erm["train_margin"])


def test_exponent_fit_recovers_known_exponents_in_the_law_units():
    """Rows whose Lipschitz constant (in the law's units: pixel constant times data_scale) is exactly
    3·p^-0.5·n^0.5·d^0.5 give back (-0.5, 0.5, 0.5) per seed; with noise the mean and interval over seeds are those
    of per-seed least squares with Student's t (scipy); non-interpolating rows never enter."""
    import numpy as np
    from scipy import stats
    from lawbench.reports import law

    def rows(noise, seeds, rng):
        out = []
        for seed in seeds:
            for p in (1e3, 4e3, 1.6e4):
                for n in (100, 400):
                    for d in (16, 64):
                        scale = math.sqrt(d) / 8
                        lip = 3 * p ** -0.5 * n ** 0.5 * d ** 0.5 * math.exp(noise * rng.normal())
                        out.append({"status": "ok", "interpolates": True, "dataset": "gauss", "threat": "L2",
                                    "family": "mlp", "recipe": "erm", "label_noise": 0.2, "seed": seed,
                                    "params": p, "n_train": n, "d": d, "d_eff": d, "data_scale": scale,
                                    "lip_upper": lip / scale})
        return out

    rng = np.random.default_rng(0)
    exact = law.fit_exponents(rows(0.0, [0], rng))
    assert len(exact) == 1 and exact[0].varied == ("p", "n", "d")
    assert [exact[0].coef[v] for v in "pnd"] == pytest.approx([-0.5, 0.5, 0.5], abs=1e-9)
    noisy = rows(0.1, [0, 1, 2], rng)
    outside = dict(noisy[0], interpolates=False, lip_upper=1e6)
    res = law.fit_exponents(noisy + [outside])[0]
    per_seed = []
    for seed in (0, 1, 2):
        pts = [r for r in noisy if r["seed"] == seed]
        A = np.column_stack([np.log([[r["params"], r["n_train"], r["d"]] for r in pts]), np.ones(len(pts))])
        per_seed.append(np.linalg.lstsq(A, np.log([r["lip_upper"] * r["data_scale"] for r in pts]), rcond=None)[0])
    per_seed = np.array(per_seed)
    for j, v in enumerate("pnd"):
        half = stats.t.ppf(0.975, 2) * per_seed[:, j].std(ddof=1) / math.sqrt(3)
        assert res.coef[v] == pytest.approx(per_seed[:, j].mean(), abs=1e-9)
        assert res.half[v] == pytest.approx(half, rel=1e-6)
    assert res.n_points == 36 and res.method == "seeds"


def test_exponents_split_at_p_equals_nd_and_start_at_the_peak():
    """A width sweep whose Lipschitz constant rises up to an interpolation peak (p/(n·d) = 0.2), then falls as
    p^-0.25 up to p = n·d and as p^-0.5 beyond: each regime's fit recovers its own exponent, leaves out the rows before
    the peak and says where the peak is; a fit across both regimes and the peak would give neither exponent."""
    from lawbench.reports import law
    n, d = 1000, 10

    def lip(ratio):
        if ratio < 0.2:
            return 5 * (ratio / 0.2) ** 1.0  # the rise towards the interpolation threshold
        return 5 * (ratio / 0.2) ** -0.25 if ratio < 1 else 5 * 5 ** -0.25 * ratio ** -0.5

    ratios = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 4.0, 8.0]
    rows = [{"status": "ok", "interpolates": True, "dataset": "gauss", "threat": "L2", "family": "mlp",
             "recipe": "erm", "label_noise": 0.2, "seed": 0, "params": r * n * d, "n_train": n, "d": d,
             "ratio": r, "lip_upper": lip(r)} for r in ratios]
    assert law.interpolation_peak(rows, "lip_upper") == pytest.approx(0.2)
    below, = law.fit_exponents(rows, regime="p < n·d", past_peak=True)
    above, = law.fit_exponents(rows, regime="p ≥ n·d", past_peak=True)
    assert below.coef["p"] == pytest.approx(-0.25, abs=1e-9) and below.before_peak == 2 and below.n_points == 4
    assert above.coef["p"] == pytest.approx(-0.5, abs=1e-9) and above.before_peak == 0 and above.n_points == 4
    across, = law.fit_exponents(rows)
    assert abs(across.coef["p"] + 0.25) > 0.05 and abs(across.coef["p"] + 0.5) > 0.05
    md = markdown.exponent_table(rows)
    assert "peak at p/(n·d) 0.2; 2 row(s) before it" in md and "p ≥ n·d" in md and "-0.500" in md
