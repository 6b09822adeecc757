"""The ``subjectbench`` command line (also ``python -m benchmark``).

Each area owns its sub-commands: ``data/cli.py`` (data download|verify|masks),
``benchmark/commands.py`` (run, score, status, list), ``benchmark/pretrain.py`` (pretrain),
``reports/cli.py`` (report, compare).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from benchmark import __version__
from data.common import UserError  # noqa: F401 - also importable from here, as before

EPILOG = """\
examples:
  subjectbench run                          # embedded default: offline, CPU, about a minute
  subjectbench run dreambooth --out runs/db # the paper protocol (GPU, hub weights)
  subjectbench list methods
  subjectbench data download                # the DreamBooth dataset, to the default location
  subjectbench data verify
  subjectbench pretrain tuning-encoder --images mini --backbone tiny --out tuning_encoder.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subjectbench",
        description=(
            "Benchmark subject-driven personalization of text-to-image diffusion models: train "
            "or encode each method on each subject, generate the protocol's prompts, score "
            "CLIP-T / CLIP-I / DINO / DIV / PRES, and report."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"subjectbench {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    from benchmark import commands as harness_commands
    from benchmark import edit as edit_commands
    from benchmark import pretrain as pretrain_commands
    from data import cli as data_cli
    from reports import cli as reports_cli

    harness_commands.add_commands(commands)
    edit_commands.add_commands(commands)
    pretrain_commands.add_commands(commands)  # subjectbench pretrain tuning-encoder
    data_cli.add_commands(commands)
    reports_cli.add_commands(commands)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's preemption or time limit, ``docker
    stop``): the run stops as on Ctrl-C — workers stopped, the stage clock and the invocation's
    run time recorded, finished work kept for the rerun — instead of dying where it stands with
    its worker processes left training on the GPU."""


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c(fired: list):
    """SIGTERM raises ``Terminated`` in the main thread once; a second one, while the run is
    stopping, is ignored (SIGKILL still ends it at once). ``fired`` gets the signal number: a
    library may turn the exception into a plain KeyboardInterrupt on its way up (Ray's ``wait``
    does), and the caller still knows it was SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (`run --quiet methods=dummy`); argparse stops
    # collecting positionals at the first option, so gather the rest here.
    args, extras = parser.parse_known_args(argv)
    if extras:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
            args.overrides = [*args.overrides, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    sigterm: list = []
    try:
        with _sigterm_stops_like_ctrl_c(sigterm):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if sigterm:  # whatever the exception became on its way up
            print("terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
            return 143
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except UserError as error:  # every package's user-facing errors: the message is the whole story
        print(f"error: {error}", file=sys.stderr)
        return 2
