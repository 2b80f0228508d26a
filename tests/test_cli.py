"""The CLI end to end on the embedded MNIST-5k: a tiny sweep, resume after a kill, and bad-input errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, bench_cli
from reports.rows import REQUIRED_KEYS, read_rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    res = bench_cli("run", *TINY, "--out", str(out))
    return out, res


def test_tiny_sweep_writes_contract_rows_and_prints_table(tiny_run):
    out, res = tiny_run
    assert res.returncode == 0, res.stdout + res.stderr
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["dataset"] == "mnist5k" and row["n_train"] == 200 and row["n_test"] == 40 and row["d"] == 784
        assert row["data_source"] == "embedded"
        assert row["params"] == 784 * row["width"] + row["width"] + row["width"] * 10 + 10
        assert row["ratio"] == pytest.approx(row["params"] / (200 * 784))
        assert row["law_scale"] == pytest.approx((200 * 784 / row["params"]) ** 0.5)
        assert set(row["pgd_acc"]) == {"0.05", "0.1"}
        assert row["autoattack_acc"]["0.1"] is not None and row["autoattack_acc"]["0.05"] is None
        for e in ("0.05", "0.1"):
            assert row["cert_acc"][e] <= row["robust_acc"][e] <= row["pgd_acc"][e] <= row["clean_acc"]
        assert 0 < row["lip_lower"] <= row["lip_upper"]
        assert row["clean_acc"] > 0.5  # real digits, even a tiny net learns them
    # the table names every width and the measured columns
    assert "Lip" in res.stdout or "lip" in res.stdout
    assert (out / "checkpoints").is_dir()


def test_rerun_skips_finished_cells_and_adds_new_ones(tiny_run):
    out, _ = tiny_run
    before = (out / "results.jsonl").read_bytes()
    res = bench_cli("run", *TINY, "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "2 already in" in res.stdout
    assert (out / "results.jsonl").read_bytes() == before
    res = bench_cli("run", *TINY, "pgd_steps=5", "--out", str(out))  # a changed config is a new cell ...
    assert res.returncode == 0, res.stderr
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 4
    assert all(r["checkpoint_cached"] for r in rows[2:])  # ... that reuses the trained weights


def test_resume_after_kill_loses_nothing_and_duplicates_nothing(tmp_path):
    widths = "width=[4,6,8,10,12,14]"
    cmd = [sys.executable, "-m", "bench", "run", *TINY, widths, "autoattack=off", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(read_rows(results)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_rows = read_rows(results)
    assert 2 <= len(killed_rows) < 6
    res = bench_cli("run", *TINY, widths, "autoattack=off", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    rows = read_rows(results)
    ids = [r["cell_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6
    assert rows[:len(killed_rows)] == killed_rows
    assert sorted(r["width"] for r in rows) == [4, 6, 8, 10, 12, 14]


@pytest.mark.parametrize("args, culprit", [
    (["model=resnet9000"], "resnet9000"),
    (["dataset=imagenet"], "imagenet"),
    (["widht=3"], "widht"),
    (["width=0"], "width"),
    (["eps_Linf=[-0.1]"], "eps_Linf"),
    (["eps_Linf=[1.5]"], "eps_Linf"),
    (["no-such-preset"], "no-such-preset"),
    (["dataset=mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["dataset=gauss", "model=cnn"], "cnn"),
    (["model_options.depth=3"], "depth"),
])
def test_bad_input_one_line_exit_2_store_untouched(tmp_path, args, culprit):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"cell_id": "keep", "status": "ok"}) + "\n")
    before = results.read_bytes()
    res = bench_cli("run", *args, "--out", str(tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and culprit in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert results.read_bytes() == before


def test_list_shows_models_datasets_presets_attacks():
    res = bench_cli("list")
    assert res.returncode == 0, res.stderr
    for word in ("mlp", "cnn", "wrn16", "mnist5k", "gauss", "cifar10", "default", "law", "pgd"):
        assert word in res.stdout
