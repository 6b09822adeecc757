"""Executors: in-process (default), local worker processes (per GPU, or CPU workers), Ray.

All three run the same ``execute_pass`` on the same training passes (``units.training_passes``:
one group, or several whose subjects train together) and write to the same store, so they
produce the same results; only where the work happens differs.

A worker that dies (killed, out of host memory, a crash in native code) loses only the pass it
held: the local and Ray executors run that pass again on a live worker, up to ``max_retries``
times (it resumes — published states and finished images are kept), and then record each of its
groups as failed in ``failures/`` (stage ``worker``), so ``status`` counts them, a plain rerun
skips them and ``--retry-failed`` redoes them.

``--mps`` (local executor, several workers per GPU): the run starts its own CUDA MPS control
daemon (``MpsDaemon``) so the workers sharing a GPU run their kernels side by side instead of
time-sharing it, and stops it when the workers are done.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path

from benchmark.errors import ConfigError
from benchmark.progress import worker_logging
from benchmark.runner import GroupResult, JobSpec, execute_pass
from benchmark.store import Store, StoreWriteError
from benchmark.units import WorkGroup, training_passes
from data.common import UserError, available_cores, threads_per_process

log = logging.getLogger("subjectbench")
Progress = Callable[[str, int], None]
EXECUTORS = ("inprocess", "local", "ray")
MAX_RETRIES = 2  # runs of a group after a worker died under it, local and Ray alike


MPS_CONTROL = "nvidia-cuda-mps-control"
SYSTEM_MPS_PIPE = Path("/tmp/nvidia-mps")  # the control daemon's default pipe directory
# what a running control daemon keeps in its pipe directory: its control pipe, and its pid file
MPS_DAEMON_FILES = ("control", "nvidia-cuda-mps-control.pid")


def _daemon_in(pipe: Path) -> bool:
    return any((pipe / name).exists() for name in MPS_DAEMON_FILES)


class MpsError(UserError, RuntimeError):
    """The run's MPS daemon could not be started (the message says why and what to do)."""


class MpsDaemon:
    """A CUDA MPS control daemon for one run's GPU workers (a context manager).

    MPS lets the worker processes that share a GPU run their kernels at the same time; without
    it their kernels only time-share the GPU. Measured on one H200 (``benchmarks/results``, tenth
    session): four compiled channels-last DreamBooth trainings, one process each, 30.8 s per 1000
    steps amortized under MPS, 28.8 s with their steps captured (eleventh session); four without
    MPS took 49 s (default layout, sixth session; the channels-last four without MPS were not
    timed). A 4-subject ``run --mps`` went through on an H200 (eleventh session). Measured on one GPU only: with several GPUs the
    one daemon serves them all, which is as NVIDIA documents it but not yet run here.

    The daemon gets a private pipe and log directory (so it never takes over another user's or
    another run's MPS) and sees every GPU (``CUDA_VISIBLE_DEVICES`` removed from its environment),
    so a worker's ``CUDA_VISIBLE_DEVICES`` names the same physical GPU with or without MPS. Where
    an MPS daemon already serves this environment (``CUDA_MPS_PIPE_DIRECTORY`` set, or the system
    default pipe directory exists) the workers use it and nothing is started or stopped.
    ``worker_env`` is what each worker process needs in its environment.
    """

    def __init__(self, control: str = MPS_CONTROL, start_timeout: float = 30.0):
        self.control = control
        self.start_timeout = start_timeout
        self.worker_env: dict[str, str] = {}
        self._root: Path | None = None
        self._daemon_env: dict[str, str] | None = None

    def __enter__(self) -> MpsDaemon:
        existing = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
        if _daemon_in(Path(existing) if existing else SYSTEM_MPS_PIPE):
            where = existing or str(SYSTEM_MPS_PIPE)
            log.info("mps: a daemon already serves %s; the workers use it (this run starts and stops none)", where)
            return self
        binary = shutil.which(self.control)
        if binary is None:
            raise MpsError(
                f"--mps: {self.control} is not on PATH; it comes with the NVIDIA driver (look in the driver's "
                "bin folder, e.g. /usr/bin or /usr/local/nvidia/bin) — add that folder to PATH, or run without --mps"
            )
        self._root = Path(tempfile.mkdtemp(prefix="subjectbench-mps-"))  # short: the pipe is a socket path
        pipe, logs = self._root / "pipe", self._root / "log"
        pipe.mkdir()
        logs.mkdir()
        self.worker_env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
        self._daemon_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | self.worker_env
        try:
            started = subprocess.run([binary, "-d"], env=self._daemon_env, capture_output=True, text=True,
                                     timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            self._cleanup()
            raise MpsError(f"--mps: `{self.control} -d` did not return within {self.start_timeout:.0f} s; "
                           "run without --mps") from None
        deadline = time.monotonic() + self.start_timeout
        while started.returncode == 0 and not _daemon_in(pipe) and time.monotonic() < deadline:
            time.sleep(0.05)
        if started.returncode != 0 or not _daemon_in(pipe):
            said = (started.stderr or started.stdout or "").strip() or self._log_tail()
            if started.returncode == 0:  # it may be up without the files we look for: ask it to quit
                self._quit(binary)
            self._cleanup()
            raise MpsError(f"--mps: the MPS control daemon did not start (exit {started.returncode}: "
                           f"{said or 'no message'}); run without --mps")
        log.info("mps: started a control daemon for this run's workers (pipe %s)", pipe)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._daemon_env is None:
            return
        if self._quit(shutil.which(self.control) or self.control):
            log.info("mps: control daemon stopped")
            self._cleanup()

    def _quit(self, binary: str) -> bool:
        """Ask the daemon to quit and wait for it to go; False (with a warning saying how to stop it
        by hand) where it could not be asked."""
        try:
            subprocess.run([binary], input="quit\n", env=self._daemon_env, capture_output=True, text=True,
                           timeout=self.start_timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("mps: stopping the control daemon failed (%s); stop it with "
                        "`echo quit | CUDA_MPS_PIPE_DIRECTORY=%s %s`", error, self.worker_env.get("CUDA_MPS_PIPE_DIRECTORY"),
                        self.control)
            return False
        deadline = time.monotonic() + self.start_timeout
        pipe = Path(self.worker_env["CUDA_MPS_PIPE_DIRECTORY"])
        while _daemon_in(pipe) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    def _log_tail(self) -> str:
        path = self._root / "log" / "control.log" if self._root else None
        if path is None or not path.exists():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])

    def _cleanup(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
        self._root, self._daemon_env = None, None


def _visible_device(index: int) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` names GPU ``index`` of this process's view: the index-th
    entry of this process's own ``CUDA_VISIBLE_DEVICES`` where one is set (``--gpus 2`` under
    ``CUDA_VISIBLE_DEVICES=4,5`` uses GPUs 4 and 5), else the index itself."""
    mask = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return mask[index] if index < len(mask) else str(index)


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
    devices = 1  # devices the work shares (training.compile=auto counts fine-tune steps per device)

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
    worker_logging(Store(job.run_dir).log_path, f"Worker-{worker_id}")
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
                 max_retries: int = MAX_RETRIES, mps: bool = False):
        self.gpu_ids = [g for g in gpu_ids for _ in range(workers_per_gpu)] if gpu_ids is not None else None
        self.workers = len(self.gpu_ids) if self.gpu_ids is not None else workers
        self.devices = len(set(self.gpu_ids)) if self.gpu_ids is not None else self.workers
        self.max_retries = max_retries
        self.mps = MpsDaemon() if mps else None

    def worker_env(self, slot: int) -> dict[str, str]:
        """The environment worker ``slot`` starts with: its GPU (or its share of the CPU threads)
        and, under ``--mps``, the run's MPS pipe."""
        if self.gpu_ids is None:
            return {"OMP_NUM_THREADS": str(threads_per_process(self.workers))}
        env = {"CUDA_VISIBLE_DEVICES": _visible_device(self.gpu_ids[slot])}
        if self.mps is not None:
            env.update(self.mps.worker_env)
        return env

    def _start(self, context, slot: int, groups, passes, job: JobSpec):
        env = self.worker_env(slot)
        parent, child = context.Pipe()
        process = context.Process(
            target=_worker_main, args=(slot, env, groups, passes, job, child, self.workers), daemon=True
        )
        process.start()
        child.close()
        return process, parent

    def run(self, groups: Sequence[WorkGroup], job: JobSpec, progress: Progress) -> list[GroupResult]:
        if self.mps is None:
            return self._run(groups, job, progress)
        with self.mps:  # stopped once every worker has exited, also when the run fails
            return self._run(groups, job, progress)

    def _run(self, groups: Sequence[WorkGroup], job: JobSpec, progress: Progress) -> list[GroupResult]:
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
    worker_logging(Store(job.run_dir).log_path, f"Ray-{os.getpid()}")  # a shared run folder; else a local file
    return execute_pass(groups, job)


@contextlib.contextmanager
def _signal_handlers_kept():
    """Put back the SIGTERM and SIGINT handlers the block replaced. ``ray.init`` installs its
    own SIGTERM handler in the driver, which logs and aborts the process (exit -6): the run then
    neither stops its tasks nor records its run time, as the CLI's handler makes it do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:
                signal.signal(number, handler)


class RayExecutor:
    """One Ray task per training pass (a (method cell, subject), or subjects trained together); ``1 / workers_per_gpu`` GPU per task where GPUs
    exist. A task whose worker dies is retried (``max_retries``), then recorded as failed. The run
    directory must be on a file system every node sees."""

    name = "ray"
    devices = None  # Ray places tasks on its own workers: on how many GPUs is not known here

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
            with _signal_handlers_kept():
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


def check_mps(name: str, gpus: int | None, workers_per_gpu: int, mps: bool) -> None:
    """``--mps`` is for the local executor's GPU workers, several per GPU (checked before a run starts)."""
    if mps and name == "ray":
        raise ConfigError("--mps starts a daemon for local GPU workers; on a Ray cluster start MPS on each node "
                          "yourself (`nvidia-cuda-mps-control -d` before `ray start`) and drop --mps")
    if mps and not (gpus and workers_per_gpu > 1):
        raise ConfigError("--mps lets several workers share a GPU: use it with --gpus N --workers-per-gpu K "
                          "(K of 2 or more), or drop it")


def make_executor(name: str, gpus: int | None = None, workers: int | None = None, address: str | None = None,
                  workers_per_gpu: int = 1, mps: bool = False):
    import torch

    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    if workers_per_gpu < 1:
        raise ConfigError(f"--workers-per-gpu {workers_per_gpu}: must be 1 or more")
    check_mps(name, gpus, workers_per_gpu, mps)
    if name == "ray":
        return RayExecutor(address=address, num_cpus=workers, workers_per_gpu=workers_per_gpu)
    if gpus:
        available = torch.cuda.device_count()
        if gpus > available:
            raise ConfigError(f"--gpus {gpus}: only {available} CUDA GPU(s) visible; use --gpus {available or 'N'} or omit it")
        return LocalProcessExecutor(workers=gpus, gpu_ids=range(gpus), workers_per_gpu=workers_per_gpu, mps=mps)
    if workers_per_gpu > 1:
        raise ConfigError(f"--workers-per-gpu {workers_per_gpu} needs --gpus N (or --executor ray on a GPU cluster)")
    if workers and workers > 1 or name == "local":
        cores = available_cores()
        if (workers or 2) > cores and not gpus:
            log.warning("--workers %d: only %d core(s) are available to this process; using %d", workers or 2, cores, cores)
        return LocalProcessExecutor(workers=min(workers or 2, cores))
    return InProcessExecutor()
