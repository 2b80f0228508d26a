"""Leaderboards, exports and plots from result rows (`results.jsonl`). Needs numpy, matplotlib, tabulate and rich;
never imports torch or bench, so a report can be made on a machine without torch.

    reports.render(results_path, out_dir, formats=("md", "html", "csv", "png", "svg")) -> list[Path]
    reports.console_table(rows, *, title=None) -> rich.table.Table
    reports.headline_eps(row) -> float | None
    reports.loglog_slope(rows, y="lip_lower") -> dict(slope, ci_low, ci_high, n_seeds, n_points, ...)
    reports.slope_summary(rows, y="lip_lower") -> list[str]   # one printable line per dataset × threat view
"""
import importlib

# name -> the module that defines it, imported on first use: reading rows (bench run) does not pay matplotlib's import
_WHERE = {"console_table": "console", "render": "render", "FORMATS": "render", "ReportError": "render",
          "law_envelope": "stats", "loglog_slope": "stats", "mean_ci": "stats", "t_quantile": "stats",
          "build_views": "table", "headline_eps": "table", "ranking": "table", "row_flags": "table",
          "slope_summary": "table"}

__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
