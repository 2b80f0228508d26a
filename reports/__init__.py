"""Leaderboards, exports and plots from result rows (`results.jsonl`). Needs numpy, matplotlib, tabulate and rich;
never imports torch or bench, so a report can be made on a machine without torch.

    reports.render(results_path, out_dir, formats=("md", "html", "csv", "png", "svg")) -> list[Path]
    reports.console_table(rows, *, title=None) -> rich.table.Table
    reports.headline_eps(row) -> float | None
    reports.loglog_slope(rows, y="lip_lower") -> dict(slope, ci_low, ci_high, n_seeds, n_points, ...)
    reports.slope_summary(rows, y="lip_lower") -> list[str]   # one printable line per dataset × threat view
"""
from .console import console_table
from .render import FORMATS, ReportError, render
from .stats import law_envelope, loglog_slope, mean_ci, t_quantile
from .table import build_views, headline_eps, ranking, row_flags, slope_summary

__all__ = ["render", "console_table", "headline_eps", "loglog_slope", "law_envelope", "mean_ci", "t_quantile",
           "build_views", "ranking", "row_flags", "slope_summary", "ReportError", "FORMATS"]
