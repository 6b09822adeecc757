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
