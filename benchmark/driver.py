"""One invocation of ``subjectbench run``: plan, execute, score, summarize.

config -> ``units.expand`` -> executor(``runner.execute_group``) -> ``store`` -> ``scoring`` ->
reports. Rerunning the same command resumes: finished work is skipped, half-done work redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmark import environment
from benchmark.config import RunConfig
from benchmark.executors import make_executor
from benchmark.hashing import stable_hash
from benchmark.progress import StageProgress, setup_logging
from benchmark.results import load_subject_table, save_plan
from benchmark.runner import JobSpec
from benchmark.scoring import score_run, scoring_workload
from benchmark.store import Store, file_lock
from benchmark.units import expand, method_context, resolve_finetune_compile, shard
from data.common import UserError, available_cores
from data.subjects import cache_root
from methods.registry import get_method

log = logging.getLogger("subjectbench")


class RunLockedError(UserError, RuntimeError):
    pass


@dataclass
class RunSummary:
    run_dir: Path
    planned: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    scored: int = 0
    seconds: float = 0.0
    # wall seconds per stage: "plan" (config, expansion, checks), "execute" (trainings and
    # images), "score"; logged as one "stage seconds:" line in run.log, also by a run that stops
    # early (Ctrl-C, an error): the stage it stopped in as far as it got, "(stopped in STAGE)"
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        out = [
            f"images: {self.done} generated, {self.skipped} already done or skipped, "
            f"{len([f for f in self.failed if f['stage'] != 'score'])} unit failures; "
            f"{self.scored} scores computed; {self.seconds:.1f} s"
        ]
        for failure in self.failed:
            where = failure.get("subject", "?")
            if failure.get("stage") == "score":
                where = f"metric {failure.get('metric')} on {where}"
            else:
                where = f"{failure.get('cell_id')} on {where}"
            out.append(f"  FAILED [{failure['stage']}/{failure['kind']}] {where}: {failure['message']}")
        if self.failed:
            out.append(f"  tracebacks: {self.run_dir}/failures/; rerun with --retry-failed to redo them")
        return out


def _record_invocation(store: Store, record: dict) -> None:
    """The invocation's line in ``invocations.jsonl``; a disk that refuses it loses only that line
    (logged), never the error the run may be stopping with."""
    try:
        store.record_invocation(record)
    except OSError as error:
        log.warning("could not record this invocation's run time in %s (%s)", store.invocations_path, error)


def _images_written_since(store: Store, epoch: float) -> int | None:
    try:
        return store.images_written_since(epoch)
    except OSError:
        return None


def resolved_config(config: RunConfig) -> dict:
    """The config with every method parameter present (defaults filled in), as saved with runs."""
    document = config.to_dict()
    for entry, raw in zip(document["methods"], config.methods):
        cls = get_method(raw.name)
        defaults = {
            f.name: (list(getattr(cls.Params(), f.name)) if isinstance(getattr(cls.Params(), f.name), tuple) else getattr(cls.Params(), f.name))
            for f in dataclasses.fields(cls.Params)
        }
        entry["params"] = {**defaults, **raw.params}
    return document


@contextmanager
def run_lock(store: Store):
    store.ensure()
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(store.root / ".lock", blocking=False))
        except BlockingIOError:
            raise RunLockedError(
                f"another subjectbench process is using {store.root}; wait for it or use another --out"
            ) from None
        yield


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix[:-1]}[{i}].").items()}
    return {prefix[:-1]: value}


def config_changes(store: Store, resolved: dict) -> list[str]:
    """The keys in which ``resolved`` differs from the config this run directory last ran with."""
    path = store.root / "config.yaml"
    if not path.is_file():
        return []
    import yaml

    old, new = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {}), _flatten(resolved)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def check_before_running(store: Store, context, groups, force: bool) -> None:
    """What would fail every unit alike fails once, here, before any unit runs: a backbone whose
    weights are missing and subject images that cannot be decoded (as `data verify` finds them)."""
    from data.subjects import check_subject_images
    from methods.backbones import check_backbone_available

    pending = [g for g in groups if force or not all(store.image_done(u.label, u.subject_id, u.key) for u in g.images)]
    if not pending:
        return
    check_backbone_available(context.backbone)
    checked: set[str] = set()
    for group in pending:
        subject = group.prepare.subject
        if subject.id not in checked:
            checked.add(subject.id)
            check_subject_images(subject)


def failures_in_scope(store: Store, plan_keys: set[str]) -> list[dict]:
    return [f for key, f in store.failures().items() if key in plan_keys or f.get("stage") == "score"]


def run_benchmark(
    config: RunConfig,
    run_dir: str | Path,
    executor: str = "inprocess",
    gpus: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    workers_per_gpu: int = 1,
    mps: bool = False,
    force: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
    score: bool = True,
    shard_spec: tuple[int, int] | None = None,
) -> RunSummary:
    started, started_epoch = time.perf_counter(), time.time()
    started_utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    store = Store(run_dir)
    summary = RunSummary(run_dir=store.root)
    with run_lock(store):
        setup_logging(store.log_path, quiet)
        removed = store.clean_temporaries()
        if removed:
            log.info("removed %d half-written files left by an interrupted run", removed)
        killed = store.settle_killed_invocations()
        if killed:
            log.info("recorded the run time of %d earlier invocation(s) killed outright (from their last "
                     "heartbeat: %s)", killed, store.live_path)
        environment.apply_determinism(config.deterministic)
        device = environment.resolve_device(config.device)
        dtype = environment.resolve_dtype(config.dtype, device)
        threads = environment.configure_cpu_threads(1)  # workers of other executors size their own
        log.info("cpu: %d core(s) available, torch uses %d thread(s) here", available_cores(), threads)
        context = method_context(config, device, dtype, cache_dir=cache_root())
        plan = expand(config, context)
        resolved = resolved_config(config)
        changed = config_changes(store, resolved)
        if changed:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            log.warning(
                "%s last ran with a different config (changed: %s); its earlier results stay in the store, "
                "but status and the report now follow this config (every config it ran is kept in %s); "
                "use another --out to keep the runs apart",
                store.root, shown, store.root / "configs",
            )
        store.save_config(resolved)
        plan_table = save_plan(store, plan)
        groups = plan.groups if shard_spec is None else shard(plan.groups, *shard_spec)
        summary.planned = sum(len(g.images) for g in groups)
        check_before_running(store, context, groups, force)
        log.info(
            "run %s: %d groups, %d images, device %s (%s), executor %s",
            config.name, len(groups), summary.planned, device, dtype, executor,
        )
        runner_pool = make_executor(
            executor, gpus=gpus, workers=workers, address=address, workers_per_gpu=workers_per_gpu, mps=mps
        )
        context, finetune_note = resolve_finetune_compile(
            config, context, groups, runner_pool.devices,
            trained=lambda group: not force and store.state_done(
                group.prepare.trainer, group.prepare.subject.id, group.prepare.key),
        )
        log.info("%s", finetune_note)
        job = JobSpec(
            run_dir=str(store.root),
            context=context,
            batch_size=config.generation.batch_size,
            force=force,
            retry_failed=retry_failed,
            subjects_per_batch=config.training.subjects_per_batch,
            resume_every=config.training.resume_every,
        )
        totals = {"prepare": len(groups), "generate": summary.planned}
        if score and config.metrics.names:
            totals["score"] = scoring_workload(groups, config.metrics.names)
        progress = StageProgress(totals, quiet=quiet)
        stage_started = time.perf_counter()
        summary.stage_seconds["plan"] = stage_started - started
        stopped_in = "execute"
        invocation = {
            "started": started_utc,
            "config": stable_hash(resolved, 8),  # its file in configs/<time>-<hash>.yaml
            "device": str(device), "device_name": environment.device_name(str(device)), "executor": executor,
            # the GPUs this invocation's workers shared (None: the executor does not know, e.g. Ray)
            "gpus": runner_pool.devices if str(device).startswith("cuda") else 0,
            "workers_per_gpu": workers_per_gpu, "mps": mps, "shard": list(shard_spec) if shard_spec else None,
        }

        def clock() -> dict:  # the stage clock so far, for the heartbeat of a process that may be killed
            now = time.perf_counter()
            stages = {**summary.stage_seconds, **({stopped_in: now - stage_started} if stopped_in else {})}
            return {"seconds": round(now - started, 2), "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
                    "stopped_in": stopped_in, "images_generated": None}
        # the heartbeat stops, and its file goes, once the invocation's line is written
        with store.live_invocation(invocation, clock):
            try:
                results = runner_pool.run(groups, job, progress)
                for result in results:
                    summary.done += result.done
                    summary.skipped += result.skipped
                with contextlib.suppress(OSError):  # every training published: no resume space is left
                    (store.root / "resume").rmdir()
                summary.stage_seconds["execute"] = time.perf_counter() - stage_started
                stage_started, stopped_in = time.perf_counter(), "score"
                if score and config.metrics.names:
                    summary.scored, _ = score_run(
                        store, plan_table, load_subject_table(store), config.metrics, device, progress, force=force
                    )
                    summary.stage_seconds["score"] = time.perf_counter() - stage_started
                stopped_in = None
            finally:
                progress.close()
                if stopped_in:  # interrupted (Ctrl-C) or failed: the stage it stopped in, as far as it got
                    summary.stage_seconds[stopped_in] = time.perf_counter() - stage_started
                stages = {k: round(v, 2) for k, v in summary.stage_seconds.items()}
                log.info("stage seconds: %s%s", json.dumps(stages), f" (stopped in {stopped_in})" if stopped_in else "")
                # stopped early, the executor's tally never came back: count the images on disk instead
                made = summary.done if stopped_in is None else _images_written_since(store, started_epoch)
                _record_invocation(store, {
                    **invocation, "seconds": round(time.perf_counter() - started, 2),
                    "stage_seconds": stages, "stopped_in": stopped_in, "images_generated": made,
                })
        keys = {g.prepare.key for g in groups} | {u.key for g in groups for u in g.images}
        summary.failed = failures_in_scope(store, keys)
    summary.seconds = time.perf_counter() - started
    log.info("finished: %s", summary.lines()[0])
    return summary
