"""Compiled sampling on the CPU: the `tiny` backbone, eager vs ``torch.compile`` (inductor, C++).

What ``generation.compile=true`` costs and buys where the suite's tests run: seconds per image
(8 images of 64 px per call, DDIM 20, guidance 7.5) eager and compiled, the compile seconds of the
first call, and the largest pixel difference. `auto` leaves compile off on CPUs; this records why
(or shows when that should change). The GPU figures are `benchmarks/gpu_speed.py --compile`.

Run explicitly: ``python -m pytest benchmarks/cpu/test_compile_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import torch

from methods import sampling
from methods.backbones import load_backbone, resolve_backbone
from methods.base import SamplerConfig
from methods.sampling import build_pipeline, generate_images

SAMPLER = SamplerConfig(steps=20)
PROMPTS = [f"a photo of a dog number {i}" for i in range(8)]
SEEDS = list(range(8))


def test_compiled_vs_eager_sampling_tiny(compare_to_reference):
    torch._dynamo.reset()
    backbone = load_backbone(resolve_backbone("tiny"))
    eager_pipeline = build_pipeline(backbone, SAMPLER)
    compiled_pipeline = build_pipeline(backbone, SAMPLER, compile_unet=True)
    figures = compare_to_reference(
        lambda: generate_images(eager_pipeline, PROMPTS, SEEDS, SAMPLER, 64),
        lambda: generate_images(compiled_pipeline, PROMPTS, SEEDS, SAMPLER, 64),  # first call: the compile
        len(PROMPTS), ("eager", "compiled"),
    )
    assert not sampling._compile_failed, sampling._compile_failed
    assert figures["max_abs_diff_levels"] <= 2
