"""`render(results_path, out_dir)`: every report file from a results store, written atomically into out_dir/report/."""
from __future__ import annotations

from pathlib import Path

from lawbench.base.files import atomic_write_bytes, atomic_write_text

from .csvexport import render_csv
from .forked import Forked
from .htmlpage import render_html
from .markdown import render_markdown
from .rows import read_rows_file
from .table import build_views
from .values import remembered

FORMATS = ("md", "html", "csv", "png", "svg")
FILE_NAMES = {"md": "leaderboard.md", "html": "leaderboard.html", "csv": "results.csv"}
MIME = {"png": "image/png", "svg": "image/svg+xml"}


class ReportError(ValueError):
    """Bad input to the report: one line naming the file or option at fault."""


def render(results_path, out_dir, formats=FORMATS, rows: list[dict] | None = None, processes: int = 1) -> list[Path]:
    """Read `results_path` (a results.jsonl, or a folder holding one) and write the requested formats into
    `out_dir/report/`: leaderboard.md, leaderboard.html, results.csv and the plots (robust_vs_ratio,
    lipschitz_vs_ratio, accuracy_by_family) as .png/.svg. Returns the written paths in that order. rows: the
    store's rows already read (reports.rows.read_rows_file, strict=False), so a large store is parsed once.
    processes: more than 1 reads a large store in parts and encodes the plots beside the tables (reports.forked)."""
    results_path = Path(results_path)
    if results_path.is_dir():
        results_path = results_path / "results.jsonl"
    if not results_path.is_file():
        raise ReportError(f"{results_path}: no results file")
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ReportError(f"unknown report format {unknown[0]!r} (choose from {', '.join(FORMATS)})")
    if rows is None:  # malformed lines are skipped; the CLI says how many and where
        rows = read_rows_file(results_path, strict=False, compact_rows=True, processes=processes).rows
    with remembered():
        return _write(results_path, out_dir, formats, rows, processes)


def _write(results_path: Path, out_dir, formats: tuple, rows: list[dict], processes: int = 1) -> list[Path]:
    from .plots import PLOT_NAMES  # matplotlib: imported when a report is made, not before
    views = build_views(rows)
    report_dir = Path(out_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_formats = [f for f in ("png", "svg") if f in formats]
    encoded = _plots(views, plot_formats, processes)
    images = {name: (MIME[plot_formats[0]], data[plot_formats[0]]) for name, data in encoded.items()}
    source = results_path.name
    written: list[Path] = []
    if "md" in formats:
        md = render_markdown(rows, views, source=source, plots=list(PLOT_NAMES) if plot_formats else [],
                             plot_ext=plot_formats[0] if plot_formats else None)
        written.append(atomic_write_text(report_dir / FILE_NAMES["md"], md))
    if "html" in formats:
        written.append(atomic_write_text(report_dir / FILE_NAMES["html"],
                                         render_html(rows, views, source=source, images=images)))
    if "csv" in formats:
        written.append(atomic_write_text(report_dir / FILE_NAMES["csv"], render_csv(rows)))
    return written + [atomic_write_bytes(report_dir / f"{name}.{fmt}", data[fmt])
                      for name, data in encoded.items() for fmt in plot_formats]


def _plots(views, plot_formats: list[str], processes: int) -> dict[str, dict[str, bytes]]:
    """Every plot drawn and encoded in each of ``plot_formats``: {plot: {format: bytes}}, each format from a figure
    drawn afresh (drawing one format lays out the figure for the next). With ``processes`` > 1 a forked process
    encodes the second format while this one encodes the first (1.3 s of a 20,000-row report's 18 s): encoding
    touches the figures alone, so the two processes share the rows' pages, where a forked process beside the tables
    would copy them as this one reads the rows (150 MB more at 20,000 rows)."""
    from .plots import PLOT_NAMES, PLOTTERS
    if not plot_formats:
        return {}

    def drawn():
        return {name: PLOTTERS[name](views) for name in PLOT_NAMES}

    figures, later = drawn(), plot_formats[1:]
    rest = Forked(_encode, figures, later, fork=processes > 1,
                  here=lambda _, formats: _encode(drawn(), formats)) if later else None
    first = _encode(figures, plot_formats[:1])
    second = rest.result() if rest else {}
    return {name: {**first[name], **second.get(name, {})} for name in figures}


def _encode(figures: dict, plot_formats: list[str]) -> dict[str, dict[str, bytes]]:
    from .plots import figure_bytes
    return {name: {fmt: figure_bytes(fig, fmt) for fmt in plot_formats} for name, fig in figures.items()}
