"""Output a user reads: plain progress lines in redirected logs, resumed runs, status denominators."""

from __future__ import annotations

import io

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.progress import StageProgress
from benchmark.status import status_frame
from benchmark.store import Store
from tests.helpers import run_cli
from tests.report_fakes import use_fakes

DUMMY = ["methods=dummy", "protocol.prompts=[0,1]", "protocol.images_per_prompt=2", "protocol.prior_images=1"]


def test_progress_is_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = StageProgress({"prepare": 3, "generate": 100}, stream=stream)
    progress("prepare", 3)
    for _ in range(100):
        progress("generate", 1)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "prepare: 3/3 (100%)"
    assert [line for line in lines if line.startswith("generate")] == [f"generate: {n}/100 ({n}%)" for n in range(10, 101, 10)]


def test_a_redirected_run_log_has_no_escape_codes(tmp_path):
    result = run_cli("run", "default", *DUMMY, "metrics.names=[]", "--out", str(tmp_path), check=True)
    assert "\r" not in result.stderr and "\x1b" not in result.stderr, result.stderr
    assert "generate: 15/15 (100%)" in result.stderr


def test_a_resumed_run_does_not_show_score_0_of_n(tmp_path, monkeypatch, capsys):
    use_fakes(monkeypatch)
    config = load_config("default", [*DUMMY, "metrics.names=[dino,pres]"])
    run_benchmark(config, tmp_path)
    first = capsys.readouterr().err
    assert "score: 15/15 (100%)" in first  # 3 subjects x (2 prompts x 2 + 1 prior)
    run_benchmark(config, tmp_path)
    again = capsys.readouterr().err
    assert "score: 15/15 (100%)" in again and "score: 0/" not in again
    assert "\r" not in first + again and "\x1b" not in first + again


def test_status_shows_each_metric_out_of_the_images_it_applies_to(tmp_path, monkeypatch):
    use_fakes(monkeypatch)
    run_benchmark(load_config("default", [*DUMMY, "metrics.names=[dino,pres]"]), tmp_path, quiet=True)
    row = status_frame(Store(tmp_path))[0].iloc[0]
    assert row["dino scored"] == "12/12" and row["pres scored"] == "3/3"


# ----------------------------------------------------------------------------- CPU budget


def test_thread_budget_follows_the_cores_actually_available():
    import os

    from data.common import available_cores, threads_per_process

    cores = len(os.sched_getaffinity(0))
    assert 1 <= available_cores() <= cores
    assert threads_per_process(1) == available_cores() and threads_per_process(10 * cores) == 1
    assert threads_per_process(2) * 2 <= max(2, available_cores())


def test_a_run_confined_to_one_core_uses_one_thread(tmp_path):
    import os
    import subprocess

    from tests.helpers import REPO_ROOT, cli_command, cli_env

    if not hasattr(os, "sched_setaffinity"):
        import pytest

        pytest.skip("no CPU affinity on this platform")
    first_core = min(os.sched_getaffinity(0))
    env = {k: v for k, v in cli_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = subprocess.run(
        cli_command("run", "default", *DUMMY, "metrics.names=[]", "--quiet", "--out", str(tmp_path)),
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, {first_core}),
    )
    assert result.returncode == 0, result.stderr
    assert "cpu: 1 core(s) available, torch uses 1 thread(s)" in (tmp_path / "run.log").read_text()


def test_more_workers_than_cores_are_capped(caplog):
    import logging

    from benchmark.executors import make_executor
    from data.common import available_cores

    logger = logging.getLogger("subjectbench")  # run_benchmark stops its propagation
    logger.addHandler(caplog.handler)
    try:
        executor = make_executor("local", workers=available_cores() + 3)
    finally:
        logger.removeHandler(caplog.handler)
    assert executor.workers == available_cores()
    assert "only" in caplog.text and "core(s) are available" in caplog.text


def test_loading_the_backbone_prints_no_library_warning(capfd):
    import torch

    from methods.backbones import clear_backbone_cache, load_backbone, resolve_backbone

    clear_backbone_cache()
    load_backbone(resolve_backbone("tiny"), "cpu", torch.float32)
    err = capfd.readouterr().err
    assert "should be kept in float32" not in err, err
