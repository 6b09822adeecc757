"""The GPU benchmark scripts still run: each one's CPU check (tiny settings) through its own
``main``, so a change in the harness that breaks a script fails here, not on a lent GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scoring_runs_on_cpu(tmp_path, one_torch_thread):
    out = tmp_path / "scoring.json"
    assert _script("gpu_scoring").main(["--device", "cpu", "--n", "16", "--size", "64", "--repeats", "1",
                                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 16 and result["score_run"]["seconds"] > 0


@pytest.mark.slow  # ~90 s on two cores: inductor compiles the tiny UNet for both methods
def test_gpu_finetune_compile_runs_on_cpu(tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "ft.json"
    _script("gpu_finetune_compile").main(["--tiny", "--device", "cpu", "--compile-cache", str(tmp_path / "inductor"),
                                          "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dreambooth", "dreambooth_lora"}
    for row in results.values():
        assert not row["compiled"]["compile_failed"]
        assert row["agreement"]["max_relative_loss_difference"] < 1e-4
        assert row["agreement"]["weights_gap_share_of_move"] < 0.01
