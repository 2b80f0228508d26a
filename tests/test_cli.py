"""The CLI end to end on the embedded MNIST-5k: a tiny sweep (the standard AutoAttack, the printed table read back, the
row's numbers recomputed from its checkpoint), re-runs, a cell that breaks an invariant, and resume after kills at
random instants, mid-write included."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, SUBPROCESS_ENV, TINY, bench_cli, run_in_process
from lawbench.reports.console import row_radii
from lawbench.reports.rows import read_rows
from lawbench.reports.schema import REQUIRED_KEYS, check_row, undeclared

STANDARD_AA = ["apgd-ce", "apgd-t", "fab-t", "square"]  # pyautoattack's standard version, in its order


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny sweep as a user runs it, with the standard AutoAttack (the one CLI test that keeps it)."""
    out = tmp_path_factory.mktemp("run")
    res = bench_cli("run", *TINY, "autoattack=standard", "--out", str(out))
    return out, res


def parse_results_table(stdout: str) -> list[dict]:
    """The last table printed (rich box drawing), read back: one {column: text} per model row (group rows, which
    have no width, are left out)."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("┏")]
    assert starts, "no table in the output:\n" + stdout
    header, rows = None, []
    for line in lines[starts[-1]:]:
        s = line.strip()
        if s.startswith("┃") and header is None:
            header = [c.strip() for c in s.strip("┃").split("┃")]
        elif s.startswith("│"):
            cells = [c.strip() for c in s.strip("│").split("│")]
            assert header is not None and len(cells) == len(header), line
            row = dict(zip(header, cells))
            if row["width"]:
                rows.append(row)
        elif s.startswith("└"):
            break
    assert header is not None, stdout
    return rows


def load_trained(out, row):
    """The row's model rebuilt from its checkpoint, and the data split reloaded, independently of the runner."""
    from lawbench import datasets
    from lawbench import models
    data = datasets.load_dataset("mnist5k", n_train=row["n_train"], n_test=row["n_test"],
                                 label_noise=row["label_noise"], seed=row["seed"])
    model = models.get_model("mlp", in_shape=tuple(data.meta.in_shape), num_classes=10, width=row["width"])
    models.load_checkpoint(model, out / "checkpoints" / f"{row['train_key']}.pt")
    return model.eval(), data


def fgsm_accuracy(model, x, y, eps: float) -> float:
    """Accuracy under one signed-gradient step to the corner of the Linf ball: a weak attack PGD must not lose to."""
    import torch
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    x_adv = torch.clamp(x.detach() + eps * x.grad.sign(), 0, 1)
    x_adv = torch.min(torch.max(x_adv, x.detach() - eps), x.detach() + eps)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).sum().item() / len(y)


def test_tiny_sweep_writes_contract_rows_and_prints_table(tiny_run):
    import torch
    out, res = tiny_run
    assert res.returncode == 0, res.stdout + res.stderr
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert sorted(r["width"] for r in rows) == [8, 32]
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert check_row(row) == [] and undeclared(row) == []  # every key declared, every value of its type
        assert row["dataset"] == "mnist5k" and row["n_train"] == 200 and row["n_test"] == 40 and row["d"] == 784
        assert row["data_source"] == "embedded"
        assert row["params"] == 784 * row["width"] + row["width"] + row["width"] * 10 + 10
        assert row["ratio"] == pytest.approx(row["params"] / (200 * 784))
        assert row["law_scale"] == pytest.approx((200 * 784 / row["params"]) ** 0.5)
        assert set(row["pgd_acc"]) == {"0.05", "0.1"}
        assert row["autoattack_acc"]["0.1"] is not None and row["autoattack_acc"]["0.05"] is None
        assert row["autoattack"] == "standard"
        # recomputed from the checkpoint on the reloaded split, without the runner
        model, data = load_trained(out, row)
        with torch.no_grad():
            clean = (model(data.x_test).argmax(1) == data.y_test).sum().item() / len(data.y_test)
            train = (model(data.x_train).argmax(1) == data.y_train).sum().item() / len(data.y_train)
        assert row["clean_acc"] == pytest.approx(clean, abs=1e-9)
        assert row["train_acc"] == pytest.approx(train, abs=1e-9)
        assert row["clean_acc"] > 0.4  # real digits: even a width-8 net learns them
        # the attacks did their work: the worst case over PGD and AutoAttack is about as strong as one FGSM step
        # or stronger (per point it need not dominate it: two points of slack out of 40)
        assert row["robust_acc"]["0.1"] <= fgsm_accuracy(model, data.x_test, data.y_test, 0.1) + 2 / 40 + 1e-9
        assert row["robust_acc"]["0.1"] < row["clean_acc"] / 2
        # the Lipschitz bounds bracket the truth: the upper bound is above the local Jacobian norm at test points,
        # the lower bound below the product of the layers' spectral norms (a valid upper bound for this MLP)
        m64 = model.double()
        jac = max(float(torch.linalg.matrix_norm(
            torch.autograd.functional.jacobian(lambda z: m64(z.unsqueeze(0))[0], x).reshape(10, -1), 2))
            for x in data.x_test[:8].double())
        weights = [layer.weight.detach() for layer in m64 if isinstance(layer, torch.nn.Linear)]
        product = float(torch.linalg.matrix_norm(weights[0], 2) * torch.linalg.matrix_norm(weights[1], 2))
        assert row["lip_upper"] >= jac * (1 - 1e-9)
        assert row["lip_lower"] <= product * (1 + 1e-9)
        assert row["lip_lower"] > 0.3 * jac  # a real search, not a token secant
        # certificates: the per-point best of three methods, never above any one method's count; radii quartiles
        for k in ("0.05", "0.1"):
            counts = row["cert_methods"][k]
            assert set(counts) == {"lipschitz", "ibp", "crown"}
            assert max(counts.values()) / 40 <= row["cert_acc"][k] <= row["robust_acc"][k]
        assert row["cert_local_refused"] is None
        assert set(row["cert_radius"]) == set(row["attack_radius"]) == {"q1", "median", "q3"}
    # the standard AutoAttack ran on the PGD survivors (at least one row had some), in its standard order
    survived = [r for r in rows if r["pgd_acc"]["0.1"] > 0]
    assert survived, "PGD broke every point of both rows: AutoAttack was never exercised"
    for row in survived:
        assert row["aa_attacks"]["0.1"] == STANDARD_AA
    # the final table: one line per stored row, with the row's values as printed
    table = parse_results_table(res.stdout)
    assert sorted(int(t["width"]) for t in table) == [8, 32]
    for t in table:
        (row,) = [r for r in rows if r["width"] == int(t["width"])]
        assert t["model"] == "mlp" and int(t["p"]) == row["params"]
        assert float(t["p/(n·d)"]) == pytest.approx(row["ratio"], rel=5e-3)
        assert float(t["clean"]) == pytest.approx(100 * row["clean_acc"], abs=0.051)
        shown = [float(v.rstrip("†")) for v in t["robust % at each eps"].split(" / ")]
        assert shown == [pytest.approx(100 * row["robust_acc"][k], abs=0.051) for k in ("0.05", "0.1")]
        assert float(t["cert"]) == pytest.approx(100 * row["cert_acc"]["0.1"], abs=0.051)
        assert t["radius cert / atk"] == row_radii(row)
        for col, key in (("lip_upper m=1", "lip_upper"), ("lip_lower m=1", "lip_lower")):
            at_margin = row.get(f"{key}_unit_margin")  # at margin 1 where the row interpolates, else raw and marked
            value = at_margin if at_margin is not None else row[key]
            assert t[col].endswith("*") == (at_margin is None), col
            assert float(t[col].rstrip("*")) == pytest.approx(value, rel=5e-4), col
        assert float(t["law_scale"]) == pytest.approx(row["law_scale"], rel=5e-4)
    assert (out / "checkpoints").is_dir()


def test_rerun_skips_finished_cells_and_adds_new_ones(tiny_run, capsys):
    out, _ = tiny_run
    before = (out / "results.jsonl").read_bytes()
    first = read_rows(out / "results.jsonl")
    code, stdout, err = run_in_process(["run", *TINY, "autoattack=standard", "--out", str(out)], capsys)
    assert code == 0, stdout + err
    assert "2 cells: 2 already in" in stdout and "2 to run" not in stdout
    assert (out / "results.jsonl").read_bytes() == before
    # a custom AutoAttack is a changed config, so new cells ... that reuse the trained weights
    code, stdout, err = run_in_process(["run", *TINY, "autoattack=[apgd-t,apgd-ce]", "--out", str(out)], capsys)
    assert code == 0, stdout + err
    assert "2 cells: 0 already in" in stdout
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 4 and (out / "results.jsonl").read_bytes().startswith(before)
    assert {r["cell_id"] for r in rows[2:]}.isdisjoint(r["cell_id"] for r in first)
    for row in rows[2:]:
        assert row["status"] == "ok" and row["checkpoint_cached"]
        assert row["autoattack"] == ["apgd-t", "apgd-ce"] and row["cell"]["autoattack"] == ["apgd-t", "apgd-ce"]
        (old,) = [r for r in first if r["width"] == row["width"]]
        assert row["train_key"] == old["train_key"] and row["clean_acc"] == old["clean_acc"]
        if row["pgd_acc"]["0.1"] > 0:  # AutoAttack had survivors to attack: the listed attacks ran, no others
            assert row["aa_attacks"]["0.1"] == ["apgd-t", "apgd-ce"]


# ------------------------------------------------------------------------------------------- the law's premise

def test_rows_say_whether_the_model_interpolates_the_noisy_labels(tmp_path, capsys):
    """With 20% flipped labels: a width-1 net fits neither the data nor the flips, a wide one trained long fits both.
    train_acc, the fraction of flipped labels reproduced and `interpolates` are recomputed from the checkpoints."""
    import torch
    out = tmp_path / "out"
    code, _, err = run_in_process(["run", "recipe=erm", "n_train=100", "n_test=20", "label_noise=0.2", "width=[1,256]",
                                   "executor.name=local",
                                   "epochs=300", "pgd_steps=2", "eps_Linf=[0.05]", "aa_eps_Linf=[]", "autoattack=off",
                                   "lip_points=16", "--out", str(out)], capsys)
    assert code == 0, err
    rows = {r["width"]: r for r in read_rows(out / "results.jsonl")}
    for width, row in rows.items():
        model, data = load_trained(out, row)
        with torch.no_grad():
            fit = model(data.x_train).argmax(1) == data.y_train
        flipped = data.y_train != data.y_train_clean
        assert int(flipped.sum()) == 20 == row["n_noisy"]
        assert row["train_acc"] == pytest.approx(int(fit.sum()) / 100, abs=1e-12)
        assert row["noisy_fit"] == pytest.approx(int(fit[flipped].sum()) / 20, abs=1e-12)
        assert row["interpolates"] is bool(fit.all())
    assert rows[256]["interpolates"] is True and rows[256]["noisy_fit"] == 1.0
    assert rows[1]["interpolates"] is False and rows[1]["noisy_fit"] < 0.5


# ------------------------------------------------------------------------------------------- invariant violations

def test_invariant_violation_fails_the_cell_loudly_and_a_rerun_retries_it(tmp_path, capsys, monkeypatch):
    """Two cells are made to break an invariant (lip_lower > lip_upper at width 8, certified points an attack broke at
    width 16, by corrupting what certify returns); the sweep goes on, the run exits 1, and a re-run retries only
    those."""
    from lawbench import certify
    real_lower, real_cert = certify.lipschitz_lower, certify.certify_points

    def width(model):
        return next(m for m in model if hasattr(m, "out_features")).out_features

    def bad_lower(model, *a, **k):
        lb = real_lower(model, *a, **k)
        if width(model) == 8:
            lb.value = 1e6
        return lb

    def bad_cert(model, x, y, eps, norm, **k):  # every point "certified", broken ones included
        got = real_cert(model, x, y, eps, norm, **k)
        if width(model) == 16:
            got.certified = {e: ok | True for e, ok in got.certified.items()}
        return got

    monkeypatch.setattr(certify, "lipschitz_lower", bad_lower)
    monkeypatch.setattr(certify, "certify_points", bad_cert)
    args = ["run", *[a for a in TINY if not a.startswith("width=")], "width=[8,16,32]", "--out", str(tmp_path)]
    code, stdout, err = run_in_process(args, capsys)
    assert code == 1, stdout + err
    rows = {r["width"]: r for r in read_rows(tmp_path / "results.jsonl")}
    assert sorted(rows) == [8, 16, 32]
    assert rows[8]["status"] == "failed" and rows[16]["status"] == "failed"
    assert rows[8]["error"] == f"InvariantError: lip_lower 1000000.0 > lip_upper {rows[8]['lip_upper']}"
    assert rows[16]["error"].startswith("InvariantError: eps 0.05: ") and rows[16]["error"].endswith(
        "certified point(s) broken by an attack (a certificate is unsound)")
    assert rows[32]["status"] == "ok" and rows[32]["error"] is None
    for w in (8, 16):
        assert f"({rows[w]['model']} w={w} erm seed=0 Linf) failed: InvariantError" in stdout
    assert "3 cells run" in stdout and "2 failed" in stdout
    # the failed rows show in the table with their error
    table = {int(t["width"]): t for t in parse_results_table(stdout)}
    assert table[8]["flags"].startswith("failed: InvariantError") and table[32]["clean"] != "–"

    monkeypatch.undo()  # certify tells the truth again: the failed cells are retried, the ok one is not
    code, stdout, err = run_in_process(args, capsys)
    assert code == 0, stdout + err
    assert "3 cells: 1 already in" in stdout and "2 to run" in stdout
    rows = read_rows(tmp_path / "results.jsonl")
    assert [r["status"] for r in rows] == ["failed", "failed", "ok", "ok", "ok"]
    assert sorted(r["cell_id"] for r in rows[3:]) == sorted(r["cell_id"] for r in rows[:3] if r["status"] == "failed")
    assert all(r["checkpoint_cached"] for r in rows[3:])
    assert all(r["lip_lower"] <= r["lip_upper"] for r in rows[3:])


# ------------------------------------------------------------------------------------------- resume after kills

# The CLI with bench.store's appends slowed down: each row written to results.jsonl goes to disk in two parts, with a
# marker line (in $MIDWRITE_MARKER) and a pause between them, before the store's fsync. With
# $MIDWRITE_HOLD=k the k-th write of the process stops after its first half until the process is killed.
WRAPPER = textwrap.dedent('''
    import os, sys, time
    import bench.store

    marker, pause = os.environ["MIDWRITE_MARKER"], float(os.environ["MIDWRITE_PAUSE"])
    hold = int(os.environ.get("MIDWRITE_HOLD", "0"))
    real_write_all, writes = bench.store.write_all, [0]

    def split_write_all(fd, data):
        writes[0] += 1
        half = len(data) // 2
        real_write_all(fd, data[:half])
        with open(marker, "a") as m:
            m.write(f"{writes[0]} {len(data)}\\n")
        if writes[0] == hold:
            time.sleep(120)
            os._exit(3)  # never reached when the test kills the process
        time.sleep(pause)
        real_write_all(fd, data[half:])

    bench.store.write_all = split_write_all  # the store's row writes only
    from bench.cli import main
    sys.exit(main(sys.argv[1:]))
''')

CHEAP = ["n_train=100", "n_test=20", "epochs=2", "pgd_steps=2", "eps_Linf=[0.1]", "aa_eps_Linf=[0.1]",
         "lip_points=8", "autoattack=off", "width=[4,5,6,7,8,9,10,11,12,13]", "recipe=erm", "label_noise=0",
         "executor.name=local"]


def _wait_for(pred, timeout: float, proc, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_after_kills_at_random_instants_mid_write_included(tmp_path):
    from bench.spec import build_spec, cell_id, expand
    planned = {cell_id(c) for c in expand(build_spec("default", CHEAP))}
    assert len(planned) == 10
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    env = {**os.environ, **SUBPROCESS_ENV, "MIDWRITE_PAUSE": "0.3"}
    rng = random.Random(20250101)
    kept = b""          # the complete lines on disk after the previous kill: never changed by later runs
    held_tail = None
    torn_kills = 0
    for k in range(3):
        marker = tmp_path / f"marker{k}"
        run_env = {**env, "MIDWRITE_MARKER": str(marker)}
        if k == 0:
            run_env["MIDWRITE_HOLD"] = "3"  # the third row is stopped half written: a kill provably mid-write
        proc = subprocess.Popen([sys.executable, str(tmp_path / "wrapper.py"), "run", *CHEAP, "--out", str(out)],
                                cwd=ROOT, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if k == 0:
                _wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) >= 3, 150, proc,
                          "the third write")
            else:  # a seeded random instant after the run's first write started: mid-cell, between or mid-write
                _wait_for(marker.exists, 150, proc, "the first write")
                time.sleep(rng.uniform(0.0, 1.2))
            assert proc.poll() is None, f"run {k} finished before it was killed: {proc.stderr.read()}"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        data = results.read_bytes()
        assert data.startswith(kept), f"run {k} changed rows written before the previous kill"
        complete = data[:data.rfind(b"\n") + 1]
        tail = data[len(complete):]
        rows = [json.loads(line) for line in complete.splitlines()]  # every complete line parses
        assert all(r["status"] == "ok" for r in rows)
        ids = [r["cell_id"] for r in rows]
        assert len(ids) == len(set(ids)) and set(ids) <= planned, f"run {k}: a duplicated or unplanned row"
        if k == 0:
            assert len(rows) == 2 and tail and tail.startswith(b'{"cell_id": '), data[-200:]
            held_tail = tail
        torn_kills += bool(tail)
        kept = complete
    assert held_tail is not None
    res = bench_cli("run", *CHEAP, "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    data = results.read_bytes()
    assert data.startswith(kept) and data.endswith(b"\n")
    lines = data.splitlines()
    rows = [json.loads(line) for line in lines]  # the torn tails are gone: every line is a whole row
    ids = [r["cell_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 10 and set(ids) == planned
    assert all(r["status"] == "ok" for r in rows)
    assert torn_kills >= 1


# ------------------------------------------------------------------------------------------------------ listing

def test_list_shows_models_datasets_presets_attacks():
    res = bench_cli("list")
    assert res.returncode == 0, res.stderr
    for word in ("mlp", "cnn", "wrn16", "mnist5k", "gauss", "cifar10", "default", "law", "pgd"):
        assert word in res.stdout
