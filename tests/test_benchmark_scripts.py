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
    split = result["score_run"]["repeats"][0]["seconds_split"]
    assert set(split) == set(result["metrics"]) and all(row["score_s"] > 0 for row in split.values())


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


def test_gpu_sampling_modes_runs_on_cpu(tmp_path, one_torch_thread):
    """Eager arms only (seconds on two cores); a CPU or tiny run never claims the 0.20 s target."""
    out = tmp_path / "modes.json"
    assert _script("gpu_sampling_modes").main(["--tiny", "--device", "cpu", "--arms", "eager,eager_cudnn_attention",
                                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["arms"]["eager"]["s_per_image"] > 0
    assert result["arms"]["eager_cudnn_attention"]["vs_eager_max_levels"] <= 1  # the CPU ignores the SDPA flags
    assert result["target"]["met"] is False


@pytest.mark.slow  # ~50 s on two cores: one CPU compile of the tiny UNet
def test_gpu_sampling_modes_compiled_arm_runs_on_cpu(tmp_path, one_torch_thread):
    out = tmp_path / "modes.json"
    _script("gpu_sampling_modes").main(["--tiny", "--device", "cpu", "--arms", "eager,compile_default,"
                                        "compile_default_cudnn_benchmark", "--out", str(out)])
    arms = json.loads(out.read_text())["arms"]
    assert "error" not in arms["compile_default"] and arms["compile_default"]["vs_eager_max_levels"] <= 2
    assert arms["compile_default_cudnn_benchmark"]["first_call_seconds"] < arms["compile_default"]["first_call_seconds"]
