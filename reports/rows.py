"""Reading the results store (`results.jsonl`): the one reader shared by reports and by the runner's resume logic.

The store is append-only JSON lines, read line by line and each line untrusted (its size, depth and types). A process
killed mid-write can leave a torn last line; it is skipped (and counted), never fatal. A malformed line elsewhere
means the file was edited or corrupted: the writer refuses such a store (RowsError naming the file and line); a
report (strict=False) skips the line and records its number and why.
"""
from __future__ import annotations

import json
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .schema import DETAIL_KEYS, check_row


class RowsError(ValueError):
    """A results file that cannot be read; the message names the file and line."""


# Every line is untrusted: a row is an object of numbers, strings and small maps, a few kB (the largest of the stores
# on this machine 13.5 kB, 6 levels deep). Deeper or larger lines are not rows, whatever they parse to.
MAX_LINE_BYTES = 4 << 20
MAX_DEPTH = 16
IDENTITY = ("cell_id",)  # what the writer reads back from its own rows (resume) must be a string


@dataclass
class RowsFile:
    rows: list[dict] = field(default_factory=list)
    torn_tail: bool = False  # the last line was incomplete (a run killed while writing it)
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line, why): not a JSON object, too deep or too
    # large (strict=False skips them)
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (line, first problem): rows that break the row
    # schema (reports.schema), skipped (strict=False)
    superseded: int = 0  # rows of a cell_id another row replaces (strict=False: one row per cell)


def _walk(v, depth: int = 1):
    """``v`` with every key string shared between rows (sys.intern), or ValueError past MAX_DEPTH levels: one walk
    judges the depth and saves the memory (20,000 rows parsed apart hold 20,000 copies of each key)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(v, dict):
        return {sys.intern(k): (_walk(x, depth + 1) if isinstance(x, (dict, list)) else x) for k, x in v.items()}
    return [(_walk(x, depth + 1) if isinstance(x, (dict, list)) else x) for x in v]


def _parse(raw: bytes) -> dict:
    """One line as a row object, or ValueError saying why it is none."""
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"{len(raw) / 2 ** 20:.1f} MB, larger than any row ({MAX_LINE_BYTES >> 20} MB at most)")
    try:
        row = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    return _walk(row)


def compact(row: dict) -> dict:
    """``row`` as a report holds it: without the keys no report reads (schema DETAIL_KEYS); a default row is 5 kB as
    JSON and 25 kB as Python objects."""
    return {k: v for k, v in row.items() if k not in DETAIL_KEYS}


def read_rows_file(path: str | Path, strict: bool = True, compact_rows: bool = False) -> RowsFile:
    """Every row of a results file, read line by line. strict (the writer, resuming): a malformed line other than a
    torn last one, or a row whose cell_id is not a string, is a RowsError naming the file and line; the
    rest of a row is not judged (the rows it reads back are its own). Otherwise (reports) such a line is skipped and
    listed (`malformed`), a row that breaks the row schema (a value of the wrong type, not finite, out of range; a
    required key missing) is skipped and listed (`invalid`), and rows are collapsed to one per cell_id (its last ok
    row, else its last row: a cell retried after failing, or a row written twice, counts once).
    compact_rows (a report): each row kept as ``compact`` makes it.
    Anything but a regular file (a FIFO would block the read forever, a device never ends) is a RowsError."""
    path = Path(path)
    if not path.exists():
        return RowsFile()
    out = RowsFile()
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise RowsError(f"{path}: not a regular file (a {_file_kind(mode)}); a results file is needed")
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh, start=1):
                row = _read_line(path, i, raw, strict, out)
                if row is not None:
                    out.rows.append(compact(row) if compact_rows else row)
    except OSError as exc:
        raise RowsError(f"{path}: cannot read results file ({exc.strerror or type(exc).__name__})") from None
    if not strict:
        out.rows, out.superseded = one_per_cell(out.rows)
    return out


def _read_line(path: Path, i: int, raw: bytes, strict: bool, out: RowsFile) -> dict | None:
    """The row on line i, or None where it is skipped (and recorded in ``out``)."""
    if not raw.strip():
        return None
    try:
        row = _parse(raw)
        if strict:
            bad = [k for k in IDENTITY if not isinstance(row.get(k), str)]
            if bad:
                raise ValueError(f"its {bad[0]} is {type(row.get(bad[0])).__name__}, not a string")
    except ValueError as exc:
        if not raw.endswith(b"\n"):  # the last line, cut short by a killed writer
            out.torn_tail = True
            return None
        if not strict:
            out.malformed.append((i, str(exc)))
            return None
        raise RowsError(f"{path}:{i}: malformed result row ({exc})") from None
    if not strict:
        problems = check_row(row)
        if problems:
            out.invalid.append((i, problems[0]))
            return None
    return row


def one_per_cell(rows: list[dict]) -> tuple[list[dict], int]:
    """(one row per cell_id in order of first appearance: its last ok row, else its last row; rows dropped)."""
    keep: dict[str, dict] = {}
    for r in rows:
        cid = r["cell_id"]
        if cid not in keep or r.get("status") == "ok" or keep[cid].get("status") != "ok":
            keep[cid] = r
    return list(keep.values()), len(rows) - len(keep)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_rows(path: str | Path, strict: bool = True) -> list[dict]:
    """All complete rows of a results file (missing file: no rows; torn last line: skipped)."""
    return read_rows_file(path, strict).rows
