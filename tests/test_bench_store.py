import json

import pytest

from bench.store import Store, StoreBusy
from lawbench.reports.rows import RowsError, read_rows, read_rows_file


def test_append_then_read_back(tmp_path):
    with Store(tmp_path) as store:
        store.append({"cell_id": "a", "status": "ok", "x": float("nan")})
        store.append({"cell_id": "b", "status": "failed"})
        assert store.finished() == {"a"}
    rows = read_rows(tmp_path / "results.jsonl")
    assert [r["cell_id"] for r in rows] == ["a", "b"]
    assert rows[0]["x"] is None  # NaN is not JSON: stored as null


def test_torn_last_line_is_skipped_then_cut_before_next_append(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"cell_id": "a", "status": "ok"}) + "\n" + '{"cell_id": "b", "sta')
    parsed = read_rows_file(path)
    assert parsed.torn_tail and [r["cell_id"] for r in parsed.rows] == ["a"]
    with Store(tmp_path) as store:
        store.append({"cell_id": "c", "status": "ok"})
    assert [r["cell_id"] for r in read_rows(path)] == ["a", "c"]
    assert path.read_text().count("\n") == 2


def test_malformed_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"cell_id": "a"}\nnot json\n{"cell_id": "b"}\n')
    with pytest.raises(RowsError, match=r"results.jsonl:2"):
        read_rows(path)


def test_second_writer_is_refused(tmp_path):
    with Store(tmp_path):
        with pytest.raises(StoreBusy, match="another run"):
            with Store(tmp_path):
                pass
