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
    listing.add_argument(
        "name", nargs="?", metavar="NAME",
        help="with `methods`: one method's parameters (type, default, source of the default, grid behaviour)",
    )
    listing.set_defaults(handler=cmd_list)
    add_harness_commands(commands)


def _type_name(annotation) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + "|".join(map(str, typing.get_args(annotation)))
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


GRID_LEGEND = (
    "grid: axis = a list of values makes one cell (one training) per value; "
    "gen-axis = the same, but generation-only: the cells share one training; "
    "checkpoints = a list is ONE training that saves more checkpoints (a list of lists is a grid axis); "
    "list = the value itself is a list (a list of lists is a grid axis)"
)


def _param_kind(f, annotation) -> str:
    """How a list given to this parameter is read (see GRID_LEGEND)."""
    from methods.base import _is_sequence_type, is_generation_param

    if f.name == "checkpoint_steps":
        return "checkpoints"
    if _is_sequence_type(annotation):
        return "list"
    return "gen-axis" if is_generation_param(f) else "axis"


def describe_method(name: str) -> str:
    """Every parameter of method ``name``: type, default, where the default comes from, grid use."""
    import dataclasses
    import textwrap
    import typing

    from benchmark.errors import ConfigError
    from methods.registry import UnknownMethodError, get_method

    try:
        cls = get_method(name)
    except UnknownMethodError as error:
        raise ConfigError(str(error).strip("'\"")) from None
    hints = typing.get_type_hints(cls.Params)
    defaults = cls.Params()
    rows = [("parameter", "type", "default", "grid", "source of the default")]
    docs = {}
    for f in dataclasses.fields(cls.Params):
        value = getattr(defaults, f.name)
        shown = list(value) if isinstance(value, tuple) else value
        rows.append((f.name, _type_name(hints[f.name]), repr(shown) if isinstance(shown, str) else str(shown),
                     _param_kind(f, hints[f.name]), f.metadata.get("source") or "not recorded"))
        docs[f.name] = f.metadata.get("doc", "")
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{cls.name} (version {getattr(cls, 'version', '?')}): {cls.description}", ""]
    for row in rows:
        lines.append("  ".join(f"{cell:{widths[i]}}" for i, cell in enumerate(row[:4])) + "  " + row[4])
        if docs.get(row[0]):
            lines.append(f"{'':{widths[0]}}  ({docs[row[0]]})")
    lines += ["", *textwrap.wrap(GRID_LEGEND, 100),
              f"set one with methods.{cls.name}.PARAM=VALUE, e.g. methods.{cls.name}.{rows[1][0]}=[a,b] for a grid"]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    if args.name and args.what != "methods":
        from benchmark.errors import ConfigError

        raise ConfigError(f"`list {args.what} {args.name}`: a NAME is only taken by `list methods NAME`")
    if args.what == "methods" and args.name:
        print(describe_method(args.name))
        return 0
    if args.what == "methods":
        from methods.registry import available_methods, get_method

        for name in available_methods():
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


# ----------------------------------------------------------------------------- run / score / status

RUN_EPILOG = """\
overrides (key=value, dotted, YAML values):
  methods=dummy,dreambooth           keep / add these methods only
  methods.dreambooth.steps=400       set a method parameter (`subjectbench list methods dreambooth`)
  methods.dreambooth.learning_rate=[1e-6,5e-6]   a list of values is a grid axis (one training each)
  methods.dreambooth.checkpoint_steps=[200,400]  ...except checkpoint_steps: one training, more checkpoints
  subjects=dog,teapot                only these subjects
  protocol.images_per_prompt=2  protocol.prompts=[0,1,2]  protocol.sampler.steps=25
  backbone=sd15  device=cuda  dtype=bfloat16  metrics.weights=random  generation.batch_size=4

examples:
  subjectbench run                                    # embedded default, CPU, offline
  subjectbench run default methods=dummy --out runs/r1
  subjectbench run dreambooth --out runs/db --gpus 8
  subjectbench run dreambooth --out /shared/runs/db --executor ray --address auto
"""


def _split_suite(suite: str | None, overrides: list[str]) -> tuple[str, list[str]]:
    if suite and "=" in suite:
        return "default", [suite, *overrides]
    return suite or "default", list(overrides)


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4") from None
    return index, count


def add_harness_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="train/encode, generate and score a suite (resumable)",
        description=(
            "Run a suite: prepare every method on every subject, generate the protocol's images, "
            "score them, and build the report. Rerunning the same command resumes: finished work "
            "is skipped, interrupted work is redone."
        ),
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("suite", nargs="?", default=None, help="suite name (`subjectbench list suites`) or YAML path; default: default")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    run.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<suite>)")
    run.add_argument("--dataset-dir", metavar="DIR", help="local DreamBooth copy or custom dataset folder")
    run.add_argument("--executor", choices=["inprocess", "local", "ray"], default="inprocess")
    run.add_argument("--gpus", type=int, metavar="N", help="one worker process per local GPU (0..N-1)")
    run.add_argument(
        "--workers-per-gpu", type=int, default=1, metavar="K",
        help="worker processes (or Ray tasks) sharing each GPU (default 1; more fills a large GPU)",
    )
    run.add_argument(
        "--mps", action="store_true",
        help="with --gpus N --workers-per-gpu K: start a CUDA MPS daemon for this run, so the K workers on a GPU "
        "run their kernels side by side instead of taking turns (four compiled DreamBooth trainings on one H200: "
        "30.8 s per 1000 steps each, amortized; benchmarks/results)",
    )
    run.add_argument("--workers", type=int, metavar="N", help="CPU worker processes (local executor) or Ray CPUs")
    run.add_argument("--address", help="Ray cluster address (with --executor ray; default: start a local one)")
    run.add_argument("--shard", type=_shard, metavar="I/N", help="run only shard I of N of the work groups")
    run.add_argument("--force", action="store_true", help="redo everything, ignoring finished work")
    run.add_argument("--retry-failed", action="store_true", help="redo units recorded as failed")
    run.add_argument("--no-score", action="store_true", help="generate only; score later with `subjectbench score`")
    run.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    run.add_argument("--quiet", action="store_true", help="no progress bars; errors only")
    run.add_argument(
        "--deterministic", action="store_true",
        help="deterministic GPU kernels: two runs of one config on the same GPU and software give "
        "bit-identical states and images (slower; same as the config key deterministic=true)",
    )
    run.set_defaults(handler=cmd_run)

    score = commands.add_parser(
        "score",
        help="score the images of a run (only missing or changed metrics are computed)",
        description="Score a run's existing images without regenerating them.",
        epilog="example: subjectbench score runs/default metrics.clip=ViT-L-14",
    )
    score.add_argument("run_dir", metavar="RUN_DIR")
    score.add_argument("overrides", nargs="*", metavar="metrics.key=value", help="metric settings to change")
    score.add_argument("--force", action="store_true", help="recompute every score")
    score.add_argument("--quiet", action="store_true")
    score.set_defaults(handler=cmd_score)

    status = commands.add_parser(
        "status",
        help="done / failed / pending per method and stage",
        description="Show what a run has done, what failed (first line of each error) and what is pending.",
    )
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.set_defaults(handler=cmd_status)


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmark.config import load_config
    from benchmark.driver import run_benchmark
    from benchmark.executors import check_mps

    executor = "local" if (args.gpus or (args.workers and args.executor == "inprocess")) and args.executor != "ray" else args.executor
    check_mps(executor, args.gpus, args.workers_per_gpu, args.mps)  # before anything is built or written
    suite, overrides = _split_suite(args.suite, args.overrides)
    if args.dataset_dir:
        overrides.append(f"dataset.path={args.dataset_dir}")
    if getattr(args, "deterministic", False):
        overrides.append("deterministic=true")
    config = load_config(suite, overrides)
    run_dir = Path(args.out or Path("runs") / config.name)
    summary = run_benchmark(
        config, run_dir, executor=executor, gpus=args.gpus, workers=args.workers, address=args.address,
        workers_per_gpu=args.workers_per_gpu, mps=args.mps, force=args.force, retry_failed=args.retry_failed, quiet=args.quiet,
        score=not args.no_score, shard_spec=args.shard,
    )
    for line in summary.lines():
        print(line)
    print(f"results: {summary.run_dir}")
    if not config.metrics.names:
        print(
            "nothing was scored: metrics.names is empty, so there are no numbers and no report; score these "
            f"images with `subjectbench score {summary.run_dir} metrics.names=[clip_t,clip_i,dino,div,pres]`"
        )
    elif not args.no_report and not args.no_score:
        report = _build_report(summary.run_dir)
        if report:
            print(f"report:  {report}")
    return summary.exit_code


def _build_report(run_dir):
    """Build the report; a report failure is logged and never hides the run's own results."""
    import logging

    from reports.build import build_report

    try:
        return build_report(run_dir)
    except Exception as error:  # noqa: BLE001 - the run itself succeeded; say how to retry
        logging.getLogger("subjectbench").exception("report failed")
        print(f"report failed ({type(error).__name__}: {error}); rebuild it with `subjectbench report {run_dir}`")
        return None


def cmd_score(args: argparse.Namespace) -> int:
    from benchmark import environment
    from benchmark.config import apply_overrides, config_from_dict
    from benchmark.driver import run_lock
    from benchmark.errors import ConfigError
    from benchmark.progress import StageProgress, setup_logging
    from benchmark.results import load_plan, load_subject_table
    from benchmark.scoring import score_run
    from benchmark.store import Store
    from metrics.registry import get_metric_class

    store = Store(args.run_dir)
    document = store.load_config_dict()
    for item in args.overrides:
        if not item.startswith("metrics."):
            raise ConfigError(f"score override {item!r}: only metrics.* settings can change when scoring")
    config = config_from_dict(apply_overrides(document, args.overrides, "saved config"))
    if not config.metrics.names:
        raise ConfigError(
            f"{store.root}: metrics.names is empty, nothing to score; name the metrics, e.g. "
            f"`subjectbench score {store.root} metrics.names=[clip_t,clip_i,dino,div,pres]`"
        )
    with run_lock(store):
        setup_logging(store.log_path, args.quiet)
        plan = load_plan(store)
        device = environment.resolve_device(config.device)
        roles = [get_metric_class(name).role for name in config.metrics.names]
        progress = StageProgress({"score": sum(roles.count(role) for role in plan["role"])}, quiet=args.quiet)
        try:
            computed, failures = score_run(store, plan, load_subject_table(store), config.metrics, device, progress, force=args.force)
        finally:
            progress.close()
    print(f"{computed} scores computed ({', '.join(config.metrics.names)}); {len(failures)} failures")
    for failure in failures:
        print(f"  FAILED {failure['metric']} on {failure['subject']}: {failure['message']}")
    return 1 if failures else 0


def cmd_status(args: argparse.Namespace) -> int:
    from benchmark.status import run_status

    text, code = run_status(args.run_dir)
    print(text)
    return code
