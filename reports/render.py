"""`render(results_path, out_dir)`: every report file from a results store, written atomically into out_dir/report/."""
from __future__ import annotations

from pathlib import Path

from lawbench.base.files import atomic_write_bytes, atomic_write_text

from .csvexport import render_csv
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
    processes: more than 1 reads a large store in parts (reports.forked)."""
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
        return _write(results_path, out_dir, formats, rows)


def _write(results_path: Path, out_dir, formats: tuple, rows: list[dict]) -> list[Path]:
    from .plots import PLOT_NAMES  # matplotlib: imported when a report is made, not before
    views = build_views(rows)
    report_dir = Path(out_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_formats = [f for f in ("png", "svg") if f in formats]
    plot_files, images = _plots(views, report_dir, plot_formats)
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
    return written + plot_files


def _plots(views, report_dir: Path, plot_formats: list[str]) -> tuple[list[Path], dict[str, tuple[str, bytes]]]:
    """Every plot written in each of ``plot_formats``: (the files, {plot: (mime, bytes) of its first format})."""
    from .plots import PLOT_NAMES, PLOTTERS, figure_bytes
    files: list[Path] = []
    images: dict[str, tuple[str, bytes]] = {}
    for name in PLOT_NAMES if plot_formats else ():
        fig = PLOTTERS[name](views)
        for fmt in plot_formats:
            data = figure_bytes(fig, fmt)
            files.append(atomic_write_bytes(report_dir / f"{name}.{fmt}", data))
            images.setdefault(name, (MIME[fmt], data))
    return files, images
