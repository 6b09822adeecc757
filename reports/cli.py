"""The ``report`` and ``compare`` sub-commands of ``subjectbench``."""

from __future__ import annotations

import argparse
from pathlib import Path

COMPARE_EPILOG = """\
pairing: images are matched by method label, cell, checkpoint, subject, role, prompt template,
k and seed (not by key: a changed method gets new keys, and that change is what is compared).
decision: per method entry x metric, delta = mean(current - baseline) with a hierarchical
bootstrap CI (subjects, then prompts); 'worse' when the whole CI lies beyond the tolerance on
the bad side (direction from the metric: PRES lower is better). 'P(current better)': share of
the replicates of the leaderboard's paired bootstrap (one subject/prompt draw for both runs) in
which CURRENT's mean is better; '(tie)' when the data cannot separate the runs.
exit codes: 0 pass, 1 significant regression (or any difference with --fail-on-difference),
2 unusable input.

examples:
  subjectbench compare runs/main runs/my-change
  subjectbench compare runs/main runs/my-change --tolerance 0.02 --tolerance dino=0.01
  subjectbench compare runs/ci-baseline runs/ci --fail-on-difference   # tiny CI runs: any change fails
  subjectbench compare bundles/main runs/my-change   # baseline from `subjectbench export` (not re-run)
"""


def _bootstrap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resamples", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="rebuild a run's report (tables, leaderboard, pareto plots, gallery) from its store",
        description="Rebuild RUN_DIR/report/ from the run directory alone; prints the path of its index.html.",
        epilog="example: subjectbench report runs/default --rank-by clip_t",
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--rank-by", default="dino", metavar="METRIC", help="leaderboard ranking metric (default dino)")
    report.add_argument(
        "--select-by", metavar="CRITERION",
        help="how a sweep's best checkpoint/cell is chosen in the selection table: a metric, or a weighted sum "
             "such as 0.7*dino+0.3*clip_t (default: the --rank-by metric)",
    )
    _bootstrap_arguments(report)
    report.set_defaults(handler=cmd_report)

    compare = commands.add_parser(
        "compare",
        help="paired regression check of CURRENT_RUN against BASELINE (a run or a bundle; exit 1 on a significant regression)",
        description="Compare two runs unit by unit and fail when a metric got significantly worse.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("baseline", metavar="BASELINE", help="baseline run directory or result bundle (subjectbench export)")
    compare.add_argument("current", metavar="CURRENT_RUN")
    compare.add_argument(
        "--tolerance", action="append", metavar="[METRIC=]X",
        help="absolute tolerance in metric units (default 0.01); repeat METRIC=X for one metric",
    )
    compare.add_argument("--fail-on-difference", action="store_true", help="also fail when any paired image or score differs")
    compare.add_argument(
        "--out", metavar="DIR",
        help="write compare.md/compare.json into DIR (default: print only; a comparison never writes into its inputs)",
    )
    _bootstrap_arguments(compare)
    compare.set_defaults(handler=cmd_compare)

    from reports import bundle_cli

    bundle_cli.add_commands(commands)


def _check_bootstrap(args: argparse.Namespace) -> None:
    from reports.rundata import ReportError

    if args.resamples < 1:
        raise ReportError(f"--resamples {args.resamples}: must be at least 1")
    if not 0 < args.confidence < 1:
        raise ReportError(f"--confidence {args.confidence}: must be between 0 and 1, e.g. 0.95")


def cmd_report(args: argparse.Namespace) -> int:
    from reports.build import build_report

    _check_bootstrap(args)
    index = build_report(args.run_dir, rank_by=args.rank_by, resamples=args.resamples, seed=args.seed, confidence=args.confidence,
                         select_by=args.select_by)
    print(f"report: {index}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from reports.compare import Tolerance, compare_runs, comparison_markdown, write_comparison

    _check_bootstrap(args)
    comparison = compare_runs(
        args.baseline, args.current, Tolerance.parse(args.tolerance), args.resamples, args.seed, args.confidence,
        fail_on_difference=args.fail_on_difference,
    )
    print(comparison_markdown(comparison))
    if args.out:
        markdown, document = write_comparison(comparison, Path(args.out))
        print(f"written: {markdown}, {document}")
    else:
        print("(printed only; pass --out DIR to keep compare.md and compare.json)")
    return comparison.exit_code
