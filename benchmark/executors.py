"""Executors: in-process (default), local worker processes (per GPU, or CPU workers), Ray.

All three run the same ``execute_pass`` on the same training passes (``units.training_passes``:
one group, or several whose subjects train together) and write to the same store, so they
produce the same results; only where the work happens differs.

A worker that dies (killed, out of host memory, a crash in native code) loses only the pass it
held: the local and Ray executors run that pass again on a live worker, up to ``max_retries``
times (it resumes — published states and finished images are kept), and then record each of its
groups as failed in ``failures/`` (stage ``worker``), so ``status`` counts them, a plain rerun
skips them and ``--retry-failed`` redoes them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path

from benchmark.errors import ConfigError
from benchmark.runner import GroupResult, JobSpec, execute_pass
from benchmark.store import Store, StoreWriteError
from benchmark.units import WorkGroup, training_passes
from data.common import UserError, available_cores, threads_per_process

log = logging.getLogger("subjectbench")
Progress = Callable[[str, int], None]
EXECUTORS = ("inprocess", "local", "ray")
MAX_RETRIES = 2  # runs of a group after a worker died under it, local and Ray alike


class WorkerPoolError(UserError, RuntimeError):
    """Every worker process died before the work was done (not the fault of one group)."""


def _crash_failure(group: WorkGroup, message: str) -> dict:
    cell, subject = group.prepare.cell, group.prepare.subject
    return {
        "key": group.prepare.key,
        "stage": "worker",
        "kind": "crash",
        "label": cell.label,
        "cell_id": cell.cell_id,
        "subject": subject.id,
        "message": message,
        "traceback": "",
        "images": len(group.images),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _record_crash(group: WorkGroup, job: JobSpec, message: str) -> GroupResult:
    """The group's result after its worker died for the last time; written to ``failures/``
    under the group's prepare key (status counts its unfinished images as failed)."""
    failure = _crash_failure(group, message)
    Store(job.run_dir).record_failure(group.prepare.key, failure)
    log.error("%s", message)
    result = GroupResult(group=f"{group.prepare.cell.cell_id}/{group.prepare.subject.id}")
    result.failed.append(failure)
    return result


def _passes(groups: Sequence[WorkGroup], job: JobSpec) -> list[tuple[int, ...]]:
    return training_passes(tuple(groups), job.context, job.subjects_per_batch)


def _where(groups: Sequence[WorkGroup]) -> str:
    first = groups[0].prepare
    where = f"{first.cell.cell_id} on {first.subject.id}"
    return where if len(groups) == 1 else f"{where} and {len(groups) - 1} more subject(s) trained with it"


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class InProcessExecutor:
    name = "inprocess"
    processes = 1  # worker processes that each pay their own compiles

    def run(self, groups: Sequence[WorkGroup], job: JobSpec, progress: Progress) -> list[GroupResult]:
        results: dict[int, GroupResult] = {}
        for indices in _passes(groups, job):
            results.update(zip(indices, execute_pass([groups[i] for i in indices], job, progress)))
        return [results[i] for i in range(len(groups))]


def _worker_main(worker_id: int, env: dict, groups, passes, job: JobSpec, conn, processes: int = 1) -> None:
    """Serve pass indices sent over ``conn`` (its own pipe: a worker that dies holds no lock
    another worker needs) until ``None``."""
    os.environ.update(env)
    from benchmark.environment import configure_cpu_threads

    configure_cpu_threads(processes)  # this worker's share of the cores, not all of them
    while True:
        index = conn.recv()
        if index is None:
            return
        members = [groups[i] for i in passes[index]]
        try:
            result = execute_pass(members, job, lambda stage, n: conn.send(("progress", stage, n)))
        except StoreWriteError as error:  # the disk, not the group: the whole run stops
            conn.send(("fatal", index, str(error)))
            return
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: stop, blame no group
            return
        except BaseException as error:  # noqa: BLE001 - report, then keep serving
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            result = [_record_crash(group, job, f"worker {worker_id}: {message}") for group in members]
        conn.send(("result", index, result))


class LocalProcessExecutor:
    """Worker processes on this machine: ``workers_per_gpu`` per listed GPU (``gpu_ids``), or
    ``workers`` CPU workers.

    Each training pass — a (method cell, subject) group, or several trained together — is
    prepared and generated on one worker, which keeps its backbones loaded across passes. A
    worker that dies is replaced, and the pass it held is run again (up to ``max_retries``
    times) and then its groups are recorded as failed.
    """

    name = "local"

    def __init__(self, workers: int, gpu_ids: Sequence[int] | None = None, workers_per_gpu: int = 1,
                 max_retries: int = MAX_RETRIES):
        self.gpu_ids = [g for g in gpu_ids for _ in range(workers_per_gpu)] if gpu_ids is not None else None
        self.workers = len(self.gpu_ids) if self.gpu_ids is not None else workers
        self.processes = self.workers
        self.max_retries = max_retries

    def _start(self, context, slot: int, groups, passes, job: JobSpec):
        env = {"OMP_NUM_THREADS": str(threads_per_process(self.workers))} if self.gpu_ids is None else {}
        if self.gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_ids[slot])
        parent, child = context.Pipe()
        process = context.Process(
            target=_worker_main, args=(slot, env, groups, passes, job, child, self.workers), daemon=True
        )
        process.start()
        child.close()
        return process, parent

    def run(self, groups: Sequence[WorkGroup], job: JobSpec, progress: Progress) -> list[GroupResult]:
        context = mp.get_context("spawn")
        groups = list(groups)
        passes = _passes(groups, job)
        pending = deque(range(len(passes)))
        attempts = [0] * len(passes)
        results: dict[int, GroupResult] = {}  # group index -> result
        workers: dict[int, tuple] = {}  # slot -> (process, connection)
        holding: dict[int, int] = {}  # slot -> pass index
        last_exit = ""

        def dispatch(slot: int) -> None:
            if pending and slot not in holding:
                index = pending.popleft()
                attempts[index] += 1
                holding[slot] = index
                workers[slot][1].send(index)

        def handle(slot: int, message: tuple) -> None:
            if message[0] == "progress":
                progress(message[1], message[2])
            elif message[0] == "fatal":
                raise StoreWriteError(message[2])
            else:
                holding.pop(slot, None)
                results.update(zip(passes[message[1]], message[2]))
                dispatch(slot)

        try:
            for slot in range(min(self.workers, len(passes))):
                workers[slot] = self._start(context, slot, groups, passes, job)
                dispatch(slot)
            while len(results) < len(groups):
                if not workers:
                    raise WorkerPoolError(
                        f"every worker process died ({last_exit}) before the run was done; "
                        f"{len(groups) - len(results)} group(s) did not run; see {Path(job.run_dir) / 'run.log'}"
                    )
                by_handle = {}
                for slot, (process, connection) in workers.items():
                    by_handle[connection] = slot
                    by_handle[process.sentinel] = slot
                for ready in wait(list(by_handle)):
                    slot = by_handle[ready]
                    if slot not in workers:
                        continue
                    process, connection = workers[slot]
                    if ready is connection:
                        try:
                            handle(slot, connection.recv())
                        except (EOFError, OSError):
                            pass  # the worker is gone; its sentinel says how
                        continue
                    while connection.poll():  # what it sent before it died still counts
                        try:
                            handle(slot, connection.recv())
                        except (EOFError, OSError):
                            break
                    process.join()
                    del workers[slot]
                    connection.close()
                    last_exit = f"worker {slot} (pid {process.pid}) {_describe_exit(process.exitcode)}"
                    index = holding.pop(slot, None)
                    if index is None:
                        log.error("%s while idle", last_exit)
                        continue  # it held no group: not replaced (a worker that cannot start would loop)
                    members = [groups[i] for i in passes[index]]
                    where = _where(members)
                    if attempts[index] <= self.max_retries:
                        log.warning("%s while running %s; running it again on a new worker (retry %d of %d)",
                                    last_exit, where, attempts[index], self.max_retries)
                        pending.appendleft(index)
                    else:
                        for i, group in zip(passes[index], members):
                            results[i] = _record_crash(
                                group, job, f"{last_exit} while running {where} ({attempts[index]} attempts)"
                            )
                    if pending:
                        workers[slot] = self._start(context, slot, groups, passes, job)
                        dispatch(slot)
                for slot in list(workers):
                    dispatch(slot)  # a worker freed while another was being replaced
            for _, connection in workers.values():
                try:
                    connection.send(None)
                except OSError:
                    pass
            for process, _ in workers.values():
                process.join(timeout=10)
        finally:
            for process, connection in workers.values():
                if process.is_alive():
                    process.terminate()
                connection.close()
        return [results[i] for i in range(len(groups))]


def _ray_execute(groups: list[WorkGroup], job: JobSpec) -> list[GroupResult]:
    return execute_pass(groups, job)


class RayExecutor:
    """One Ray task per training pass (a (method cell, subject), or subjects trained together); ``1 / workers_per_gpu`` GPU per task where GPUs
    exist. A task whose worker dies is retried (``max_retries``), then recorded as failed. The run
    directory must be on a file system every node sees."""

    name = "ray"
    processes = None  # Ray places tasks on its own workers: how many compile is not known here

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = MAX_RETRIES,
                 workers_per_gpu: int = 1):
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.workers_per_gpu = workers_per_gpu

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
            remote = ray.remote(
                num_gpus=1 / self.workers_per_gpu if use_gpu else 0, num_cpus=1, max_retries=self.max_retries
            )(_ray_execute)
            passes = _passes(groups, job)
            references = {remote.remote([groups[i] for i in members], job): members for members in passes}
            results: dict[int, GroupResult] = {}
            waiting = list(references)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=None)
                for reference in ready:
                    indices = references[reference]
                    members = [groups[i] for i in indices]
                    try:
                        results.update(zip(indices, ray.get(reference)))
                    except StoreWriteError:
                        raise
                    except Exception as error:  # noqa: BLE001 - a dead or crashed task, retries spent
                        cause = getattr(error, "cause", None)
                        if isinstance(cause, StoreWriteError):
                            raise cause from None
                        first = f"{type(error).__name__}: {error}".splitlines()[0]
                        message = f"Ray task for {_where(members)} failed after {self.max_retries + 1} attempt(s): {first}"
                        results.update((i, _record_crash(group, job, message)) for i, group in zip(indices, members))
                    progress("prepare", len(members))
                    progress("generate", sum(len(group.images) for group in members))
            return [results[i] for i in range(len(groups))]
        finally:
            if started_here:
                ray.shutdown()


def make_executor(name: str, gpus: int | None = None, workers: int | None = None, address: str | None = None,
                  workers_per_gpu: int = 1):
    import torch

    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    if workers_per_gpu < 1:
        raise ConfigError(f"--workers-per-gpu {workers_per_gpu}: must be 1 or more")
    if name == "ray":
        return RayExecutor(address=address, num_cpus=workers, workers_per_gpu=workers_per_gpu)
    if gpus:
        available = torch.cuda.device_count()
        if gpus > available:
            raise ConfigError(f"--gpus {gpus}: only {available} CUDA GPU(s) visible; use --gpus {available or 'N'} or omit it")
        return LocalProcessExecutor(workers=gpus, gpu_ids=range(gpus), workers_per_gpu=workers_per_gpu)
    if workers_per_gpu > 1:
        raise ConfigError(f"--workers-per-gpu {workers_per_gpu} needs --gpus N (or --executor ray on a GPU cluster)")
    if workers and workers > 1 or name == "local":
        cores = available_cores()
        if (workers or 2) > cores and not gpus:
            log.warning("--workers %d: only %d core(s) are available to this process; using %d", workers or 2, cores, cores)
        return LocalProcessExecutor(workers=min(workers or 2, cores))
    return InProcessExecutor()
