"""`python -m bench run | list | report | perf`.

Bad input (unknown preset, key, model or dataset; bad values; unreadable data) prints one line naming the culprit and
exits with code 2 before anything is written. A run whose cells all succeed exits 0; one with failed cells exits 1.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from rich.console import Console

EXIT_BAD_INPUT = 2


def _console() -> Console:
    # Off a terminal (CI, pipes) rich would wrap tables at 80 columns; the results table needs more.
    probe = Console()
    return probe if probe.is_terminal else Console(width=180)


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit 2, like every other bad input."""

    def error(self, message):
        print(f"error: {self.prog}: {_one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sweep (default preset: MNIST-5k mlp width family)")
    run.add_argument("args", nargs="*", metavar="[PRESET] [key=value ...]",
                     help="a preset name or TOML file, then overrides such as width=[16,64] epochs=5")
    run.add_argument("--out", default="results", help="results directory (default ./results)")
    run.add_argument("--data-dir", default=None, help="folder with MNIST/CIFAR-10 files (default $BENCH_DATA)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    run.add_argument("--plugin", action="append", default=[], help="import a module that registers models (and attacks)")
    run.add_argument("--entry", action="append", default=[], metavar="FILE.toml",
                     help="evaluate an external checkpoint entry (no training) instead of the preset's models")
    run.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    run.add_argument("--executor", default=None, metavar="NAME",
                     help="local (default: in this process), pool (local workers), ray, slurm; also [executor] name")
    run.add_argument("--threads", default=None, metavar="N",
                     help="torch threads per cell; 0: the thread rule per phase (default: the spec's executor.threads)")
    run.add_argument("--workers", default=None, metavar="N", help="pool: cells at once (default: CPUs / threads)")
    run.add_argument("--address", default=None, help="ray: the cluster to join (default: start a local instance)")
    lst = sub.add_parser("list", help="models, datasets, presets and attacks")
    lst.add_argument("--plugin", action="append", default=[], help="import a module that registers models (and attacks)")
    rep = sub.add_parser("report", help="leaderboards and plots from a results directory")
    rep.add_argument("--out", default="results", help="results directory (default ./results)")
    perf = sub.add_parser("perf", help="attack-engine speed benchmark", add_help=False)
    perf.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _bad_input_types() -> tuple:
    from lawbench import datasets
    from lawbench import models
    from bench.device import DeviceError
    from bench.spec import SpecError
    from bench.store import StoreError
    from lawbench.reports.render import ReportError
    from lawbench.reports.rows import RowsError
    return SpecError, datasets.DatasetError, models.ModelError, RowsError, StoreError, DeviceError, ReportError


def _os_error_line(exc: OSError) -> str:
    """A filesystem error as one line naming the path (the places that know better say more)."""
    names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{names}: {exc.strerror or type(exc).__name__}" if names else f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["perf"]:
        from bench.perf import main as perf_main
        return perf_main(argv[1:])
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and not any(e.startswith("-") for e in extra):
        args.args += extra  # presets and key=value overrides may follow the options too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            from bench.run import run_command
            return run_command(args, _console())
        if args.command == "list":
            from bench.listing import list_command
            return list_command(args, _console())
        if args.command == "report":
            return report_command(args, _console())
    except _bad_input_types() as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # permission, not a directory, read-only, ...: the path, never a traceback
        print(f"error: {_one_line(_os_error_line(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UnicodeDecodeError as exc:
        print(f"error: input is not UTF-8 text ({exc.reason} at byte {exc.start})", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished cells are in the store; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


ERROR_CHARS = 400  # an error line quotes the culprit, not all of a 100 kB value


def _one_line(text) -> str:
    line = " ".join(str(text).split())
    if len(line) <= ERROR_CHARS:
        return line
    half = ERROR_CHARS // 2
    return f"{line[:half]} ...[{len(line) - 2 * half:,} characters]... {line[-half:]}"


def _lines(found: list) -> str:
    """'line 3', 'lines 3, 7' or 'lines 3, 7, 9, 12, 15 and 995 more': a warning stays one short line."""
    shown = ", ".join(str(i) for i, _ in found[:SHOWN_LINES])
    more = f" and {len(found) - SHOWN_LINES} more" if len(found) > SHOWN_LINES else ""
    return f"line{'s' if len(found) > 1 else ''} {shown}{more}"


SHOWN_LINES = 5
CONSOLE_ROWS = 60  # rows `bench report` prints to the terminal (the files hold every row)


def skipped_rows_warning(path, parsed) -> str | None:
    """'warning: results.jsonl: skipped 1 torn last line and 2 malformed rows (lines 3, 7; line 3: not a JSON
    object)' (and rows that break the row schema, with the first problem of the first; and rows another row of their
    cell replaces), or None."""
    parts = []
    if parsed.torn_tail:
        parts.append("1 torn last line")
    for found, one, many in ((parsed.malformed, "malformed row", "malformed rows"),
                             (parsed.invalid, "row that breaks the row schema", "rows that break the row schema")):
        if found:
            n = len(found)
            line, why = found[0]
            noun = many if n > 1 else one
            parts.append(f"{n} {noun} ({_lines(found)}; line {line}: {_one_line(why)[:200]})")
    if parsed.superseded:
        n = parsed.superseded
        parts.append(f"{n} row{'s' if n > 1 else ''} of a cell another row replaces (a retried cell or a row written "
                     f"twice counts once)")
    return f"warning: {path}: skipped {' and '.join(parts)}" if parts else None


def report_command(args, console: Console) -> int:
    from lawbench import reports
    from bench.store import check_out_dir  # not bench.run: a report never imports torch (200 MB)
    from lawbench.reports.forked import cpus
    from lawbench.reports.rows import read_rows_file
    check_out_dir(args.out)
    results = Path(args.out) / "results.jsonl"
    if not results.exists():
        print(f"error: {results}: no results file (run `python -m bench run --out {args.out}` first)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    report_dir = Path(args.out) / "report"
    if report_dir.exists() and not report_dir.is_dir():
        print(f"error: {report_dir}: not a directory (the report is written there)", file=sys.stderr)
        return EXIT_BAD_INPUT
    # a cluster sweep's store is read in parts on the CPUs this process may use (at most 4: the parts come back
    # pickled to this one process)
    parsed = read_rows_file(results, strict=False, compact_rows=True, processes=min(4, cpus()))
    gc.freeze()  # the rows live until the process ends: the cyclic collector need not scan them again (1 s in 20 s)
    warning = skipped_rows_warning(results, parsed)
    if warning:
        print(warning, file=sys.stderr)
    shown = parsed.rows[:CONSOLE_ROWS]
    console.print(reports.console_table(shown))
    if len(parsed.rows) > len(shown):  # a cluster sweep's 20,000 rows are for the files, not the terminal
        console.print(f"the first {len(shown)} of {len(parsed.rows):,} rows; every row is in the report below")
    for path in reports.render(results, Path(args.out), rows=parsed.rows, processes=cpus()):
        console.print(f"wrote {path}")
    return 0
