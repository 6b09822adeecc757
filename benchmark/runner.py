"""Runs one work group — one training of one subject — inside whichever worker holds it.

Prepare once (unless its state is already published), then for each method cell that shares the
training: reload the state from disk and generate the cell's missing images in batches (one
checkpoint and sampler setting per batch). ``execute_pass`` runs several groups whose method
trains subjects together (``Method.prepare_many``): one joint training publishes each subject's
state exactly where and as ``prepare`` would, then every group goes on as above. Every failure is recorded with its traceback and the
rest of the group goes on; CUDA out-of-memory frees memory and is recorded as ``oom``.

Images are written by a small thread pool (``ImageWriter``) while the next batch generates: PNG
encoding costs 10–110 ms per 512-px image on one core (zlib, which releases the GIL), a third of
the per-image time of a fast GPU if done in line. The write order per image is unchanged (PNG,
then its record), the group waits for its writes before it returns, and a write that fails is
recorded as that image's failure (a full or read-only disk still stops the run).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from benchmark import environment
from benchmark.hashing import stable_hash
from benchmark.store import Store, disk_error
from benchmark.units import ImageUnit, WorkGroup, unit_spec
from methods.base import MethodContext
from methods.sampling import set_compile_cache
from methods.training import resume_points

log = logging.getLogger("subjectbench")
Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class JobSpec:
    """What every worker needs besides its group; picklable for processes and Ray."""

    run_dir: str
    context: MethodContext
    batch_size: int
    force: bool = False
    retry_failed: bool = False
    write_threads: int = 4  # 0 writes each image in line (the reference path of the benchmark)
    subjects_per_batch: int = 1  # trainings per pass where the method can (config training.*)
    resume_every: float = 0.0  # seconds between a training's resume points (training.resume_every); 0: none


@dataclass
class GroupResult:
    group: str
    done: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    prepared: bool = False


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _failure(stage: str, unit_key: str, group: WorkGroup, error: BaseException, **extra) -> dict:
    kind = "oom" if _is_oom(error) else "error"
    if kind == "oom":
        environment.free_cuda_memory()
    return {
        "key": unit_key,
        "stage": stage,
        "kind": kind,
        "label": group.prepare.cell.label,
        "cell_id": group.prepare.cell.cell_id,
        "subject": group.prepare.subject.id,
        "message": f"{type(error).__name__}: {error}".splitlines()[0],
        "traceback": "".join(traceback.format_exception(error)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }


def _pending(store: Store, job: JobSpec, units: tuple[ImageUnit, ...]) -> tuple[list[ImageUnit], int]:
    pending, skipped = [], 0
    for unit in units:
        if not job.force and store.image_done(unit.label, unit.subject_id, unit.key):
            store.clear_failure(unit.key)  # a finished image never carries a failure (older runs left some)
            skipped += 1
        elif not job.retry_failed and not job.force and store.failure(unit.key):
            skipped += 1  # reported as failed by status/summary; --retry-failed redoes it
        else:
            pending.append(unit)
    return pending, skipped


def _record(unit: ImageUnit, group: WorkGroup, job: JobSpec, seconds: float, memory: dict, compiled: bool) -> dict:
    """The manifest row of one finished image: its full spec and where/how it was made."""
    return {
        **unit_spec(group, unit),
        "fingerprint": group.cell(unit.method_cell_id or unit.cell_id).fingerprint,
        "sampler": dict(unit.sampler.__dict__),
        "resolution": job.context.resolution,
        "backbone": job.context.backbone.fingerprint(),
        "dtype": job.context.dtype,
        "compile": compiled,  # sampled through the compiled UNet: generation.compile resolved and the method uses it
        "device": environment.device_name(job.context.device),
        "seconds": seconds,
        **memory,
        "git": environment.git_hash(),
        "packages": environment.package_versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


class ImageWriter:
    """Writes finished images in background threads, at most ``4 × threads`` in flight.

    ``submit`` returns at once; ``drain`` waits for every write, turns a failed write into that
    image's failure record (``stage: write``) and re-raises a disk error as the fatal one-line
    error. With ``threads == 0`` each write happens inside ``submit`` (same results, in line).
    """

    def __init__(self, store: Store, group: WorkGroup, result: GroupResult, threads: int):
        self.store, self.group, self.result = store, group, result
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="png") if threads > 0 else None
        self.limit = 4 * max(threads, 1)
        self.pending: deque[tuple[Future, ImageUnit]] = deque()

    def submit(self, unit: ImageUnit, image, record: dict) -> None:
        write = self.store.write_image
        if self.pool is None:
            write(unit.label, unit.subject_id, unit.key, image, record)
            self.result.done += 1
            return
        self.pending.append((self.pool.submit(write, unit.label, unit.subject_id, unit.key, image, record), unit))
        while len(self.pending) > self.limit:
            self._settle(*self.pending.popleft())

    def _settle(self, future: Future, unit: ImageUnit) -> None:
        error = future.exception()
        if error is None:
            self.result.done += 1
            return
        if disk_error(error) is not None:
            raise error  # the callers turn it into the one-line fatal error
        failure = _failure("write", unit.key, self.group, error, prompt=unit.prompt_text)
        self.store.record_failure(unit.key, failure)
        log.error("writing %s failed: %s", unit.key, failure["message"])
        self.result.failed.append(failure)

    def close(self) -> None:
        """Finish the writes already queued without settling them (the run is failing anyway)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def drain(self) -> None:
        try:
            while self.pending:
                self._settle(*self.pending.popleft())
        except OSError as error:
            if (fatal := disk_error(error)) is not None:
                raise fatal from None
            raise
        finally:
            self.close()


def _training_decision(store: Store, job: JobSpec, group: WorkGroup, pending: list, prepared_here: bool = False) -> str:
    """What ``execute_group`` does about a group's training — the one place these rules live:
    ``"none"`` (no image pending), ``"skip"`` (an earlier failure stands: no ``--force`` or
    ``--retry-failed``; a dead worker's group stays failed even with its state published),
    ``"reuse"`` (a published state, not forced) or ``"train"``."""
    prepare = group.prepare
    if not pending:
        return "none"
    state_ready = prepared_here or (store.state_done(prepare.trainer, prepare.subject.id, prepare.key) and not job.force)
    failure = store.failure(prepare.key)
    if failure and not job.force and not job.retry_failed and (not state_ready or failure.get("stage") == "worker"):
        return "skip"
    return "reuse" if state_ready else "train"


def _needs_training(store: Store, job: JobSpec, group: WorkGroup) -> bool:
    """Whether ``execute_group`` would prepare this group now (for joint passes)."""
    return _training_decision(store, job, group, _pending(store, job, group.images)[0]) == "train"


def _state_info(group: WorkGroup, job: JobSpec, seconds: float, **extra) -> dict:
    """What DONE records about a training: cost, device, fingerprint and provenance."""
    prepare = group.prepare
    return {
        "seconds": seconds,
        **environment.peak_memory_mb(job.context.device),
        "device": environment.device_name(job.context.device),
        "fingerprint": prepare.cell.training_fingerprint,
        "cells": [c.cell_id for c in group.cells],
        "subject": prepare.subject.id,
        "data_sha": prepare.subject.data_sha,
        "seed": prepare.seed,
        "compile_training": job.context.compile_training,
        # fine-tunes through torch.compile (training.compile=true, or auto over enough steps per GPU)
        "compile_finetune": job.context.compile_finetune and prepare.cell.trainer_class.compiles_finetune,
        "cuda_graphs": job.context.graph_finetune and prepare.cell.trainer_class.compiles_finetune,
        **extra,
        "git": environment.git_hash(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def execute_pass(groups: list[WorkGroup], job: JobSpec, progress: Progress | None = None) -> list[GroupResult]:
    """Run groups that share one training pass (``units.training_passes``); never raises for a
    unit's failure.

    The subjects that need a state train together and each state is published as its own
    ``prepare`` would publish it (DONE adds ``subjects_in_pass`` and the pass's seconds; its
    ``seconds`` is the subject's share). Killed mid-pass, nothing is published and the rerun
    trains the same pass again. If the joint training runs out of GPU memory, nothing of it is
    published and it is retried as two passes of half the size (down to subjects alone); any other
    failure of a pass has each group prepare alone, so a failure is recorded against its own
    subject only.
    """
    prepared = _prepare_together(groups, job) if len(groups) > 1 else set()
    return [execute_group(g, job, progress, prepared_here=g.prepare.key in prepared) for g in groups]


class _Training:
    """The working folders of one training (one subject's, or a pass's) until its states are
    published. With ``job.resume_every`` they live in the run's resume space (``Store.resume_space``)
    and ``resume_points()`` makes the method's training loops save resume points there, so an
    interrupted run resumes them (``methods.training``); otherwise they are fresh temporary folders
    (what a killed process leaves is cleaned up at the next start)."""

    def __init__(self, store: Store, job: JobSpec, name: str, prepares: list) -> None:
        self.store, self.job, self.keys = store, job, [p.key for p in prepares]
        self.points = None  # the ResumePoints of the block, once entered
        # --force redoes a training from step 0 even where an interrupted run left a point
        self.space = store.resume_space(name, self.keys, fresh=job.force) if job.resume_every > 0 else None
        if self.space is None:
            self.workdirs = [store.new_state_workdir(p.trainer, p.subject.id, p.key) for p in prepares]
        else:
            self.workdirs = [store.resume_workdir(self.space, p.subject.id, p.key) for p in prepares]

    @contextlib.contextmanager
    def resume_points(self):
        if self.space is None:
            yield
            return
        with resume_points(self.space / "points", every_seconds=self.job.resume_every) as points:
            self.points = points
            yield

    def info(self) -> dict:
        """For DONE: the loops that resumed after an interruption, with the training seconds spent
        before it (DONE's ``seconds`` is this run's share alone)."""
        restored = self.points.restored if self.points is not None else []
        return {"resumed": restored} if restored else {}

    def discard(self) -> None:
        for path in [self.space] if self.space is not None else self.workdirs:
            shutil.rmtree(path, ignore_errors=True)

    def published(self) -> None:
        if self.space is not None:
            self.store.discard_resume(self.keys)


def _prepare_together(groups: list[WorkGroup], job: JobSpec) -> set[str]:
    """Train the groups that need a state in one ``prepare_many``; the keys it published."""
    store = Store(job.run_dir)
    return _train_pass([g for g in groups if _needs_training(store, job, g)], job, store)


def _train_pass(todo: list[WorkGroup], job: JobSpec, store: Store) -> set[str]:
    """``prepare_many`` of ``todo`` (two or more) and publish each state; the keys published.
    Out of GPU memory, the pass is split in two and each half retried (a GPU smaller than the
    one ``training.subjects_per_batch`` was chosen for still runs the largest passes it holds)."""
    if len(todo) < 2:
        return set()
    environment.apply_determinism(job.context.deterministic)
    method = todo[0].prepare.cell.build(job.context)
    subjects = [g.prepare.subject for g in todo]
    names = ", ".join(s.id for s in subjects)
    log.info("prepare %s on %d subjects in one pass (%s)", todo[0].prepare.cell.cell_id, len(todo), names)
    training, out_of_memory = None, ""
    try:
        environment.reset_peak_memory(job.context.device)
        training = _Training(store, job, "pass-" + stable_hash(sorted(g.prepare.key for g in todo), 16),
                             [g.prepare for g in todo])
        workdirs = training.workdirs
        started = time.perf_counter()
        with training.resume_points():
            method.prepare_many(subjects, workdirs, [g.prepare.seed for g in todo])
        seconds = time.perf_counter() - started
    except Exception as error:  # noqa: BLE001 - smaller passes, or each subject alone
        if (fatal := disk_error(error)) is not None:
            raise fatal from None
        if training is not None:
            training.discard()  # trained again as smaller passes or alone, each with its own folders
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        if not _is_oom(error):
            log.warning("training %d subjects in one pass failed (%s); training each alone", len(todo), message)
            return set()
        out_of_memory = message  # retried below, once this handler has let go of the failed frames' tensors
    finally:
        method.release()
    if out_of_memory:
        environment.free_cuda_memory()
        half = (len(todo) + 1) // 2
        log.warning(
            "training %d subjects in one pass ran out of GPU memory (%s); retrying as passes of %d and %d "
            "(training.subjects_per_batch=%d or lower starts there)",
            len(todo), out_of_memory, half, len(todo) - half, half,
        )
        return _train_pass(todo[:half], job, store) | _train_pass(todo[half:], job, store)
    for group, workdir in zip(todo, training.workdirs):
        prepare = group.prepare
        info = _state_info(group, job, seconds / len(todo), subjects_in_pass=len(todo), pass_seconds=seconds,
                           **training.info())
        store.publish_state(workdir, prepare.trainer, prepare.subject.id, prepare.key, info)
        store.clear_failure(prepare.key)
    training.published()
    return {g.prepare.key for g in todo}


def execute_group(
    group: WorkGroup, job: JobSpec, progress: Progress | None = None, prepared_here: bool = False
) -> GroupResult:
    """Run one group to completion; never raises for a unit's failure. ``prepared_here``: its
    state was just published by a joint pass (``execute_pass``), even under ``--force``."""
    progress = progress or (lambda stage, n: None)
    environment.apply_determinism(job.context.deterministic)  # workers are fresh processes
    if job.context.compile_unet or job.context.compile_training or job.context.compile_finetune:
        set_compile_cache(job.context.cache_dir)
    store = Store(job.run_dir)
    prepare = group.prepare
    cell, subject = prepare.cell, prepare.subject
    result = GroupResult(group=f"{cell.cell_id}/{subject.id}")
    pending, result.skipped = _pending(store, job, group.images)
    if result.skipped:
        progress("generate", result.skipped)
    trainer = prepare.trainer
    result.prepared = prepared_here
    decision = _training_decision(store, job, group, pending, prepared_here)
    state_ready = decision == "reuse"
    # A failure under the prepare key is the training's, or (stage "worker") the whole group's
    # after its worker died; a finished group carries none.
    group_failure = store.failure(prepare.key)
    if decision == "none":
        if group_failure:
            store.clear_failure(prepare.key)
        progress("prepare", 1)
        return result
    if decision == "skip":
        result.skipped += len(pending)
        progress("prepare", 1)
        progress("generate", len(pending))
        return result
    if group_failure and state_ready:
        store.clear_failure(prepare.key)  # redone now; recorded again if it fails again

    method = cell.build(job.context)
    try:
        if not state_ready:
            log.info("prepare %s on %s (key %s)", cell.cell_id, subject.id, prepare.key)
            environment.reset_peak_memory(job.context.device)
            training = _Training(store, job, prepare.key, [prepare])
            started = time.perf_counter()
            with training.resume_points():
                method.prepare(subject, training.workdirs[0], prepare.seed)
            info = _state_info(group, job, time.perf_counter() - started, **training.info())
            store.publish_state(training.workdirs[0], trainer, subject.id, prepare.key, info)
            training.published()
            store.clear_failure(prepare.key)
            result.prepared = True
        state_dir = store.state_dir(trainer, subject.id, prepare.key)
    except Exception as error:  # noqa: BLE001 - isolate the failure, the run goes on
        if (fatal := disk_error(error)) is not None:
            raise fatal from None  # a full or read-only disk fails every unit alike: stop the run
        failure = _failure("prepare", prepare.key, group, error, images=len(pending))
        store.record_failure(prepare.key, failure)
        log.error("prepare failed for %s: %s", result.group, failure["message"])
        result.failed.append(failure)
        progress("prepare", 1)
        progress("generate", len(pending))
        return result
    progress("prepare", 1)

    writer = ImageWriter(store, group, result, job.write_threads)
    try:
        _generate_cells(method, pending, group, job, store, result, writer, state_dir, progress)
    except BaseException:
        writer.close()
        raise
    writer.drain()
    return result


def _generate_cells(method, pending, group, job, store, result, writer, state_dir, progress) -> None:
    prepare = group.prepare
    cell, subject = prepare.cell, prepare.subject
    by_cell: dict[str, list[ImageUnit]] = {}
    for unit in pending:
        by_cell.setdefault(unit.method_cell_id or unit.cell_id, []).append(unit)
    for cell_id, cell_units in by_cell.items():
        cell_method = method if cell_id == cell.cell_id else group.cell(cell_id).build(job.context)
        try:
            state = cell_method.load_state(state_dir, subject)
        except Exception as error:  # noqa: BLE001 - this cell's images fail, other cells go on
            failure = _failure("load", prepare.key, group, error, images=len(cell_units), cell=cell_id)
            store.record_failure(prepare.key, failure)  # so the summary and status count it
            log.error("loading the state for %s failed: %s", cell_id, failure["message"])
            result.failed.append(failure)
            progress("generate", len(cell_units))
            continue
        try:
            batches: dict[tuple, list[ImageUnit]] = {}
            for unit in cell_units:
                batches.setdefault((unit.checkpoint, unit.sampler), []).append(unit)
            for (checkpoint, _), units in batches.items():
                for batch in balanced_batches(units, job.batch_size):
                    _generate_batch(cell_method, state, checkpoint, batch, group, job, store, result, writer)
                    progress("generate", len(batch))
        finally:
            cell_method.release()


def balanced_batches(units: list, batch_size: int) -> list[list]:
    """``units`` in the fewest batches of at most ``batch_size``, their sizes differing by at most one.

    100 images at batch 32 run as 4 × 25, not 32 + 32 + 32 + 4: no nearly empty last call, and
    a compiled UNet (``generation.compile``) sees one or two batch shapes, not one per remainder.
    """
    if not units:
        return []
    count = -(-len(units) // batch_size)
    size, extra = divmod(len(units), count)
    out, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        out.append(units[start:end])
        start = end
    return out


def _generate_batch(method, state, checkpoint, batch, group, job, store, result, writer) -> None:
    """Generate a batch; if it fails, retry its units one by one so one bad unit fails alone.

    Units the failed batch had already finished are not retried (and never get a failure); a
    full or read-only disk stops the run instead of failing every remaining unit.
    """

    written: set[str] = set()

    def attempt(units: list[ImageUnit]) -> None:
        environment.reset_peak_memory(job.context.device)
        started = time.perf_counter()
        images = method.generate(state, checkpoint, [u.prompt_text for u in units], [u.seed for u in units], units[0].sampler)
        if len(images) != len(units):
            raise RuntimeError(
                f"{method.name}.generate returned {len(images)} images for {len(units)} prompts"
            )
        seconds = (time.perf_counter() - started) / len(units)
        memory = environment.peak_memory_mb(job.context.device)
        compiled = job.context.compile_unet and getattr(method, "samples_compiled", False)
        for unit, image in zip(units, images):
            writer.submit(unit, image, _record(unit, group, job, seconds, memory, compiled))
            written.add(unit.key)

    if len(batch) > 1:
        try:
            attempt(batch)
            return
        except Exception as error:  # noqa: BLE001
            if (fatal := disk_error(error)) is not None:
                raise fatal from None
            if _is_oom(error):
                environment.free_cuda_memory()
            log.warning("batch of %d images failed (%s); retrying one by one", len(batch), str(error).splitlines()[0])
    for unit in batch:
        if unit.key in written:
            continue  # written before the batch failed
        try:
            attempt([unit])
        except Exception as error:  # noqa: BLE001 - isolate the failure, the run goes on
            if (fatal := disk_error(error)) is not None:
                raise fatal from None
            failure = _failure("generate", unit.key, group, error, checkpoint=checkpoint, prompt=unit.prompt_text)
            store.record_failure(unit.key, failure)
            log.error("generate failed for %s %r: %s", result.group, unit.prompt_text, failure["message"])
            result.failed.append(failure)
