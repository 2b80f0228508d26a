"""Reading the results store (`results.jsonl`): the one reader shared by reports and by the runner's resume logic.

The store is append-only JSON lines. A process killed mid-write can leave a torn last line; it is skipped (and
counted), never fatal. A malformed line elsewhere means the file was edited or corrupted: the writer refuses such a
store (RowsError naming the file and line); a report (strict=False) skips the line and records its number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_KEYS = (
    "cell_id", "bench_version", "status", "error", "dataset", "n_train", "n_test", "d", "d_eff", "label_noise",
    "num_classes", "model", "family", "width", "params", "recipe", "train_eps", "seed", "device", "train_acc",
    "clean_acc", "threat", "eps", "pgd_acc", "autoattack_acc", "robust_acc", "cert_acc", "lip_upper", "lip_lower",
    "ratio", "ratio_eff", "law_scale", "aa_flags", "timings",
)


# flags that say a row's attacks may have been fooled (gradient masking, randomness, scaled logits); the runner copies
# AutoAttack's and the suite's into the row's `flags`, reports mark rows carrying one (in `flags` or `aa_flags`)
TRUST_FLAGS = ("randomized", "softmax_output", "zero_gradients", "square_beats_whitebox", "dynamic",
               "softmax_saturated")


def eps_key(eps: float) -> str:
    """The key of an eps in a row's accuracy maps: the shortest text that round-trips the float ("0.1", "1.0")."""
    return repr(float(eps))


class RowsError(ValueError):
    """A results file that cannot be read; the message names the file and line."""


@dataclass
class RowsFile:
    rows: list[dict] = field(default_factory=list)
    torn_tail: bool = False  # the last line was incomplete (a run killed while writing it)
    malformed: list[int] = field(default_factory=list)  # line numbers skipped as not a JSON object (strict=False)


def read_rows_file(path: str | Path, strict: bool = True) -> RowsFile:
    """Every row of a results file. strict: a malformed line other than a torn last one is a RowsError; otherwise
    it is skipped and its line number listed in `malformed`."""
    path = Path(path)
    if not path.exists():
        return RowsFile()
    try:
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
        out.rows.append(row)
    return out


def read_rows(path: str | Path, strict: bool = True) -> list[dict]:
    """All complete rows of a results file (missing file: no rows; torn last line: skipped)."""
    return read_rows_file(path, strict).rows
