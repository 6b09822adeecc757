"""Reports: store -> long pandas DataFrame -> tables, leaderboard, pareto plots, gallery, compare.

Reports read only a run directory, so any report can be rebuilt from it alone:
``subjectbench report RUN_DIR`` (``reports.build.build_report``) and
``subjectbench compare BASELINE_RUN CURRENT_RUN`` (``reports.compare.compare_runs``).
The long results: ``pd.read_parquet("RUN_DIR/report/results.parquet")`` or
``reports.load_results(RUN_DIR)``.
"""

from __future__ import annotations

__all__ = ["build_report", "compare_runs", "load_results"]


def __getattr__(name: str):
    # Lazy, so that `subjectbench --help` does not import pandas/matplotlib through the CLI hook.
    if name == "load_results":
        from reports.long import load_results

        return load_results
    if name == "build_report":
        from reports.build import build_report

        return build_report
    if name == "compare_runs":
        from reports.compare import compare_runs

        return compare_runs
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
