"""A cluster sweep's store: `bench report` reads it in parts on several CPUs and asks each row its questions once.
Each of these must give exactly what one process reading line by line gives. (The time and memory figures are
`python -m bench perf --report`'s, never a test's.)"""
from __future__ import annotations

import json
import os
import signal
from contextlib import nullcontext

import pytest

from lawbench.reports import render
from lawbench.reports import rows as rows_module
from lawbench.reports.forked import Forked
from lawbench.reports.rows import read_rows_file
from lawbench.reports.values import acc_at, acc_map, remembered, row_eps, verified_at
from test_reports import fixture_rows


def _store(tmp_path):
    """The report tests' rows with hostile lines spread through the file: every part of a cut meets one."""
    rows = fixture_rows()
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "[1, 2]")                                               # not an object
    lines.insert(len(lines) // 2, json.dumps({**rows[0], "params": 0}))     # breaks the schema
    lines.insert(len(lines) - 4, '{"a": ' * 40 + "1" + "}" * 40)           # too deep
    lines.insert(len(lines) - 2, json.dumps({**rows[5], "clean_acc": 0.5}))  # rows[5]'s cell written again
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n" + json.dumps(rows[1])[:-7])    # a torn last line
    return path


@pytest.mark.parametrize("processes", [2, 3, 5])
def test_a_store_read_in_parts_is_the_store_read_in_one(tmp_path, monkeypatch, processes):
    path = _store(tmp_path)
    one = read_rows_file(path, strict=False, compact_rows=True)
    monkeypatch.setattr(rows_module, "PARALLEL_BYTES", 0)
    parts = read_rows_file(path, strict=False, compact_rows=True, processes=processes)
    assert len(rows_module._cuts(path, path.stat().st_size, processes)) == processes + 1
    assert parts.rows == one.rows and len(one.rows) == len(fixture_rows())
    lines = path.read_text().splitlines()
    assert parts.malformed == one.malformed and [(lines[i - 1][:6], why) for i, why in one.malformed] == [
        ("[1, 2]", "not a JSON object"), ('{"a": ', "nested deeper than 16 levels")]
    assert parts.invalid == one.invalid and len(one.invalid) == 1
    assert parts.torn_tail and one.torn_tail and parts.superseded == one.superseded == 1


def test_a_strict_read_in_parts_names_the_files_line(tmp_path, monkeypatch):
    """The writer's read: a malformed line in a forked part is the same RowsError, naming the file's line number."""
    path = _store(tmp_path)
    monkeypatch.setattr(rows_module, "PARALLEL_BYTES", 0)
    for processes in (1, 3):
        with pytest.raises(rows_module.RowsError, match=rf"{path}:4: malformed result row \(not a JSON object\)"):
            read_rows_file(path, processes=processes)


def _fails(x):
    raise KeyError(f"no {x}")


def _dies(parent):
    if os.getpid() != parent:  # the forked process is killed; run here, it answers
        os.kill(os.getpid(), signal.SIGKILL)
    return "answered here"


def test_forked_work_that_fails_is_done_again_here_with_its_own_result_or_exception():
    assert Forked(sum, [1, 2, 3]).result() == 6
    with pytest.raises(KeyError, match="no thing"):
        Forked(_fails, "thing").result()
    assert Forked(_dies, os.getpid()).result() == "answered here"
    assert Forked(sum, [4], fork=False).result() == 4 and Forked(sum, [4], fork=False).pid is None
    here = lambda parent: "its own way here"  # noqa: E731
    assert Forked(_dies, os.getpid(), here=here).result() == "its own way here"
    assert Forked(sum, [4], fork=False, here=lambda xs: -1).result() == -1


def test_an_accuracy_map_and_a_lookup_agree_on_every_spelling_of_an_eps():
    """Two keys of one eps: the writer's own spelling wins wherever it stands, else the later; a remembered read is
    the same read."""
    rows = [{"robust_acc": {"0.10": 0.5, "0.1": 0.3, "0.2": 0.1, "0.20": 0.2, "x": 1.0}, "eps": [0.1, 0.2],
             "verified": {"0.10": True, "0.1": False}},
            {"robust_acc": {"0.1": 0.3, "0.10": 0.5, "0.200": 0.4, "0.20": 0.6}, "verified": {"0.1": False}}]
    expect = [{0.1: 0.3, 0.2: 0.1}, {0.1: 0.3, 0.2: 0.6}]
    for scope in (False, True):
        with remembered() if scope else nullcontext():
            for row, want in zip(rows, expect):
                assert acc_map(row, "robust_acc") == want
                assert {e: acc_at(row, "robust_acc", e) for e in want} == want
                assert row_eps(row) == [0.1, 0.2]
            assert verified_at(rows[0], 0.1) and not verified_at(rows[1], 0.1) and not verified_at(rows[0], 0.2)


def test_a_report_on_two_cpus_writes_the_same_files_as_on_one(tmp_path, monkeypatch):
    """Read in parts, rows' readings remembered, the plots encoded in two processes: byte for byte the files of
    one process."""
    path = _store(tmp_path)
    monkeypatch.setattr(rows_module, "PARALLEL_BYTES", 0)
    written = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        written[processes] = {p.name: p.read_bytes() for p in render(path, out, processes=processes)}
    # each format is encoded from a figure drawn afresh: an SVG alone is the SVG beside a PNG
    alone = {p.name: p.read_bytes() for p in render(path, tmp_path / "svg", formats=("svg",), processes=2)}
    assert alone == {k: v for k, v in written[1].items() if k.endswith(".svg")} and len(alone) == 4
    assert written[1] == written[2] and sorted(written[1]) == sorted(
        ["leaderboard.md", "leaderboard.html", "results.csv"]
        + [f"{n}.{e}" for n in ("robust_vs_ratio", "lipschitz_vs_ratio", "accuracy_by_family", "frontier")
           for e in ("png", "svg")])
