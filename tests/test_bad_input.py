"""Bad input through the CLI: exit 2, exactly one line on stderr naming the culprit, no traceback, the store untouched.

Each case runs against a results directory holding a valid results.jsonl (a hand-written row with every contract key)
and compares every file and link under the test's folder, byte for byte, before and after. Most cases call
`bench.cli.main(argv)` in process; a representative handful (and the plugins, which would stay imported) run as
`python -m bench` subprocesses, as a user would.
"""
from __future__ import annotations

import gzip
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import bench_cli, run_in_process
from lawbench.reports.schema import REQUIRED_KEYS


def valid_row() -> dict:
    row = {k: None for k in REQUIRED_KEYS}
    row.update(cell_id="0123456789abcdef", bench_version="0.1.0", status="ok", dataset="mnist5k", n_train=200,
               n_test=40, d=784, d_eff=11.0, label_noise=0.0, num_classes=10, model="mlp", family="mlp", width=8,
               params=6370, recipe="erm", train_eps=0.0, seed=0, device="cpu", train_acc=1.0, clean_acc=0.8,
               threat="Linf", eps=[0.1], pgd_acc={"0.1": 0.1}, autoattack_acc={"0.1": 0.05},
               robust_acc={"0.1": 0.05}, cert_acc={"0.1": 0.0}, lip_upper=20.0, lip_lower=10.0, ratio=0.04,
               ratio_eff=2.9, law_scale=4.9, aa_flags=[], timings={"total": 1.0}, interpolates=True,
               data_source="embedded")
    return row


# ------------------------------------------------------------------------------------------------ case helpers

@dataclass
class Ctx:
    tmp: Path                        # everything under it is compared before and after
    out: Path                        # a results directory with one valid row
    notes: dict = field(default_factory=dict)

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


def idx(arr: np.ndarray, dims=None) -> bytes:
    dims = arr.shape if dims is None else dims
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + arr.astype(">u1").tobytes()


def mnist_dir(ctx: Ctx, n_train=20, n_test=10, images=None) -> Path:
    rng = np.random.default_rng(0)
    folder = ctx.tmp / "data" / "mnist"
    files = {
        "train-images-idx3-ubyte": idx(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": idx(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": idx(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": idx(np.arange(n_test) % 10),
    }
    if images is not None:
        files["train-images-idx3-ubyte"] = images
    for name, data in files.items():
        ctx.write(f"data/mnist/{name}", data)
    return folder.parent


def entry_toml(ctx: Ctx, name: str, checkpoint: str, entry_name: str = "ext") -> Path:
    return ctx.write(name, f'name = "{entry_name}"\nmodel = "mlp"\nwidth = 8\ndataset = "mnist5k"\n'
                           f'checkpoint = "{checkpoint}"\n')


def unsafe_checkpoint(ctx: Ctx) -> Path:
    import argparse
    import torch
    from lawbench import models
    model = models.get_model("mlp", in_shape=(1, 28, 28), num_classes=10, width=8)
    path = ctx.tmp / "unsafe.pt"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    return entry_toml(ctx, "unsafe.toml", "unsafe.pt")


def unwritable_out(ctx: Ctx) -> Path:
    if os.geteuid() != 0:
        locked = ctx.tmp / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return locked / "unwritable-out"
    if not Path("/sys").is_dir():
        pytest.skip("running as root without a read-only /sys: no unwritable place to try")
    return Path("/sys/unwritable-out")  # sysfs refuses new directories even to root


def dangling_results(ctx: Ctx) -> list[str]:
    (ctx.out / "results.jsonl").unlink()
    os.symlink(ctx.tmp / "gone" / "results.jsonl", ctx.out / "results.jsonl")
    return [RUN]


def store_at(ctx: Ctx, name: str, make) -> list[str]:
    """A results directory `name` prepared by make(dir)."""
    folder = ctx.tmp / name
    folder.mkdir()
    make(folder)
    return [RUN, "--out", str(folder)]


def malformed(folder: Path) -> None:
    good = json.dumps(valid_row())
    (folder / "results.jsonl").write_text(f"{good}\nnot json\n{good}\n")


def fifo_results(ctx: Ctx, command: str) -> list[str]:
    """results.jsonl is a named pipe: reading it would block forever (nobody writes to it)."""
    (ctx.out / "results.jsonl").unlink()
    os.mkfifo(ctx.out / "results.jsonl")
    return [command]


def garbage_entry(ctx: Ctx) -> list[str]:
    ctx.write("junk.pt", b"\x80\x02junk")
    return [RUN, "--entry", str(entry_toml(ctx, "junk.toml", "junk.pt"))]


def report_dir_is_a_file(ctx: Ctx) -> list[str]:
    ctx.write("out/report", "x")
    return [REPORT]


def plugin(ctx: Ctx, name: str, body: str) -> str:
    return str(ctx.write(f"plugins/{name}.py", body))


def has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# A case: id, a function building argv (after "run"/"report"; it may create files), the text the one error line must
# contain, and whether it runs as a subprocess. `--out <store>` is appended unless argv names --out.
RUN, REPORT = "run", "report"
CASES = [
    # values that used to reach the store as a failed row
    ("recipe-typo", lambda c: [RUN, "recipe=pgdat"], "recipe", True),
    ("optimizer-unknown", lambda c: [RUN, "optimizer=adamw"], "optimizer", False),
    ("train-norm-unknown", lambda c: [RUN, "recipe=pgd-at", "train_eps=0.1", "train_norm=L3"], "train_norm", False),
    ("lr-nan", lambda c: [RUN, "lr=nan"], "lr", False),
    ("weight-decay-negative", lambda c: [RUN, "weight_decay=-1"], "weight_decay", False),
    ("eps-linf-nan-in-list", lambda c: [RUN, "eps_Linf=[0.1,nan]"], "eps_Linf", False),
    ("eps-l2-inf", lambda c: [RUN, "threat=L2", "eps_L2=[1.0,inf]"], "eps_L2", False),
    ("seed-beyond-int64", lambda c: [RUN, "seed=1180591620717411303424"], "seed", False),
    ("seed-2-pow-63", lambda c: [RUN, "seed=9223372036854775808"], "seed", False),
    ("device-bogus", lambda c: [RUN, "--device", "bogus"], "bogus", False),
    ("device-cuda-absent", lambda c: [RUN, "--device", "cuda"] if not has_cuda() else pytest.skip("CUDA present"),
     "cuda", False),
    ("device-meta", lambda c: [RUN, "--device", "meta"], "meta", False),
    # values that used to give an ok row
    ("pgd-step-size-negative", lambda c: [RUN, "pgd_step_size=-1"], "pgd_step_size", False),
    ("train-step-size-negative", lambda c: [RUN, "train_step_size=-0.5"], "train_step_size", False),
    ("momentum-above-1", lambda c: [RUN, "optimizer=sgd", "momentum=1.5"], "momentum", False),
    ("momentum-1", lambda c: [RUN, "momentum=1"], "momentum", False),
    # ranges, types, choices, lists
    ("width-0", lambda c: [RUN, "width=0"], "width", False),
    ("width-empty-list", lambda c: [RUN, "width=[]"], "width", False),
    ("epochs-list", lambda c: [RUN, "epochs=[1,2]"], "epochs", False),
    ("epochs-0", lambda c: [RUN, "epochs=0"], "epochs", False),
    ("batch-size-0", lambda c: [RUN, "batch_size=0"], "batch_size", False),
    ("pgd-steps-0", lambda c: [RUN, "pgd_steps=0"], "pgd_steps", False),
    ("pgd-restarts-0", lambda c: [RUN, "pgd_restarts=0"], "pgd_restarts", False),
    ("train-steps-0", lambda c: [RUN, "train_steps=0"], "train_steps", False),
    ("lr-0", lambda c: [RUN, "lr=0"], "lr", False),
    ("lr-inf", lambda c: [RUN, "lr=inf"], "lr", False),
    ("lr-string", lambda c: [RUN, "lr=fast"], "lr", False),
    ("target-train-acc-0", lambda c: [RUN, "target_train_acc=0"], "target_train_acc", False),
    ("label-noise-1", lambda c: [RUN, "label_noise=1"], "label_noise", False),
    ("label-noise-nan", lambda c: [RUN, "label_noise=nan"], "label_noise", False),
    ("n-train-negative", lambda c: [RUN, "n_train=-1"], "n_train", False),
    ("seed-negative", lambda c: [RUN, "seed=-1"], "seed", False),
    ("train-eps-above-1", lambda c: [RUN, "recipe=pgd-at", "train_eps=1.5"], "train_eps", False),
    ("eps-linf-above-1", lambda c: [RUN, "eps_Linf=[1.5]"], "eps_Linf", False),
    ("eps-linf-duplicate", lambda c: [RUN, "eps_Linf=[0.1,0.1]"], "eps_Linf", False),
    ("eps-l2-empty", lambda c: [RUN, "threat=L2", "eps_L2=[]"], "eps_L2", False),
    ("aa-eps-not-in-sweep", lambda c: [RUN, "aa_eps_Linf=[0.7]"], "aa_eps_Linf", False),
    ("threat-unknown", lambda c: [RUN, "threat=L3"], "threat", False),
    ("autoattack-unknown", lambda c: [RUN, "autoattack=maybe"], "autoattack", False),
    ("autoattack-unknown-attack", lambda c: [RUN, "autoattack=[apgd-ce,apgd-xx]"], "'apgd-xx'", False),
    ("autoattack-empty-list", lambda c: [RUN, "autoattack=[]"], "autoattack", False),
    ("autoattack-attack-twice", lambda c: [RUN, "autoattack=[square,square]"], "autoattack", False),
    ("autoattack-list-with-version", lambda c: [RUN, "autoattack=[standard]"], "'standard'", False),
    ("data-option-nan", lambda c: [RUN, "dataset=gauss", "data_options.d=nan"], "data_options.d", False),
    ("unknown-key", lambda c: [RUN, "widht=3"], "widht", False),
    ("unknown-model", lambda c: [RUN, "model=resnet9000"], "resnet9000", False),
    ("unknown-dataset", lambda c: [RUN, "dataset=imagenet"], "imagenet", False),
    ("unknown-preset-name", lambda c: [RUN, "no-such-preset"], "no-such-preset", False),
    ("eps-linf-negative", lambda c: [RUN, "eps_Linf=[-0.1]"], "eps_Linf", False),
    ("model-unfit-for-data", lambda c: [RUN, "dataset=gauss", "model=cnn"], "cnn", False),
    ("model-option-unknown", lambda c: [RUN, "model_options.depth=3"], "depth", False),
    # the executor table and its command-line flags
    ("executor-unknown", lambda c: [RUN, "--executor", "dask"], "executor.name", False),
    ("executor-threads-negative", lambda c: [RUN, "--threads", "-1"], "executor.threads", False),
    ("executor-threads-word", lambda c: [RUN, "--threads", "many"], "executor.threads", False),
    ("executor-workers-float", lambda c: [RUN, "--executor", "pool", "--workers", "1.5"], "executor.workers", False),
    ("executor-option-typo", lambda c: [RUN, "executor.adress=x"], "adress", False),
    ("executor-option-of-another", lambda c: [RUN, "--executor", "pool", "--address", "auto"], "executor.address",
     False),
    ("executor-not-a-table", lambda c: [RUN, "executor=[1,2]"], "executor", False),
    ("executor-slurm-half-gpu", lambda c: [RUN, "--executor", "slurm", "executor.num_gpus_per_cell=0.5"],
     "num_gpus_per_cell", False),
    ("executor-poll-zero", lambda c: [RUN, "--executor", "slurm", "executor.poll_seconds=0"], "poll_seconds", False),
    ("preset-executor-bad", lambda c: [RUN, str(c.write("ex.toml", '[executor]\nname = "pool"\nworkers = -2\n'))],
     "executor.workers", False),
    # the culprit named is the key at fault, not a key that refers to it
    ("eps-linf-nan-alone", lambda c: [RUN, "eps_Linf=[nan]"], "key 'eps_Linf'", False),
    # files given as input
    ("preset-missing", lambda c: [RUN, str(c.tmp / "nope.toml")], "nope.toml", False),
    ("preset-invalid-toml", lambda c: [RUN, str(c.write("bad.toml", "width = [1,\n"))], "bad.toml", False),
    ("preset-not-utf8", lambda c: [RUN, str(c.write("latin1.toml", b'description = "caf\xe9"\n'))],
     "latin1.toml", False),
    ("preset-bad-value", lambda c: [RUN, str(c.write("neg.toml", "momentum = -0.1\n"))], "momentum", False),
    ("preset-autoattack-not-a-name", lambda c: [RUN, str(c.write("aa.toml", 'autoattack = ["apgd-ce", 3]\n'))],
     "autoattack", False),
    ("entry-not-utf8", lambda c: [RUN, "--entry", str(c.write("latin1-entry.toml", b'name = "\xff"\n'))],
     "latin1-entry.toml", False),
    ("entry-missing", lambda c: [RUN, "--entry", str(c.tmp / "missing-entry.toml")], "missing-entry.toml", False),
    ("entry-repeated", lambda c: [RUN, "--entry", str(entry_toml(c, "twice.toml", "w.pt")),
                                  "--entry", str(c.tmp / "twice.toml")], "twice.toml", False),
    ("entry-unsafe-checkpoint", lambda c: [RUN, "--entry", str(unsafe_checkpoint(c))], "unsafe.pt", False),
    ("entry-garbage-checkpoint", garbage_entry, "junk.pt", False),
    ("idx-dims-overflow", lambda c: [RUN, "dataset=mnist", "--data-dir", str(mnist_dir(
        c, images=idx(np.zeros(0), dims=(2 ** 31, 2 ** 31, 4))))], "train-images-idx3-ubyte", False),
    ("dataset-0-points", lambda c: [RUN, "dataset=mnist", "--data-dir", str(mnist_dir(c, n_train=0))],
     "train-images-idx3-ubyte", False),
    ("data-dir-missing", lambda c: [RUN, "dataset=mnist", "--data-dir", str(c.tmp / "no-data")], "no-data", False),
    ("plugin-sys-exit", lambda c: [RUN, "--plugin", plugin(c, "exit3", "import sys\nsys.exit(3)\n")], "exit3", True),
    ("plugin-raises", lambda c: [RUN, "--plugin", plugin(c, "boom", "raise RuntimeError('boom at import')\n")],
     "boom", True),
    # the results directory
    ("out-empty", lambda c: [RUN, "--out", ""], "--out", False),
    ("out-is-a-file", lambda c: [RUN, "--out", str(c.write("afile", "x"))], "afile", False),
    ("out-below-a-file", lambda c: [RUN, "--out", str(c.write("plain", "x") / "sub")], "plain", False),
    ("out-unwritable", lambda c: [RUN, "--out", str(unwritable_out(c))], "unwritable-out", False),
    ("results-dangling-symlink", dangling_results, "results.jsonl", True),
    ("results-is-a-directory", lambda c: store_at(c, "dirstore", lambda d: (d / "results.jsonl").mkdir()),
     "results.jsonl", False),
    ("results-malformed-middle-line", lambda c: store_at(c, "bad", malformed), "results.jsonl:2", False),
    ("results-is-a-fifo", lambda c: fifo_results(c, RUN), "not a regular file (a FIFO)", True),
    ("logs-is-a-file", lambda c: store_at(c, "logsfile", lambda d: (d / "logs").write_text("x")), "logs", False),
    ("checkpoints-is-a-file", lambda c: store_at(c, "ckptfile", lambda d: (d / "checkpoints").write_text("x")),
     "checkpoints", False),
    ("lock-is-a-directory", lambda c: store_at(c, "lockdir", lambda d: (d / ".lock").mkdir()), ".lock", False),
    # bench report
    ("report-dir-is-a-file", report_dir_is_a_file, "report", True),
    ("report-out-empty", lambda c: [REPORT, "--out", ""], "--out", False),
    ("report-no-results", lambda c: [REPORT, "--out", str(c.tmp / "empty")], "results.jsonl", False),
    ("report-results-is-a-fifo", lambda c: fifo_results(c, REPORT), "not a regular file (a FIFO)", True),
]


def snapshot(root: Path) -> dict:
    """Every entry under root: kind, mode and content (bytes of files, target of links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[str(p.relative_to(root))] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISFIFO(st.st_mode):  # never read: it would block
                out[str(p.relative_to(root))] = ("fifo", stat.S_IMODE(st.st_mode))
            else:
                out[str(p.relative_to(root))] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


@pytest.fixture
def ctx(tmp_path) -> Ctx:
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "results.jsonl").write_text(json.dumps(valid_row()) + "\n")
    return Ctx(tmp=tmp_path, out=out)


def test_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, build, culprit, subprocess", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_store_untouched(ctx, capsys, name, build, culprit, subprocess):
    argv = build(ctx)
    if "--out" not in argv:
        argv = [*argv, "--out", str(ctx.out)]
    before = snapshot(ctx.tmp)
    try:
        if subprocess:
            res = bench_cli(*argv, cwd=ctx.tmp, timeout=120)
            code, out, err = res.returncode, res.stdout, res.stderr
        else:
            code, out, err = run_in_process(argv, capsys)
        after = snapshot(ctx.tmp)
    finally:
        for p in ctx.tmp.rglob("*"):  # let pytest clean up a folder made read-only
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, out + err
    assert len(lines) == 1, err
    assert culprit in lines[0], lines[0]
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out + err
    assert after == before
    if name == "eps-linf-nan-alone":
        assert "aa_eps" not in lines[0]
    if name == "entry-unsafe-checkpoint":
        assert "beyond tensors" in lines[0] and "argparse.Namespace" in lines[0]
        assert "weights_only" not in lines[0]
    if name == "entry-repeated":
        assert "given twice" in lines[0]


# ------------------------------------------------------------------------------------------------ not errors

def test_report_says_which_lines_it_skipped(tmp_path, capsys):
    from bench.cli import main
    good = [json.dumps({**valid_row(), "cell_id": f"{i:016x}", "seed": i}) for i in range(3)]
    (tmp_path / "results.jsonl").write_text(f"{good[0]}\n[1, 2]\n{good[1]}\nnot json\n{good[2]}\n" + good[0][:40])
    code = main(["report", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0
    assert err.strip() == (f"warning: {tmp_path / 'results.jsonl'}: skipped 1 torn last line and 2 malformed rows "
                           f"(lines 2, 4; line 2: not a JSON object)")
    assert (tmp_path / "report" / "leaderboard.md").is_file()


@pytest.mark.parametrize("key, value, why", [
    ("clean_acc", {}, "clean_acc is {}, expected a finite number in [0, 1]"),
    ("lip_lower", float("inf"), "lip_lower is inf, expected a finite number >= 0"),
    ("params", "6370", "params is '6370', expected an integer >= 1"),
    ("robust_acc", {"0.1": 1.5}, "robust_acc is {'0.1': 1.5}, expected a map eps"),
    ("eps", "0.1", "eps is '0.1', expected a list of finite numbers"),
    ("status", "done", "status is 'done', expected one of ok, failed"),
    ("interpolates", "yes", "interpolates is 'yes', expected a boolean"),
])
def test_report_skips_rows_that_break_the_schema(tmp_path, capsys, key, value, why):
    """A row of the wrong type, {} for a number, 1e999 (inf once parsed), an accuracy outside [0, 1] is named and
    left out of every table, not rendered as if it were a result."""
    from bench.cli import main
    good, bad = valid_row(), valid_row()
    bad[key] = value
    bad["model"] = "bad-model"
    text = json.dumps(bad).replace("Infinity", "1e999")
    (tmp_path / "results.jsonl").write_text(f"{json.dumps(good)}\n{text}\n")
    code = main(["report", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0
    assert err.startswith(f"warning: {tmp_path / 'results.jsonl'}: skipped 1 row that breaks the row schema "
                          f"(line 2; line 2: "), err
    assert why in err, err
    for name in ("leaderboard.md", "results.csv"):
        body = (tmp_path / "report" / name).read_text()
        assert "bad-model" not in body and "mlp" in body


def test_written_files_get_the_umask_mode(tmp_path):
    import torch
    from lawbench import models
    from lawbench.base.files import atomic_write_bytes as data_write
    from lawbench.base.files import atomic_write_bytes as report_write
    old = os.umask(0o022)
    try:
        data_write(tmp_path / "cache.json", b"{}")
        report_write(tmp_path / "leaderboard.md", b"# x")
        models.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "w.pt")
        os.umask(0o027)
        report_write(tmp_path / "private.md", b"# y")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"cache.json": 0o644, "leaderboard.md": 0o644, "w.pt": 0o644, "private.md": 0o640}


def test_data_source_says_what_was_verified(tmp_path, monkeypatch):
    import hashlib
    from lawbench.datasets import load_dataset
    from lawbench.datasets import mnist as mnist_mod
    assert load_dataset("digits", n_train=50, n_test=20).meta.data_source == "embedded"
    assert load_dataset("gauss", n_train=30, n_test=30).meta.data_source == "synthetic"
    ctx = Ctx(tmp=tmp_path, out=tmp_path)
    data = mnist_dir(ctx)
    s = load_dataset("mnist", data_dir=data)  # random idx files are not MNIST, whatever their names
    assert s.meta.data_source == "unverified local files" and "does not match" in s.meta.source
    folder = data / "mnist"
    raw = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(mnist_mod, "MNIST_RAW_MD5", raw)  # as if these were the official files
    assert load_dataset("mnist", data_dir=data).meta.data_source == "official"
    for p in list(folder.iterdir()):  # the same content re-compressed still verifies through its idx bytes
        (folder / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
        p.unlink()
    assert load_dataset("mnist", data_dir=data).meta.data_source == "official"
    monkeypatch.setattr(mnist_mod, "MNIST_RAW_MD5", {**raw, "t10k-labels-idx1-ubyte": "0" * 32})
    s = load_dataset("mnist", data_dir=data)
    assert s.meta.data_source == "unverified local files" and "t10k-labels-idx1-ubyte.gz" in s.meta.source


def test_schema_is_the_one_declaration():
    from bench import spec, train
    from lawbench import attacks
    from lawbench.attacks import autoattack as _aa, pgd as _pgd  # noqa: F401 - loaded as attributes of attacks
    assert set(spec.DEFAULTS) == set(spec.SCHEMA)
    assert spec.SWEEP_AXES == tuple(k for k, v in spec.SCHEMA.items() if v.sweep)
    assert spec.SCHEMA["recipe"].choices is train.RECIPES
    assert spec.SCHEMA["optimizer"].choices is train.OPTIMIZERS
    assert spec.SCHEMA["train_norm"].choices is attacks.threat.NORMS is spec.SCHEMA["threat"].choices
    assert spec.SCHEMA["autoattack"].names is attacks.autoattack.AA_ATTACKS  # the names run_autoattack accepts
    for key, k in spec.SCHEMA.items():  # every default passes its own declaration
        spec.check_value(key, k.default)
    assert spec.build_spec("default", [f"seed={2 ** 63 - 1}"])["seed"] == 2 ** 63 - 1  # the largest seed is fine
    for name in attacks.autoattack.AA_ATTACKS:  # each attack run_autoattack accepts is a valid custom AutoAttack
        assert spec.build_spec("default", [f"autoattack=[{name}]"])["autoattack"] == [name]


def test_executor_options_are_declared_once():
    """Every executor the spec names exists, every option's default passes its declaration, and each executor's
    options are exactly those EXECUTOR_OPTIONS gives it."""
    from bench import executors, spec
    assert set(executors._MODULES) == set(spec.EXECUTORS)
    for option, (k, users) in spec.EXECUTOR_OPTIONS.items():
        spec.check_value(option, k.default, k)
        assert set(users) <= set(spec.EXECUTORS)
    for name in spec.EXECUTORS:
        got = spec.executor_options({"name": name})
        assert set(got) == {o for o, (_, users) in spec.EXECUTOR_OPTIONS.items() if name in users}
    assert spec.build_spec("default", ["executor=pool"])["executor"] == {"name": "pool"}
    assert "executor" not in spec.expand(spec.build_spec("default", ["executor.name=ray"]))[0]  # not in a cell


def test_perf_attacks_with_no_matching_model_is_one_line_exit_2(tmp_path, capsys):
    """`bench perf --attacks --models nomodel`: no zoo model matches, one line and exit 2 (it crashed on an empty
    maximum)."""
    import bench.perf as perf
    assert perf.main(["--attacks", "--quick", "--models", "nomodel", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench perf --attacks: no zoo model matches --models 'nomodel'"]
