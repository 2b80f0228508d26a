"""Our AutoAttack engine (attacks.standard, autoattack_impl = "native") against the original (pyautoattack), point for
point on small models; its pieces against the original's own functions; targets and restarts as rows, counted."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import digits_split, run_in_process, train_digits_mlp
from lawbench.attacks.apgd import APGDConfig, apgd, rank_by_logit
from lawbench.attacks.autoattack import run_autoattack
from lawbench.attacks.cost import Counted
from lawbench.attacks.fab import project_to_hyperplane
from lawbench.attacks.rows import Found
from lawbench.attacks.square import SquareConfig, eta, square


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, x, y = digits_split(800, slice(1300, 1400))
    torch.manual_seed(3)
    nn = torch.nn
    cnn = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 36, 10))
    opt = torch.optim.Adam(cnn.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(cnn(xtr), ytr).backward()
        opt.step()
    return {"mlp": train_digits_mlp(0, xtr, ytr).eval(), "cnn": cnn.eval()}, x, y


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_equals_the_originals(norm):
    """FAB's projection onto the hyperplane within [0, 1]: our sort-based solve against pyautoattack's, on reachable
    and unreachable hyperplanes, with and without zero weights."""
    from pyautoattack.fab_projections import projection_l2, projection_linf
    ref = projection_linf if norm == "Linf" else projection_l2
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        t = torch.rand(64, 40, generator=gen, dtype=torch.float64)
        w = torch.randn(64, 40, generator=gen, dtype=torch.float64)
        if trial % 2:
            w[w.abs() < 0.4] = 0
        scale = 0.5 + 3 * torch.rand(64, generator=gen, dtype=torch.float64) * (trial >= 3)  # >= 3: some beyond reach
        b = (w * torch.rand(64, 40, generator=gen, dtype=torch.float64)).sum(1) * scale
        if trial >= 4:  # rows with no gradient at all (behind a quantizer): no step, and the others' unchanged
            whole = project_to_hyperplane(t, w, b, norm)
            w[::3] = 0
        ours = project_to_hyperplane(t, w, b, norm)
        assert torch.allclose(ours, ref(t.clone(), w.clone(), b.clone()), atol=1e-9)
        if trial >= 4:
            assert bool((ours[::3] == 0).all())
            keep = torch.arange(64) % 3 != 0
            assert torch.equal(ours[keep], whole[keep])
        assert bool(((t + ours) >= -1e-12).all() and ((t + ours) <= 1 + 1e-12).all())


def test_the_projections_sort_is_torchs_float_sort_bit_for_bit(monkeypatch):
    """FAB sorts rho by its int32 bit patterns on the CPU (fab._ascending): the same permutation as rho.sort, so the
    same steps bit for bit, on float32 digits with the ties of real images (background pixels, 17 grey levels) and
    signed zeros. Projected in pieces of rows (fab.PIECE_FLOATS), the same steps too."""
    import lawbench.attacks.fab as fab
    xtr, _, _, _ = digits_split(400, slice(0, 0))
    gen = torch.Generator().manual_seed(1)
    t = xtr.reshape(400, -1)
    w = torch.randn(t.shape, generator=gen)
    w[w.abs() < 0.3] = 0.0
    rho = torch.where(w > 0, 1.0 - t, t)
    rho[:, ::7] = -0.0
    assert torch.equal(fab._ascending(rho)[1], rho.sort(1)[1])
    t[:, ::5] = -0.0
    b = (w * torch.rand(t.shape, generator=gen)).sum(1)
    ours = {n: fab.project_to_hyperplane(t, w, b, n) for n in ("Linf", "L2")}
    monkeypatch.setattr(fab, "PIECE_FLOATS", 64 * 37)  # pieces of 37 rows, the last one short
    for n, d in ours.items():
        assert torch.equal(d.view(torch.int32), fab.project_to_hyperplane(t, w, b, n).view(torch.int32))
    monkeypatch.setattr(fab, "_ascending", lambda r: r.sort(1))
    for n, d in ours.items():
        assert torch.equal(d.view(torch.int32), fab.project_to_hyperplane(t, w, b, n).view(torch.int32))


def test_fab_updates_only_misclassified_rows_with_the_same_result(digits, monkeypatch):
    """On the CPU, FAB keeps its misclassified iterates on those rows alone (rows.rows_of); every row, as on an
    accelerator, gives the same examples bit for bit."""
    import lawbench.attacks.fab as fab
    models, x, y = digits
    model = models["mlp"]
    targets = rank_by_logit(model, x, y, 9)
    runs = []
    for rows_of in (fab.rows_of, lambda mask: slice(None)):
        monkeypatch.setattr(fab, "rows_of", rows_of)
        found = fab.fab_targeted(model, x, y, 0.1, "Linf", targets, fab.FABConfig(n_iter=30))
        runs.append(found)
    assert 0 < int(runs[0].broken.sum()) < x.shape[0]
    assert torch.equal(runs[0].broken, runs[1].broken)
    assert torch.equal(runs[0].x_adv.view(torch.int32), runs[1].x_adv.view(torch.int32))


def test_squares_linf_proposal_draws_the_same_window_and_keeps_the_same_rows():
    """Square's Linf proposal builds its window from two 0/1 sides (square._window_sides): the same draw as the
    mask of _window from the same generator state, at every side length; and the rows a query keeps are copied in
    place on the CPU (square._take), as one where would."""
    import lawbench.attacks.square as sq
    for s in (1, 3, 8, 28):
        g1, g2 = torch.Generator().manual_seed(s), torch.Generator().manual_seed(s)
        _, mask = sq._window(50, 28, s, g1, torch.device("cpu"))
        in_h, in_w = sq._window_sides(50, 28, s, g2, torch.device("cpu"), torch.float32)
        assert torch.equal(in_h * in_w, mask.float())
        assert torch.equal(g1.get_state(), g2.get_state())
    gen = torch.Generator().manual_seed(0)
    xb, x_new = torch.rand(40, 1, 28, 28, generator=gen), torch.rand(40, 1, 28, 28, generator=gen)
    take = torch.rand(40, generator=gen) > 0.7
    assert torch.equal(sq._take(take, x_new, xb.clone()), torch.where(take[:, None, None, None], x_new, xb))


def test_square_l2_pattern_is_the_originals():
    from pyautoattack.square import SquareAttack
    atk = SquareAttack(lambda z: z, norm="L2", eps=1.0, device="cpu")
    for s in (3, 5, 8, 13):
        torch.manual_seed(0)
        theirs = atk.eta(s)
        mine = eta(s, torch.device("cpu"), torch.float32)
        assert torch.allclose(theirs, mine, atol=1e-6) or torch.allclose(theirs, mine.T, atol=1e-6)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.4)])
def test_native_agrees_with_the_original_point_for_point(digits, norm, eps):
    """Both engines on the same 100 points: the white-box attacks of the standard version in its order (APGD-CE,
    APGD-T, FAB-T), then Square alone (its loop, 300 queries here; bench perf --attacks runs the 5000). Native keeps
    at most one point more and spends no more passes; the white-box verdicts agree on at least 97 of 100. Square's
    do not, by design: the original's squares never touch the last row and column (its random_int(0, h - s)
    excludes h - s), ours can, so ours breaks more points (on 8x8 digits, 35 robust against 78 at 300 queries)."""
    models, x, y = digits
    for name, model in models.items():
        for attacks, queries in ((["apgd-ce", "apgd-t", "fab-t"], None), (["square"], 300)):
            nat = run_autoattack(model, x, y, eps, norm=norm, version=attacks, impl="native", seed=0,
                                 n_queries=queries)
            org = run_autoattack(model, x, y, eps, norm=norm, version=attacks, impl="original", seed=0,
                                 n_queries=queries)
            kept_n, kept_o = int(nat.robust.sum()), int(org.robust.sum())
            assert 5 <= kept_o <= 95, (name, attacks, kept_o)   # something to compare on both sides
            assert kept_n <= kept_o + 1, (name, attacks, kept_n, kept_o)
            if attacks != ["square"]:
                assert float((nat.robust == org.robust).float().mean()) >= 0.97, (name, attacks)
            assert nat.info["impl"] == "native" and org.info["impl"] == "original"
            assert nat.info["attacks"] == org.info["attacks"] == attacks
            for k in ("forward", "backward"):
                assert nat.info["passes"][k] <= org.info["passes"][k], (name, attacks, k, nat.info["passes"],
                                                                         org.info["passes"])


def test_targets_are_rows_and_a_broken_point_drops_them(digits):
    """APGD-T: every (point, target) is a row from the start (the first forward covers 9 rows per point), and a
    point broken early leaves with all its rows: the passes fall short of 9 x 101 per point."""
    models, x, y = digits
    model = Counted(models["mlp"])
    targets = rank_by_logit(model, x, y, 9)
    model.passes.forward = model.passes.backward = 0
    found = apgd(model, x, y, 0.1, "Linf", APGDConfig(loss="dlr-targeted"), targets=targets,
                 found=Found.start(x, model(x).argmax(1) != y))
    robust_at_start = int((models["mlp"](x).argmax(1) == y).sum())
    broken = int(found.broken.sum()) - (100 - robust_at_start)
    assert broken > 0
    assert model.passes.backward >= 9 * robust_at_start            # the start: one row per (point, target)
    assert model.passes.backward < 9 * 101 * robust_at_start       # broken points stopped early
    assert model.passes.backward >= 9 * 101 * (robust_at_start - broken)  # survivors ran every iteration


def test_square_restarts_are_rows(digits):
    """Square's start costs one forward per row: a row per (point, restart)."""
    models, x, y = digits
    xi = x[:10].reshape(10, 1, 8, 8)
    for restarts in (1, 3):
        model = Counted(lambda_img(models["mlp"]))
        square(model, xi, y[:10], 0.05, "Linf", SquareConfig(n_queries=0, restarts=restarts), seed=0)
        assert model.passes.forward == 10 * restarts


class lambda_img(torch.nn.Module):  # noqa: N801 - a vector model seen on 8x8 images
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, z):
        return self.m(z.reshape(z.shape[0], -1))


def test_native_through_the_cli_counts_passes_and_refuses_plus(tmp_path, capsys):
    from lawbench.reports.rows import read_rows
    base = ["dataset=digits", "n_train=300", "n_test=30", "width=32", "epochs=30", "recipe=erm", "label_noise=0",
            "eps_Linf=[0.05,0.1]", "aa_eps_Linf=[0.1]", "lip_points=16", "pgd_steps=5", "executor.name=local",
            "attacks=[pgd,autoattack]"]
    code, out, err = run_in_process(["run", *base, "--out", str(tmp_path / "n")], capsys)  # native: the default
    assert code == 0, err
    (row,) = read_rows(tmp_path / "n" / "results.jsonl")
    assert row["status"] == "ok" and row["autoattack_impl"] == "native"
    assert row["attack_settings"]["autoattack"]["impl"] == "native"
    assert row["attack_passes"]["pgd"]["all"]["backward"] > 0
    aa = row["attack_passes"]["autoattack"]["0.1"]
    assert aa["forward"] > 0 and aa["forward"] >= aa["backward"]
    # the original, one key away: its cell carries no key (ids as before), and the key's absence means the original
    code, out, err = run_in_process(["run", *base, "autoattack_impl=original", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    (row,) = read_rows(tmp_path / "o" / "results.jsonl")
    assert "autoattack_impl" not in row["cell"] and row["autoattack_impl"] == "original"
    assert row["attack_settings"]["autoattack"]["impl"] == "original"
    code, _, err = run_in_process(["run", *base, "autoattack_impl=native", "autoattack=plus", "--out",
                                   str(tmp_path / "p")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "autoattack_impl" in err
    assert not (tmp_path / "p").exists()


ORIGINAL_CELL_ID = "85f4f202516ab532"  # `default width=40 recipe=erm` while the original was the default engine


def test_original_cells_keep_their_ids():
    """A cell on the original engine has no autoattack_impl key: stores made before the key resume as they were. The
    default engine is native; a version only the original runs takes the original unless an engine is named."""
    from bench.spec import SpecError, build_spec, cell_id, expand
    (orig,) = expand(build_spec("default", ["width=40", "recipe=erm", "autoattack_impl=original"]))
    (nat,) = expand(build_spec("default", ["width=40", "recipe=erm", "autoattack_impl=native"]))
    (dflt,) = expand(build_spec("default", ["width=40", "recipe=erm"]))
    assert "autoattack_impl" not in orig and nat["autoattack_impl"] == "native"
    assert cell_id(orig) != cell_id(nat) and cell_id(dflt) == cell_id(nat)
    # a cell id stored before native was the default (width 40, ERM, default preset): the original's cell, unchanged
    assert cell_id(orig) == ORIGINAL_CELL_ID
    for version in ("autoattack=plus", "autoattack=[apgd-ce,fab]"):
        (plus,) = expand(build_spec("default", ["width=40", "recipe=erm", version]))
        assert "autoattack_impl" not in plus, version
    with pytest.raises(SpecError, match="autoattack_impl"):
        build_spec("default", ["autoattack=plus", "autoattack_impl=native"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the rows-on-the-device path is "
                    "exercised where one is present")
def test_native_runs_with_its_rows_on_the_gpu(digits):
    """The same engine with the model, the points and every row on the GPU: the verdicts agree with the CPU run's."""
    models, x, y = digits
    model = models["mlp"]
    cpu = run_autoattack(model, x, y, 0.1, norm="Linf", version=["apgd-ce", "apgd-t", "fab-t"], impl="native")
    gpu_model = copy.deepcopy(model).to("cuda")
    gpu = run_autoattack(gpu_model, x.cuda(), y.cuda(), 0.1, norm="Linf", version=["apgd-ce", "apgd-t", "fab-t"],
                         impl="native")
    assert gpu.robust.device.type == "cuda"
    assert float((gpu.robust.cpu() == cpu.robust).float().mean()) >= 0.97
