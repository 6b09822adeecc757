"""Executors: in-process (default), one worker process per local GPU (or CPU worker), Ray.

All three run the same ``execute_pass`` on the same training passes (``units.training_passes``:
one group, or several whose subjects train together) and write to the same store, so they
produce the same results; only where the work happens differs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmark.errors import ConfigError
from benchmark.runner import GroupResult, JobSpec, execute_pass
from benchmark.store import StoreWriteError
from benchmark.units import WorkGroup, training_passes
from data.common import available_cores, threads_per_process

log = logging.getLogger("subjectbench")
Progress = Callable[[str, int], None]
EXECUTORS = ("inprocess", "local", "ray")


def _crash_result(group: WorkGroup, message: str) -> GroupResult:
    cell, subject = group.prepare.cell, group.prepare.subject
    result = GroupResult(group=f"{cell.cell_id}/{subject.id}")
    result.failed.append(
        {
            "key": group.prepare.key,
            "stage": "worker",
            "kind": "crash",
            "label": cell.label,
            "cell_id": cell.cell_id,
            "subject": subject.id,
            "message": message,
            "traceback": "",
        }
    )
    return result


def _passes(groups: Sequence[WorkGroup], job: JobSpec) -> list[tuple[int, ...]]:
    return training_passes(tuple(groups), job.context, job.subjects_per_batch)


class InProcessExecutor:
    name = "inprocess"

    def run(self, groups: Sequence[WorkGroup], job: JobSpec, progress: Progress) -> list[GroupResult]:
        results: dict[int, GroupResult] = {}
        for indices in _passes(groups, job):
            results.update(zip(indices, execute_pass([groups[i] for i in indices], job, progress)))
        return [results[i] for i in range(len(groups))]


def _worker_main(worker_id: int, env: dict, groups, passes, job: JobSpec, tasks, events, processes: int = 1) -> None:
    os.environ.update(env)
    from benchmark.environment import configure_cpu_threads

    configure_cpu_threads(processes)  # this worker's share of the cores, not all of them
    while True:
        index = tasks.get()
        if index is None:
            return
        events.put(("start", worker_id, index))
        members = passes[index]
        try:
            results = execute_pass([groups[i] for i in members], job, lambda stage, n: events.put(("progress", stage, n)))
        except StoreWriteError as error:  # the disk, not the group: the whole run stops
            events.put(("fatal", worker_id, index, str(error)))
            return
        except BaseException as error:  # noqa: BLE001 - report, then keep serving
            results = [_crash_result(groups[i], f"{type(error).__name__}: {error}") for i in members]
        events.put(("result", worker_id, index, results))


class LocalProcessExecutor:
    """One worker process per local GPU (``gpus``) or per CPU worker (``workers``).

    Each training pass — a (method cell, subject) group, or several trained together — is
    prepared and generated on one worker, which keeps its backbones loaded across passes. A
    worker that dies fails only the groups of the pass it held.
    """

    name = "local"

    def __init__(self, workers: int, gpu_ids: Sequence[int] | None = None):
        self.gpu_ids = list(gpu_ids) if gpu_ids is not None else None
        self.workers = len(self.gpu_ids) if self.gpu_ids is not None else workers

    def run(self, groups: Sequence[WorkGroup], job: JobSpec, progress: Progress) -> list[GroupResult]:
        context = mp.get_context("spawn")
        tasks, events = context.Queue(), context.Queue()
        passes = _passes(groups, job)
        processes = []
        for worker_id in range(min(self.workers, len(passes)) or 1):
            env = {"OMP_NUM_THREADS": str(threads_per_process(self.workers))} if self.gpu_ids is None else {}
            if self.gpu_ids is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_ids[worker_id])
            process = context.Process(
                target=_worker_main, args=(worker_id, env, list(groups), passes, job, tasks, events, self.workers),
                daemon=True,
            )
            process.start()
            processes.append(process)
        for index in range(len(passes)):
            tasks.put(index)
        for _ in processes:
            tasks.put(None)

        results: dict[int, GroupResult] = {}
        holding: dict[int, int] = {}
        while len(results) < len(groups):
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                for worker_id, process in enumerate(processes):
                    if not process.is_alive() and worker_id in holding:
                        index = holding.pop(worker_id)
                        message = f"worker {worker_id} died (exit code {process.exitcode}) while running this group"
                        log.error("%s", message)
                        results.update((i, _crash_result(groups[i], message)) for i in passes[index])
                if not any(p.is_alive() for p in processes) and not holding:
                    for index in range(len(groups)):
                        results.setdefault(index, _crash_result(groups[index], "no worker left to run this group"))
                continue
            if event[0] == "fatal":
                for process in processes:
                    process.terminate()
                raise StoreWriteError(event[3])
            if event[0] == "start":
                holding[event[1]] = event[2]
            elif event[0] == "progress":
                progress(event[1], event[2])
            else:
                holding.pop(event[1], None)
                results.update(zip(passes[event[2]], event[3]))
        for process in processes:
            process.join(timeout=10)
        return [results[i] for i in range(len(groups))]


def _ray_execute(groups: list[WorkGroup], job: JobSpec) -> list[GroupResult]:
    return execute_pass(groups, job)


class RayExecutor:
    """One Ray task per training pass (a (method cell, subject) group, or several trained
    together); ``num_gpus=1`` where GPUs exist; retried when a worker dies. The run directory must be on a file system every node sees."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 2):
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries

    def run(self, groups: Sequence[WorkGroup], job: JobSpec, progress: Progress) -> list[GroupResult]:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'subjectbench[ray]'") from None
        package_root = str(Path(__file__).resolve().parents[1])
        runtime_env = {
            "env_vars": {
                "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                "SUBJECTBENCH_CACHE": os.environ.get("SUBJECTBENCH_CACHE", ""),
            }
        }
        started_here = not ray.is_initialized()
        if started_here:
            kwargs = {"address": self.address} if self.address else {"num_cpus": self.num_cpus}
            ray.init(
                **kwargs, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                ignore_reinit_error=True,
            )
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = gpus > 0 and job.context.device.startswith("cuda")
            remote = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=self.max_retries)(_ray_execute)
            passes = _passes(groups, job)
            references = {remote.remote([groups[i] for i in members], job): members for members in passes}
            results: dict[int, GroupResult] = {}
            waiting = list(references)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=None)
                for reference in ready:
                    members = references[reference]
                    try:
                        results.update(zip(members, ray.get(reference)))
                    except Exception as error:  # noqa: BLE001 - a dead or crashed task
                        message = f"Ray task failed: {type(error).__name__}: {error}".splitlines()[0]
                        results.update((i, _crash_result(groups[i], message)) for i in members)
                    progress("prepare", len(members))
                    progress("generate", sum(len(groups[i].images) for i in members))
            return [results[i] for i in range(len(groups))]
        finally:
            if started_here:
                ray.shutdown()


def make_executor(name: str, gpus: int | None = None, workers: int | None = None, address: str | None = None):
    import torch

    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    if name == "ray":
        return RayExecutor(address=address, num_cpus=workers)
    if gpus:
        available = torch.cuda.device_count()
        if gpus > available:
            raise ConfigError(f"--gpus {gpus}: only {available} CUDA GPU(s) visible; use --gpus {available or 'N'} or omit it")
        return LocalProcessExecutor(workers=gpus, gpu_ids=range(gpus))
    if workers and workers > 1 or name == "local":
        cores = available_cores()
        if (workers or 2) > cores and not gpus:
            log.warning("--workers %d: only %d core(s) are available to this process; using %d", workers or 2, cores, cores)
        return LocalProcessExecutor(workers=min(workers or 2, cores))
    return InProcessExecutor()


