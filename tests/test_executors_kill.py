"""A worker killed mid-run (local worker processes, a local Ray cluster): the run finishes, the
group the worker held is run again or recorded as failed (``failures/``), and a rerun ends with
exactly the results of an uninterrupted run: same image keys, same PNG bytes (dummy method).
The kill tests start worker processes (and a Ray cluster): ``-m slow``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from benchmark import driver
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.executors import LocalProcessExecutor, RayExecutor
from benchmark.store import Store
from tests.helpers import descendant_processes, leftovers, snapshot

# 3 subjects -> 3 groups of 8 images; ~0.25 s per image keeps every group busy for ~2 s.
SLOW = ["methods=dummy", "metrics.names=[]", "methods.dummy.sleep_s=0.25"]


def config():
    return load_config("default", SLOW)


class Killer(threading.Thread):
    """Once ``images`` images of the victim run are on disk, SIGKILL the first descendant process
    of this test whose command line matches ``is_worker``; records what it killed."""

    def __init__(self, run_dir: Path, is_worker, images: int = 2, timeout: float = 240.0):
        super().__init__(daemon=True)
        self.run_dir, self.is_worker, self.images, self.timeout = run_dir, is_worker, images, timeout
        self.killed: tuple[int, str] | None = None
        self.done_at_kill = -1

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.killed is None:
            done = len(list((self.run_dir / "images").glob("*/*/*.json")))
            if done >= self.images:
                workers = sorted((pid, cmd) for pid, cmd in descendant_processes(os.getpid()).items() if self.is_worker(cmd))
                if workers:
                    os.kill(workers[0][0], signal.SIGKILL)
                    self.killed, self.done_at_kill = workers[0], done
                    return
            time.sleep(0.02)


def _killed_run(run_dir: Path, is_worker, **kwargs):
    killer = Killer(run_dir, is_worker)
    killer.start()
    summary = run_benchmark(config(), run_dir, quiet=True, **kwargs)
    killer.join(timeout=5)
    assert killer.killed is not None, "the run finished before a worker could be killed"
    assert killer.done_at_kill < 24, "the worker was killed after the run was done"
    return summary, killer


def _image_keys(run_dir: Path) -> list[str]:
    return sorted(json.loads(p.read_text())["key"] for p in (run_dir / "images").glob("*/*/*.json"))


def _check_same_as_uninterrupted(run_dir: Path, reference: Path) -> None:
    assert _image_keys(run_dir) == _image_keys(reference) and len(_image_keys(run_dir)) == 24  # none lost or twice
    assert snapshot(run_dir) == snapshot(reference)  # same PNG bytes, records, states
    assert not list((run_dir / "failures").glob("*.json"))


def _check_recorded_then_rerun(run_dir: Path, reference: Path, summary, rerun_kwargs: dict) -> None:
    """Retries off: the killed group is one ``worker`` failure file; status counts its missing
    images as failed; a plain rerun keeps it; ``--retry-failed`` completes it."""
    from benchmark.status import status_frame

    assert summary.exit_code == 1
    assert [(f["stage"], f["kind"]) for f in summary.failed] == [("worker", "crash")], summary.lines()
    failure = summary.failed[0]
    assert (run_dir / "failures" / f"{failure['key']}.json").is_file()
    frame, _ = status_frame(Store(run_dir))
    row = frame.iloc[0]
    done, total = (int(x) for x in row["images done"].split("/"))
    assert total == 24 and done < 24 and row["images failed"] == 24 - done and row["images pending"] == 0
    again = run_benchmark(config(), run_dir, quiet=True, **rerun_kwargs)
    assert again.exit_code == 1 and again.done == 0  # a plain rerun skips a recorded failure
    healed = run_benchmark(config(), run_dir, quiet=True, retry_failed=True, **rerun_kwargs)
    assert healed.exit_code == 0 and healed.failed == [] and healed.done == 24 - done
    _check_same_as_uninterrupted(run_dir, reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    assert run_benchmark(config(), run_dir, quiet=True).exit_code == 0
    return run_dir


def _is_local_worker(command: str) -> bool:
    return "multiprocessing" in command and "spawn_main" in command


@pytest.mark.slow  # 40-100 s on the shared 2-core machine (3 worker processes start)
def test_local_worker_killed_mid_run_is_replaced_and_its_group_rerun(tmp_path, reference):
    summary, killer = _killed_run(tmp_path, _is_local_worker, executor="local", workers=2)
    assert summary.exit_code == 0 and summary.failed == [], summary.lines()
    log = (tmp_path / "run.log").read_text()
    assert "SIGKILL" in log and "running it again on a new worker" in log
    rerun = run_benchmark(config(), tmp_path, quiet=True)  # clears what the killed worker half-wrote
    assert (rerun.exit_code, rerun.done) == (0, 0) and leftovers(tmp_path) == []
    _check_same_as_uninterrupted(tmp_path, reference)


@pytest.mark.slow
def test_local_worker_killed_without_retries_is_recorded_and_a_rerun_completes_it(tmp_path, reference, monkeypatch):
    monkeypatch.setattr(driver, "make_executor", lambda *a, **k: LocalProcessExecutor(workers=2, max_retries=0))
    summary, _ = _killed_run(tmp_path, _is_local_worker)
    assert "SIGKILL" in summary.failed[0]["message"]
    monkeypatch.undo()
    _check_recorded_then_rerun(tmp_path, reference, summary, {})


def _is_ray_task_worker(command: str) -> bool:
    return command.startswith("ray::_ray_execute")


@pytest.mark.slow
def test_ray_worker_killed_mid_run_its_task_is_retried(tmp_path, reference):
    pytest.importorskip("ray")
    summary, killer = _killed_run(tmp_path, _is_ray_task_worker, executor="ray", workers=2)
    assert summary.exit_code == 0 and summary.failed == [], summary.lines()
    rerun = run_benchmark(config(), tmp_path, quiet=True)
    assert (rerun.exit_code, rerun.done) == (0, 0) and leftovers(tmp_path) == []
    _check_same_as_uninterrupted(tmp_path, reference)


@pytest.mark.slow
def test_ray_worker_killed_without_retries_is_recorded_and_a_rerun_completes_it(tmp_path, reference, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setattr(driver, "make_executor", lambda *a, **k: RayExecutor(num_cpus=2, max_retries=0))
    summary, _ = _killed_run(tmp_path, _is_ray_task_worker)
    assert "WorkerCrashedError" in summary.failed[0]["message"] or "died" in summary.failed[0]["message"], summary.lines()
    monkeypatch.undo()
    # the rerun in-process: what matters is the store the killed Ray run left
    _check_recorded_then_rerun(tmp_path, reference, summary, {})


def test_workers_per_gpu_places_k_workers_on_each_gpu_and_needs_gpus():
    from benchmark.errors import ConfigError
    from benchmark.executors import make_executor

    executor = LocalProcessExecutor(workers=2, gpu_ids=[0, 1], workers_per_gpu=2)
    assert executor.gpu_ids == [0, 0, 1, 1] and executor.workers == 4
    assert make_executor("ray", workers=2, workers_per_gpu=2).workers_per_gpu == 2
    with pytest.raises(ConfigError, match="--workers-per-gpu 2 needs --gpus N"):
        make_executor("local", workers=2, workers_per_gpu=2)
    with pytest.raises(ConfigError, match="--workers-per-gpu 0: must be 1 or more"):
        make_executor("local", gpus=1, workers_per_gpu=0)


def test_a_group_recorded_as_crashed_is_skipped_by_a_plain_rerun_and_redone_by_retry_failed(tmp_path):
    """The runner's side, without killing anything: a ``worker`` failure on a group (its worker
    died after the state was published and 2 images were written) is counted, kept by a plain
    rerun, redone by --retry-failed, and a finished group never keeps one."""
    from benchmark.executors import _record_crash
    from benchmark.runner import JobSpec
    from benchmark.units import expand, method_context

    cfg = load_config("default", ["methods=dummy", "metrics.names=[]"])
    plan = expand(cfg, method_context(cfg, "cpu", "float32"))
    group = plan.groups[0]
    run_benchmark(cfg, tmp_path, quiet=True)
    store = Store(tmp_path)
    for unit in group.images[2:]:  # as if the worker died after writing 2 of the group's images
        store.image_path(unit.label, unit.subject_id, unit.key).unlink()
        store.record_path(unit.label, unit.subject_id, unit.key).unlink()
    _record_crash(group, JobSpec(run_dir=str(tmp_path), context=None, batch_size=1), "worker 0 was killed by SIGKILL")
    kept = run_benchmark(cfg, tmp_path, quiet=True)
    assert kept.exit_code == 1 and kept.done == 0 and [f["stage"] for f in kept.failed] == ["worker"]
    redone = run_benchmark(cfg, tmp_path, quiet=True, retry_failed=True)
    assert redone.exit_code == 0 and redone.done == 6 and store.failure(group.prepare.key) is None
    _record_crash(group, JobSpec(run_dir=str(tmp_path), context=None, batch_size=1), "stale: died after its last image")
    assert run_benchmark(cfg, tmp_path, quiet=True).exit_code == 0 and store.failure(group.prepare.key) is None
