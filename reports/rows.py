"""Reading the results store (`results.jsonl`): the one reader shared by reports and by the runner's resume logic.

The store is append-only JSON lines. A process killed mid-write can leave a torn last line; it is skipped (and
counted), never fatal. A malformed line elsewhere means the file was edited or corrupted: the writer refuses such a
store (RowsError naming the file and line); a report (strict=False) skips the line and records its number.
"""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .schema import check_row

class RowsError(ValueError):
    """A results file that cannot be read; the message names the file and line."""


@dataclass
class RowsFile:
    rows: list[dict] = field(default_factory=list)
    torn_tail: bool = False  # the last line was incomplete (a run killed while writing it)
    malformed: list[int] = field(default_factory=list)  # line numbers skipped as not a JSON object (strict=False)
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (line, first problem): rows that break the row
    # schema (reports.schema), skipped (strict=False)


def read_rows_file(path: str | Path, strict: bool = True) -> RowsFile:
    """Every row of a results file. strict: a malformed line other than a torn last one is a RowsError; otherwise
    it is skipped and its line number listed in `malformed`, and a row that breaks the row schema (a value of the
    wrong type, not finite, out of range; a required key missing) is skipped and listed in `invalid`. The writer
    (strict) judges JSON only: the rows it reads back are its own, and it needs their cell_id and status alone.
    Anything but a regular file (a FIFO would block the read forever, a device never ends) is a RowsError."""
    path = Path(path)
    if not path.exists():
        return RowsFile()
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise RowsError(f"{path}: not a regular file (a {_file_kind(mode)}); a results file is needed")
        data = path.read_bytes()
    except OSError as exc:
        raise RowsError(f"{path}: cannot read results file ({exc.strerror or type(exc).__name__})") from None
    lines = data.split(b"\n")
    out = RowsFile()
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last = i == len(lines) or all(not rest.strip() for rest in lines[i:])
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if is_last and not data.endswith(b"\n"):
                out.torn_tail = True
                continue
            if not strict:
                out.malformed.append(i)
                continue
            raise RowsError(f"{path}:{i}: malformed result row ({exc})") from None
        if not strict:
            problems = check_row(row)
            if problems:
                out.invalid.append((i, problems[0]))
                continue
        out.rows.append(row)
    return out


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_rows(path: str | Path, strict: bool = True) -> list[dict]:
    """All complete rows of a results file (missing file: no rows; torn last line: skipped)."""
    return read_rows_file(path, strict).rows
