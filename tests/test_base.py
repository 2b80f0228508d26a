"""The bottom layer's helpers (lawbench.base), each the one place of its idea."""
from __future__ import annotations

import pytest
import torch

from lawbench.base.files import atomic_output, atomic_write_text
from lawbench.base.memory import Backoff, is_oom
from lawbench.base.modes import eval_mode
from lawbench.base.names import did_you_mean


def test_backoff_halves_on_out_of_memory_down_to_the_floor():
    seen, logs = [], []

    def work(batch):
        seen.append(batch)
        if batch > 24:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * 2

    b = Backoff(100, floor=4, log=logs.append, what="pgd: max_batch")
    assert b.run(work) == 24
    assert seen == [100, 50, 25, 12] and b.batch == 12 and b.ooms == 3
    assert logs == ["out of memory, pgd: max_batch -> 50", "out of memory, pgd: max_batch -> 25",
                    "out of memory, pgd: max_batch -> 12"]
    assert b.run(lambda n: n) == 12  # the batch that fitted is kept for the next call


def test_backoff_raises_other_errors_and_at_the_floor():
    with pytest.raises(ValueError):
        Backoff(8).run(lambda n: (_ for _ in ()).throw(ValueError("bad shape")))
    calls = []

    def always_oom(n):
        calls.append(n)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(RuntimeError, match="allocate"):
        Backoff(8, floor=2).run(always_oom)
    assert calls == [8, 4, 2]
    assert is_oom(RuntimeError("not enough memory")) and not is_oom(RuntimeError("shape mismatch"))


def test_eval_mode_restores_each_modules_own_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    model.train()
    model[2].eval()  # a submodule kept in eval by its owner: model.train(True) afterwards would flip it
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    with pytest.raises(KeyError):
        with eval_mode(model):
            raise KeyError("inside")
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_did_you_mean():
    assert did_you_mean("autoatack", ["autoattack", "fast", "pgd"]) == "; did you mean 'autoattack'?"
    assert did_you_mean("zzz", ["autoattack"]) == ""
    assert did_you_mean("mlp2", ["mlp", "mlp3", "cnn"], n=3, cutoff=0.5) == "; did you mean 'mlp', 'mlp3'?"


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    with pytest.raises(OSError):
        with atomic_output(target) as f:
            f.write(b"half")
            raise OSError("disk full")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
