"""Harness sub-commands: run, score, status, list."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    listing = commands.add_parser(
        "list",
        help="list methods, metrics, backbones or suites",
        description="List what can be named in a suite or on the command line.",
    )
    listing.add_argument("what", choices=["methods", "metrics", "backbones", "suites"])
    listing.set_defaults(handler=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from methods.registry import available_methods, get_method

        for name, target in available_methods().items():
            try:
                description = get_method(name).description
            except Exception as error:  # noqa: BLE001 - a broken plug-in must not hide the others
                description = f"(cannot be loaded: {error})"
            print(f"{name:22s} {description}")
    elif args.what == "metrics":
        from metrics.registry import available_metrics, get_metric_class

        for name in available_metrics():
            try:
                cls = get_metric_class(name)
                arrow = "higher is better" if cls.higher_is_better else "lower is better"
                print(f"{name:10s} {cls.description} ({arrow})")
            except Exception as error:  # noqa: BLE001
                print(f"{name:10s} (cannot be loaded: {error})")
    elif args.what == "backbones":
        from methods.backbones import describe_backbones

        for row in describe_backbones():
            print(
                f"{row['name']:12s} {row['source']:6s} {row['location']}"
                f"{'@' + row['revision'] if row['revision'] != '-' else ''} ({row['resolution']} px)"
            )
        print("or a path to a local diffusers Stable Diffusion 1.x/2.x folder")
    else:
        from benchmark.config import available_suites

        for name, description in available_suites().items():
            print(f"{name:12s} {description}")
    return 0
