"""The three ways to add a model entry, through the CLI: a --plugin module, an installed package's entry point
(group bench.models), and an external checkpoint TOML evaluated without training."""
import hashlib
import textwrap

import pytest
import torch

from lawbench import datasets
from lawbench import models
from bench.train import TrainConfig, accuracy, train
from conftest import TINY, bench_cli
from lawbench.reports.rows import read_rows

FAST = [*TINY, "autoattack=off", "width=[6]"]

PLUGIN = textwrap.dedent('''
    from torch import nn
    from lawbench.models import register_model

    @register_model("{name}", family="plugin-mlp", default_widths=(6, 12))
    def build(in_shape, num_classes, width, **kw):
        d = 1
        for s in in_shape:
            d *= s
        return nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, num_classes))
''')


def _params(d, w, c=10):
    return d * w + w + w * w + w + w * c + c


def test_plugin_module_entry(tmp_path):
    (tmp_path / "my_entries.py").write_text(PLUGIN.format(name="plugin-mlp2"))
    env = {"PYTHONPATH": str(tmp_path)}
    res = bench_cli("list", "--plugin", "my_entries", env=env)
    assert res.returncode == 0 and "plugin-mlp2" in res.stdout, res.stderr
    res = bench_cli("run", *FAST, "model=plugin-mlp2", "--plugin", "my_entries", "--out", str(tmp_path / "out"),
                    env=env)
    assert res.returncode == 0, res.stderr
    (row,) = read_rows(tmp_path / "out" / "results.jsonl")
    assert row["model"] == "plugin-mlp2" and row["family"] == "plugin-mlp" and row["status"] == "ok"
    assert row["params"] == _params(784, 6)
    res = bench_cli("run", *FAST, "model=plugin-mlp2", "--plugin", "no_such_module", "--out", str(tmp_path / "o2"),
                    env=env)
    assert res.returncode == 2 and "no_such_module" in res.stderr and "Traceback" not in res.stderr


def test_installed_package_entry_point(tmp_path):
    (tmp_path / "extra_entries.py").write_text(PLUGIN.format(name="ep-mlp2"))
    dist = tmp_path / "lawbench_extra-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lawbench-extra\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lawbench.models]\nextra = extra_entries\n")
    # a package still on the old group name is read too, with one deprecation line
    (tmp_path / "old_entries.py").write_text(PLUGIN.format(name="ep-old-mlp2"))
    old = tmp_path / "lawbench_old-0.1.dist-info"
    old.mkdir()
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: lawbench-old\nVersion: 0.1\n")
    (old / "entry_points.txt").write_text("[bench.models]\nold = old_entries\n")
    env = {"PYTHONPATH": str(tmp_path)}
    res = bench_cli("list", env=env)
    assert res.returncode == 0 and "ep-mlp2" in res.stdout and "ep-old-mlp2" in res.stdout, res.stderr
    warn = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and "'old = old_entries'" in warn[0], res.stderr
    assert "'bench.models'" in warn[0] and "'lawbench.models'" in warn[0]
    res = bench_cli("run", *FAST, "model=ep-mlp2", "--out", str(tmp_path / "out"), env=env)
    assert res.returncode == 0, res.stderr
    (row,) = read_rows(tmp_path / "out" / "results.jsonl")
    assert row["model"] == "ep-mlp2" and row["params"] == _params(784, 6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A model trained elsewhere: saved with its own code, evaluated by the CLI from a TOML entry."""
    folder = tmp_path_factory.mktemp("ckpt")
    data = datasets.load_dataset("mnist5k", n_train=200, n_test=40, seed=0)
    torch.manual_seed(5)
    model = models.get_model("mlp", in_shape=data.meta.in_shape, num_classes=10, width=24)
    train(model, data.x_train, data.y_train, TrainConfig(epochs=15, seed=5))
    path = models.save_checkpoint(model, folder / "mlp24.pt")
    return folder, path, accuracy(model, data.x_test, data.y_test)


def _sha256(path) -> str:
    """Computed here, independently of models.sha256_file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(folder, name="ext-mlp24", width=24, sha=None, path="mlp24.pt"):
    sha = sha or _sha256(folder / path).upper()  # the entry may spell it in capitals; rows carry lowercase hex
    toml = folder / f"{name}.toml"
    toml.write_text(f'name = "{name}"\nmodel = "mlp"\nwidth = {width}\ndataset = "mnist5k"\n'
                    f'checkpoint = "{path}"\nsha256 = "{sha}"\n')
    return toml


def test_checkpoint_entry_is_evaluated_without_training(checkpoint, tmp_path):
    folder, path, clean = checkpoint
    res = bench_cli("run", *FAST, "--entry", str(_entry(folder)), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    (row,) = read_rows(tmp_path / "results.jsonl")
    assert row["status"] == "ok" and row["model"] == "ext-mlp24" and row["architecture"] == "mlp"
    assert row["recipe"] == "external" and row["width"] == 24 and row["params"] == 784 * 24 + 24 + 24 * 10 + 10
    assert row["clean_acc"] == pytest.approx(clean)  # the very weights that were saved
    assert row["checkpoint_sha256"] == _sha256(path) == _sha256(folder / "mlp24.pt")  # the file the entry named
    assert "train" not in row["timings"] and not (tmp_path / "checkpoints").exists()
    again = bench_cli("run", *FAST, "--entry", str(_entry(folder)), "--out", str(tmp_path))
    assert again.returncode == 0 and "1 already in" in again.stdout


def test_checkpoint_entry_bad_sha_and_architecture_mismatch(checkpoint, tmp_path, capsys):
    """In process (bench.cli.main, as `python -m bench` calls it): the subprocess path is the test above."""
    from bench.cli import main
    folder, _, _ = checkpoint
    for toml, culprit in ((_entry(folder, name="bad-sha", sha="0" * 64), "sha256"),
                          (_entry(folder, name="bad-arch", width=32), "mlp24.pt"),
                          (_entry(folder, name="missing", sha="1" * 64, path="nope.pt"), "nope.pt")):
        try:
            code = main(["run", *FAST, "--entry", str(toml), "--out", str(tmp_path)])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and culprit in lines[0], err
        assert not (tmp_path / "results.jsonl").exists()
