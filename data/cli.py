"""``subjectbench data ...``: download, verify (and masks) for the DreamBooth dataset."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "data",
        help="download / verify the DreamBooth dataset, make subject masks",
        description="Manage the DreamBooth dataset: download it, verify it, make subject masks.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True
    from data.masks import add_masks_command
    add_masks_command(sub)
