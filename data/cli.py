"""``subjectbench data ...``: download and verify the DreamBooth dataset, verify custom datasets.

Exit codes: 0 all good; 1 ``verify`` found problems (listed); 2 the command could not do its
job (message on stderr, printed by ``benchmark.cli.main``).
"""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  subjectbench data download                          # into $SUBJECTBENCH_DATASET_DIR or the cache
  subjectbench data download --dataset-dir data/db --source github
  subjectbench data verify --dataset-dir ../shared/datasets/dreambooth
  subjectbench data verify --custom my_subjects/ --json
"""


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "data",
        help="download / verify the DreamBooth dataset, check custom subjects",
        description="Manage the DreamBooth dataset (download, verify) and check custom datasets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True

    download = sub.add_parser(
        "download",
        help="download the pinned DreamBooth dataset and verify every file",
        description=(
            "Download the DreamBooth dataset (30 subjects, 158 images) from the Hugging Face hub "
            "mirror or the GitHub archive at the pinned commit, verify every file against the "
            "shipped sha256 manifest and move it into place. A verified copy already there is "
            "kept without touching the network; an interrupted download resumes."
        ),
    )
    download.add_argument("--dataset-dir", help="target folder (default: $SUBJECTBENCH_DATASET_DIR "
                          "or <cache>/datasets/dreambooth)")
    download.add_argument("--source", choices=["auto", "hub", "github"], default="auto",
                          help="auto: hub, then the GitHub archive (default)")
    download.add_argument("--url", help="archive URL to use instead of GitHub's "
                          "(default: $SUBJECTBENCH_DATASET_URL or the pinned GitHub archive)")
    download.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
    download.add_argument("--force", action="store_true",
                          help="set aside (rename) an existing folder that does not verify")
    download.set_defaults(handler=cmd_download)

    verify = sub.add_parser(
        "verify",
        help="check a DreamBooth copy (or a custom dataset) file by file",
        description=(
            "Report per subject: images found, missing, corrupt (does not decode), checksum "
            "mismatches and unexpected files; exit 1 if anything is wrong."
        ),
    )
    where = verify.add_mutually_exclusive_group()
    where.add_argument("--dataset-dir", help="DreamBooth copy (default: $SUBJECTBENCH_DATASET_DIR "
                       "or <cache>/datasets/dreambooth)")
    where.add_argument("--custom", metavar="DIR",
                       help="a custom dataset: subjects.yaml/csv + one image folder per subject")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--decode-all", action="store_true",
                        help="also decode files whose checksum matches (slower)")
    verify.set_defaults(handler=cmd_verify)

    from data.masks import add_masks_command

    add_masks_command(sub)


def cmd_download(args: argparse.Namespace) -> int:
    from data.download import download_dataset

    result = download_dataset(args.dataset_dir, source=args.source, url=args.url,
                              timeout=args.timeout, force=args.force)
    print(result.message)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from data.subjects import dreambooth_dataset_dir
    from data.verify import verify_custom, verify_dataset

    if args.custom:
        report = verify_custom(args.custom)
    else:
        report = verify_dataset(dreambooth_dataset_dir(args.dataset_dir), decode_all=args.decode_all)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format_text())
    return 0 if report.ok else 1
