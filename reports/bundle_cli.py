"""The ``export`` and ``leaderboard`` sub-commands: result bundles and multi-run leaderboard sites."""

from __future__ import annotations

import argparse

LEADERBOARD_EPILOG = """\
comparability: entries are ranked together only when their protocol (dataset checksums, prompts,
images per prompt, seed rule, sampler, resolution) and metric fingerprints match; every other
group gets its own table, and the site says what differs. The same method cell (same method
fingerprint) from two sources is shown once with both sources, flagged when their CIs disagree.

examples:
  subjectbench export runs/main --out bundles/main --thumbnails
  subjectbench leaderboard bundles/lab-a bundles/lab-b runs/mine --out site
  subjectbench leaderboard hf://datasets/lab/results@v1 runs/mine --out site   # a bundle pushed to the hub
"""


def add_commands(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a run's results as a content-hashed bundle (parquet + dataset card; no images)",
        description="Export RUN_DIR as a result bundle that loads with `datasets` and can stand in for the run "
        "in `leaderboard` and as the baseline of `compare`.",
        epilog="example: subjectbench export runs/main --out bundles/main --thumbnails",
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", required=True, metavar="BUNDLE", help="new (or empty) folder for the bundle")
    export.add_argument("--thumbnails", action="store_true", help="also store a JPEG thumbnail (<=128 px) per image")
    export.set_defaults(handler=cmd_export)

    board = commands.add_parser(
        "leaderboard",
        help="merge bundles and run directories into one static leaderboard site",
        description="Rank the method entries of several bundles / run directories, grouped by comparable protocol.",
        epilog=LEADERBOARD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    board.add_argument("sources", nargs="+", metavar="BUNDLE_OR_RUN", help="bundle folder, run directory, or hf://datasets/OWNER/NAME[@REV]")
    board.add_argument("--out", required=True, metavar="SITE", help="folder for the site (index.html)")
    board.add_argument("--rank-by", default="dino", metavar="METRIC", help="ranking metric (default dino)")
    board.add_argument("--resamples", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    board.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    board.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    board.set_defaults(handler=cmd_leaderboard)


def cmd_export(args: argparse.Namespace) -> int:
    from reports.bundle import export_bundle

    path, digest = export_bundle(args.run_dir, args.out, thumbnails=args.thumbnails)
    print(f"bundle: {path}\ncontent hash: {digest}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from reports.cli import _check_bootstrap
    from reports.multirun import build_site

    _check_bootstrap(args)
    site = build_site(args.sources, args.out, rank_by=args.rank_by, resamples=args.resamples, seed=args.seed,
                      confidence=args.confidence)
    print(f"site: {site.index}")
    for line in site.notes:
        print(f"note: {line}")
    return 0
