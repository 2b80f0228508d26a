"""Reading the results store (`results.jsonl`): the one reader shared by reports and by the runner's resume logic.

The store is append-only JSON lines, read line by line and each line untrusted (its size, depth and types). A process
killed mid-write can leave a torn last line; it is skipped (and counted), never fatal. A malformed line elsewhere
means the file was edited or corrupted: the writer refuses such a store (RowsError naming the file and line); a
report (strict=False) skips the line and records its number and why. A cluster sweep's store (16 MB and more) is read
in parts, each but the first by a forked process (reports.forked), with the result of one process.
"""
from __future__ import annotations

import gc
import json
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .forked import Forked
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


def _share(row: dict) -> dict:
    """``row`` with every key string shared between rows (sys.intern; 20,000 rows parsed apart hold 20,000 copies of
    each key), changed in place, or ValueError past MAX_DEPTH levels: one pass level by level judges the depth too."""
    level, depth, intern = [row], 1, sys.intern
    while level:
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        below = []
        for c in level:
            if type(c) is dict:
                keys, values = list(map(intern, c)), list(c.values())
                c.clear()
                c.update(zip(keys, values))
            else:
                values = c
            below += [v for v in values if type(v) is dict or type(v) is list]
        level, depth = below, depth + 1
    return row


def _parse(raw: bytes, drop=frozenset()) -> dict:
    """One line as a row object without the keys ``drop`` (neither kept nor judged), or ValueError saying why it is
    none."""
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"{len(raw) / 2 ** 20:.1f} MB, larger than any row ({MAX_LINE_BYTES >> 20} MB at most)")
    try:
        row = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    return _share(compact(row, drop) if drop else row)


def compact(row: dict, drop=DETAIL_KEYS) -> dict:
    """``row`` as a report holds it: without the keys no report reads (schema DETAIL_KEYS); a default row is 5 kB as
    JSON and 25 kB as Python objects."""
    return {k: v for k, v in row.items() if k not in drop}


def read_rows_file(path: str | Path, strict: bool = True, compact_rows: bool = False,
                   processes: int = 1) -> RowsFile:
    """Every row of a results file, read line by line. strict (the writer, resuming): a malformed line other than a
    torn last one, or a row whose cell_id is not a string, is a RowsError naming the file and line; the
    rest of a row is not judged (the rows it reads back are its own). Otherwise (reports) such a line is skipped and
    listed (`malformed`), a row that breaks the row schema (a value of the wrong type, not finite, out of range; a
    required key missing) is skipped and listed (`invalid`), and rows are collapsed to one per cell_id (its last ok
    row, else its last row: a cell retried after failing, or a row written twice, counts once).
    compact_rows (a report): each row kept as ``compact`` makes it (the keys it drops are neither kept nor judged).
    processes: a store of PARALLEL_BYTES or more is cut at line ends into that many parts, each but the first read
    by a forked process (reports.forked); the same result as one process.
    Anything but a regular file (a FIFO would block the read forever, a device never ends) is a RowsError."""
    path = Path(path)
    if not path.exists():
        return RowsFile()
    drop = DETAIL_KEYS if compact_rows else ()
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise RowsError(f"{path}: not a regular file (a {_file_kind(st.st_mode)}); a results file is needed")
        cuts = _cuts(path, st.st_size, processes if st.st_size >= PARALLEL_BYTES else 1)
        with _gc_paused():
            others = [Forked(_read_range, path, a, b, strict, drop) for a, b in zip(cuts[1:-1], cuts[2:])]
            parts = [_read_range(path, cuts[0], cuts[1], strict, drop)] + [p.result() for p in others]
    except OSError as exc:
        raise RowsError(f"{path}: cannot read results file ({exc.strerror or type(exc).__name__})") from None
    out = _joined(parts)
    if not strict:
        out.rows, out.superseded = one_per_cell(out.rows)
    return out


# A store this large is read by several processes (about 0.3 s to start one; 1 MB of rows takes 0.1 s to parse here)
PARALLEL_BYTES = 16 << 20


@contextmanager
def _gc_paused():
    """Rows parsed from JSON hold no reference cycles: the cyclic collector, run again and again over a growing heap
    of them, only costs time (0.7 s of 8 s on 20,000 rows)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _cuts(path: Path, size: int, parts: int) -> list[int]:
    """Byte offsets cutting the file into ``parts`` ranges at line ends: [0, ..., size]."""
    cuts = [0]
    with open(path, "rb") as fh:
        for j in range(1, max(1, parts)):
            fh.seek(max(cuts[-1], size * j // parts))
            fh.readline()
            if fh.tell() < size:
                cuts.append(fh.tell())
    return cuts + [size]


def _read_range(path: Path, start: int, end: int, strict: bool, drop) -> tuple[RowsFile, int]:
    """(the rows of bytes [start, end), their lines numbered from 1 as if the range were the file; its line count)."""
    out, i = RowsFile(), 0
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < end:
            raw = fh.readline()
            if not raw:
                break
            pos += len(raw)
            i += 1
            row = _read_line(path, i, raw, strict, out, drop)
            if row is not None:
                out.rows.append(row)
    return out, i


def _joined(parts: list[tuple[RowsFile, int]]) -> RowsFile:
    """One RowsFile of consecutive ranges, their line numbers made the file's."""
    out, offset = RowsFile(), 0
    for part, lines in parts:
        out.rows += part.rows
        out.malformed += [(i + offset, why) for i, why in part.malformed]
        out.invalid += [(i + offset, why) for i, why in part.invalid]
        out.torn_tail = part.torn_tail  # only the file's last line can be torn
        offset += lines
    return out


def _read_line(path: Path, i: int, raw: bytes, strict: bool, out: RowsFile, drop=()) -> dict | None:
    """The row on line i without the keys ``drop``, or None where it is skipped (and recorded in ``out``)."""
    if not raw.strip():
        return None
    try:
        row = _parse(raw, drop)
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
