"""The law's synthetic data with a margin teacher: inputs within gamma of the teacher's boundary are redrawn, so the
clean labels admit a classifier robust at every eps < gamma. Checked against the data and a strong attack on the
teacher itself, not against the sampler's own bookkeeping."""
import json
import math

import pytest
import torch

from lawbench.attacks.pgd import pgd_sweep
from lawbench.datasets import DatasetError, load_dataset
from lawbench.datasets.registry import make_rng, teacher_distance
from conftest import bench_cli, run_in_process
from lawbench.reports.rows import read_rows


class Teacher(torch.nn.Module):
    """The linear teacher as a model: logits (x - 0.5) @ W in pixel space (labels are its argmax)."""

    def __init__(self, d: int, classes: int, teacher_seed: int = 0):
        super().__init__()
        W = make_rng(teacher_seed, 100).standard_normal((d, classes))
        self.register_buffer("W", torch.tensor(W, dtype=torch.float64))

    def forward(self, x):
        return ((x.double().reshape(x.shape[0], -1) - 0.5) @ self.W).float()


def _robust(model, x, y, eps_pix):
    res = pgd_sweep(model, x, y, list(eps_pix), norm="L2", steps=100, restarts=2, loss="margin", seed=0)
    return res.robust.float().mean(1)


@pytest.mark.parametrize("d,classes,dist", [(64, 2, "gauss"), (32, 3, "gauss"), (64, 2, "sphere")])
def test_every_point_lies_gamma_from_the_boundary_and_the_teacher_is_robust_below_gamma(d, classes, dist):
    gamma = 0.15
    s = load_dataset("gauss", n_train=400, n_test=300, seed=1, d=d, num_classes=classes, dist=dist, margin=gamma,
                     label_noise=0.2)
    scale = s.meta.scale
    W = make_rng(0, 100).standard_normal((d, classes))
    for x, y in ((s.x_train, s.y_train_clean), (s.x_test, s.y_test)):
        assert float(teacher_distance(x.numpy(), y.numpy(), W).min()) >= gamma * scale
    assert s.meta.n_noisy == round(0.2 * 400)  # label noise independent of x, on training labels only
    teacher = Teacher(d, classes).eval()
    assert bool((teacher(s.x_test).argmax(1) == s.y_test).all())
    acc = _robust(teacher, s.x_test, s.y_test, [0.5 * gamma * scale, 0.95 * gamma * scale, 2 * gamma * scale])
    assert acc[0] == 1.0 and acc[1] == 1.0   # no point breaks below gamma
    assert acc[2] < 0.9                       # and the attack is not toothless above it


def test_without_a_margin_the_data_caps_every_model():
    """The old ceiling: with no margin even the teacher keeps only about P(|Z| > 0.8) = 42% at eps 0.1 (d=64)."""
    s = load_dataset("gauss", n_train=10, n_test=1000, seed=0)
    acc = float(_robust(Teacher(64, 2).eval(), s.x_test, s.y_test, [0.1 * s.meta.scale])[0])
    assert abs(acc - 2 * (1 - 0.5 * (1 + math.erf(0.8 / math.sqrt(2))))) < 0.05, acc
    m = load_dataset("gauss", n_train=10, n_test=1000, seed=0, margin=0.1)
    assert float(_robust(Teacher(64, 2).eval(), m.x_test, m.y_test, [0.099 * m.meta.scale])[0]) == 1.0


def test_no_margin_draws_what_it_drew_before():
    a = load_dataset("gauss", n_train=50, n_test=20, seed=3)
    b = load_dataset("gauss", n_train=50, n_test=20, seed=3, margin=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert b.meta.options["margin"] == 0.0


@pytest.mark.parametrize("bad", ["x", -0.1, float("nan"), float("inf"), 1.5, True])
def test_a_bad_margin_is_refused_in_one_line(bad):
    with pytest.raises(DatasetError, match="margin"):
        load_dataset("gauss", n_train=10, n_test=10, margin=bad)


def test_a_margin_too_wide_to_sample_is_refused_not_looped_on():
    with pytest.raises(DatasetError, match="smaller margin"):
        load_dataset("gauss", n_train=10, n_test=10, margin=0.9)  # 7 std: never


def test_the_row_records_gamma_and_a_bad_one_leaves_the_store_untouched(tmp_path):
    out = tmp_path / "out"
    spec = ["law", "data_options.margin=0.2", "width=32", "seed=0", "recipe=erm", "label_noise=0", "epochs=50",
            "n_train=100", "n_test=50", "eps_L2=[0.1]", "attacks=[pgd]", "lip_points=16"]
    r = bench_cli("run", *spec, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["data_margin"] == 0.2 and row["status"] == "ok"
    before = (out / "results.jsonl").read_bytes()
    r = bench_cli("run", *spec, "data_options.margin=-1", "--out", str(out))
    assert r.returncode == 2 and "margin" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (out / "results.jsonl").read_bytes() == before


def test_the_noise_free_control_is_smoother_than_the_noisy_fit_at_every_width(tmp_path, capsys):
    """The control is a control: with a margin, clean labels admit a smooth interpolator at every p, so the smooth
    recipe's certified bound at margin 1 on clean labels lies below the one on 20% flipped labels at every width
    (without a margin the clean fit came out rougher than the noisy one). Through the CLI, in the law's units."""
    out = tmp_path / "out"
    spec = ["law", "d=16", "n_train=100", "n_test=50", "width=[64,256,1024]", "seed=0", "recipe=smooth",
            "label_noise=[0,0.2]", "smooth_epochs=10", "smooth_restarts=0", "attacks=[pgd]", "pgd_steps=2",
            "eps_L2=[0.05]", "lip_points=16", "executor=local"]
    code, _, err = run_in_process(["run", *spec, "--out", str(out)], capsys)
    assert code == 0, err[-2000:]
    rows = read_rows(out / "results.jsonl")
    by = {(r["width"], r["label_noise"]): r for r in rows}
    assert len(by) == 6 and all(r["status"] == "ok" and r["interpolates"] for r in rows)
    for w in (64, 256, 1024):
        control, noisy = (by[(w, noise)]["lip_upper_unit_margin"] * by[(w, noise)]["data_scale"]
                          for noise in (0.0, 0.2))
        assert control < noisy, (w, control, noisy)
        # the clean fit's bound sits near the teacher's own scale, about 1/gamma per unit margin, not at the law's
        assert control < 4 / 0.2, (w, control)
