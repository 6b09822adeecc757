"""``--mps``: the local executor's CUDA MPS daemon for workers that share a GPU.

This machine has no GPU and no MPS, so ``nvidia-cuda-mps-control`` is played by a small stand-in
program put first on PATH. It behaves as the real one does at the interface the executor uses
(``-d`` starts a daemon that creates ``control`` in ``CUDA_MPS_PIPE_DIRECTORY`` and returns;
``quit`` on stdin stops it and removes ``control``) and records each call with the environment it
saw. What MPS does to the workers' kernels is measured on a GPU (``benchmarks/results``, tenth
session), not here."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from benchmark import driver
from benchmark.cli import main
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.errors import ConfigError
from benchmark.executors import (
    LocalProcessExecutor,
    MpsDaemon,
    MpsError,
    _visible_device,
    make_executor,
)

STAND_IN = """\
#!{python}
import json, os, sys
from pathlib import Path
calls = Path({calls!r})
pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
record = {{"argv": sys.argv[1:], "pipe": str(pipe), "log": os.environ.get("CUDA_MPS_LOG_DIRECTORY"),
          "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}}
if {fail!r}:
    print("cannot open the GPU (stand-in failure)", file=sys.stderr)
    sys.exit(1)
if sys.argv[1:] == ["-d"]:
    if not {silent!r}:
        (pipe / "control").write_text("")
else:
    record["stdin"] = sys.stdin.read()
    if record["stdin"].strip() == "quit":
        (pipe / "control").unlink(missing_ok=True)
with calls.open("a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def stand_in(tmp_path: Path, monkeypatch, fail: bool = False, silent: bool = False) -> Path:
    """Put a stand-in ``nvidia-cuda-mps-control`` first on PATH; returns the file of its calls."""
    folder, calls = tmp_path / "bin", tmp_path / "mps-calls.jsonl"
    folder.mkdir(exist_ok=True)
    program = folder / "nvidia-cuda-mps-control"
    program.write_text(textwrap.dedent(STAND_IN.format(python=sys.executable, calls=str(calls), fail=fail, silent=silent)))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr("benchmark.executors.SYSTEM_MPS_PIPE", tmp_path / "no-system-daemon")
    return calls


def read_calls(calls: Path) -> list[dict]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_a_gpu_worker_names_the_gpu_through_this_process_device_mask(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [_visible_device(i) for i in (0, 1)] == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 5")
    assert [_visible_device(i) for i in (0, 1)] == ["4", "5"]
    executor = LocalProcessExecutor(workers=2, gpu_ids=[0, 1], workers_per_gpu=2)
    assert [executor.worker_env(slot) for slot in range(4)] == [{"CUDA_VISIBLE_DEVICES": d} for d in "4455"]
    assert set(LocalProcessExecutor(workers=2).worker_env(0)) == {"OMP_NUM_THREADS"}


def test_the_daemon_gets_a_private_pipe_sees_every_gpu_and_is_stopped(tmp_path, monkeypatch):
    calls = stand_in(tmp_path, monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    executor = LocalProcessExecutor(workers=2, gpu_ids=[0, 1], workers_per_gpu=2, mps=True)
    with executor.mps as daemon:
        pipe = Path(daemon.worker_env["CUDA_MPS_PIPE_DIRECTORY"])
        assert (pipe / "control").exists() and pipe.name == "pipe"
        env = executor.worker_env(3)
        assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
        assert env["CUDA_MPS_LOG_DIRECTORY"] == daemon.worker_env["CUDA_MPS_LOG_DIRECTORY"]
    started, stopped = read_calls(calls)
    assert started["argv"] == ["-d"] and started["pipe"] == str(pipe) and started["visible"] is None
    assert stopped["stdin"].strip() == "quit" and stopped["pipe"] == str(pipe)
    assert not pipe.parent.exists()  # the run's pipe and log folder is removed


def test_a_daemon_that_serves_this_environment_already_is_used_not_restarted(tmp_path, monkeypatch):
    calls = stand_in(tmp_path, monkeypatch)
    theirs = tmp_path / "their-pipe"
    theirs.mkdir()
    (theirs / "control").write_text("")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(theirs))
    with MpsDaemon() as daemon:
        assert daemon.worker_env == {}  # the workers inherit CUDA_MPS_PIPE_DIRECTORY as it is
    assert read_calls(calls) == [] and (theirs / "control").exists()


def test_mps_errors_name_the_cause_and_the_fix(tmp_path, monkeypatch):
    calls = stand_in(tmp_path, monkeypatch, fail=True)
    with pytest.raises(MpsError, match=r"did not start \(exit 1: cannot open the GPU \(stand-in failure\)\); run without --mps"):
        with MpsDaemon():
            pass
    assert read_calls(calls) == []
    assert not list(Path(tempfile.gettempdir()).glob("subjectbench-mps-*"))  # nothing left behind
    calls = stand_in(tmp_path, monkeypatch, silent=True)  # returns 0 but never shows up in its pipe folder
    with pytest.raises(MpsError, match="did not start"):
        with MpsDaemon(start_timeout=0.5):
            pass
    assert [call["argv"] for call in read_calls(calls)] == [["-d"], []]  # asked to quit all the same
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MpsError, match="nvidia-cuda-mps-control is not on PATH.*or run without --mps"):
        with MpsDaemon():
            pass
    with pytest.raises(ConfigError, match="--mps lets several workers share a GPU: use it with --gpus N --workers-per-gpu K"):
        make_executor("local", workers=2, mps=True)
    with pytest.raises(ConfigError, match="on a Ray cluster start MPS on each node yourself"):
        make_executor("ray", workers=2, workers_per_gpu=2, mps=True)


def test_the_cli_refuses_mps_without_shared_gpus(tmp_path, capsys):
    code = main(["run", "default", "methods=dummy", "metrics.names=[]", "--out", str(tmp_path / "run"), "--mps", "--quiet"])
    assert code == 2
    assert "--mps lets several workers share a GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_run_with_mps_starts_the_daemon_before_its_workers_and_stops_it_after(tmp_path, monkeypatch):
    """A real run through the local executor with two workers on "GPU 0" (on this CPU machine
    they compute on the CPU; ~9 s on two cores): it completes, and the daemon ran around it and
    is gone."""
    calls = stand_in(tmp_path, monkeypatch)
    executor = LocalProcessExecutor(workers=1, gpu_ids=[0], workers_per_gpu=2, mps=True)
    seen: list = []
    start = executor._start

    def start_and_check(context, slot, *rest):  # a worker starts only while the daemon is up
        seen.append(dict(executor.worker_env(slot)))
        assert (Path(seen[-1]["CUDA_MPS_PIPE_DIRECTORY"]) / "control").exists()
        return start(context, slot, *rest)

    monkeypatch.setattr(executor, "_start", start_and_check)
    monkeypatch.setattr(driver, "make_executor", lambda *a, **k: executor)
    summary = run_benchmark(load_config("default", ["methods=dummy", "metrics.names=[]"]), tmp_path / "run",
                            executor="local", quiet=True, score=False)
    assert not summary.failed and summary.planned > 0
    assert len(seen) == 2 and {env["CUDA_VISIBLE_DEVICES"] for env in seen} == {"0"}
    assert [call["argv"] for call in read_calls(calls)] == [["-d"], []]
    assert not Path(seen[0]["CUDA_MPS_PIPE_DIRECTORY"]).exists()


def test_the_daemon_is_stopped_when_the_run_fails(tmp_path, monkeypatch):
    calls = stand_in(tmp_path, monkeypatch)
    executor = LocalProcessExecutor(workers=1, gpu_ids=[0], workers_per_gpu=2, mps=True)

    def broken(*args):
        raise OSError("the store's disk is full")

    monkeypatch.setattr(executor, "_run", broken)
    with pytest.raises(OSError, match="disk is full"):
        executor.run([], None, lambda *a: None)
    assert [call["argv"] for call in read_calls(calls)] == [["-d"], []]
