"""Compiled sampling on the CPU: the `tiny` backbone, eager vs ``torch.compile`` (inductor, C++).

What ``generation.compile=true`` costs and buys where the suite's tests run: seconds per image
(8 images of 64 px per call, DDIM 20, guidance 7.5) eager and compiled, the compile seconds of the
first call, and the largest pixel difference. `auto` leaves compile off on CPUs; this records why
(or shows when that should change). The GPU figures are `benchmarks/gpu_speed.py --compile`.

Run explicitly: ``python -m pytest benchmarks/cpu/test_compile_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from methods import sampling
from methods.backbones import load_backbone, resolve_backbone
from methods.base import SamplerConfig
from methods.sampling import build_pipeline, generate_images

SAMPLER = SamplerConfig(steps=20)
PROMPTS = [f"a photo of a dog number {i}" for i in range(8)]
SEEDS = list(range(8))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_compiled_vs_eager_sampling_tiny(benchmark):
    torch._dynamo.reset()
    backbone = load_backbone(resolve_backbone("tiny"))
    eager_pipeline = build_pipeline(backbone, SAMPLER)
    compiled_pipeline = build_pipeline(backbone, SAMPLER, compile_unet=True)
    figures = {}

    generate_images(eager_pipeline, PROMPTS, SEEDS, SAMPLER, 64)  # warm-up
    started = time.perf_counter()
    eager = generate_images(eager_pipeline, PROMPTS, SEEDS, SAMPLER, 64)
    figures["eager_s_per_image"] = (time.perf_counter() - started) / len(PROMPTS)

    started = time.perf_counter()
    generate_images(compiled_pipeline, PROMPTS, SEEDS, SAMPLER, 64)
    figures["compile_first_call_s"] = time.perf_counter() - started
    assert not sampling._compile_failed, sampling._compile_failed

    compiled = benchmark.pedantic(
        lambda: generate_images(compiled_pipeline, PROMPTS, SEEDS, SAMPLER, 64), rounds=3, iterations=1
    )
    figures["compiled_s_per_image"] = benchmark.stats.stats.min / len(PROMPTS) if benchmark.stats else float("nan")
    figures["max_abs_diff_levels"] = int(np.abs(_pixels(eager) - _pixels(compiled)).max())
    benchmark.extra_info.update({k: round(v, 4) for k, v in figures.items()})
    print(figures)
    assert figures["max_abs_diff_levels"] <= 2
