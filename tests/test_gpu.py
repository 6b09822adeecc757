"""GPU tier (opt-in: ``pytest -m gpu``): the embedded default and the GPU executor on CUDA."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from tests.helpers import snapshot

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_embedded_default_on_cuda_bf16(tmp_path):
    summary = run_benchmark(load_config("default", ["device=cuda"]), tmp_path, quiet=True)
    assert summary.exit_code == 0, summary.lines()
    assert summary.done == 96 and summary.scored > 0


def test_gpu_worker_executor_matches_inprocess(tmp_path):
    config = load_config("default", ["methods=dummy,dreambooth_lora", "device=cuda", "subjects=dog,teapot"])
    run_benchmark(config, tmp_path / "a", quiet=True)
    run_benchmark(config, tmp_path / "b", quiet=True, executor="local", gpus=1)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
