"""CPU figures of the foundation and harness: the tiny backbone (build, one 64 px image at
50 DDIM steps) and the harness overhead per image with the model-free dummy method.

Run explicitly: ``python -m pytest benchmarks/cpu --benchmark-enable``.
"""

from __future__ import annotations

import shutil
import tempfile

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from methods.backbones import clear_backbone_cache, load_backbone, resolve_backbone


def test_tiny_backbone_build(benchmark):
    def build():
        clear_backbone_cache()
        return load_backbone(resolve_backbone("tiny"))

    benchmark.pedantic(build, rounds=5, warmup_rounds=1)


def test_tiny_backbone_generates_one_64px_image(benchmark):
    backbone = load_backbone(resolve_backbone("tiny"))
    pipe = StableDiffusionPipeline(
        unet=backbone.unet, vae=backbone.vae, text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer, scheduler=DDIMScheduler.from_config(backbone.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a sks dog", height=64, width=64, num_inference_steps=50, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0)).images[0]

    image = benchmark.pedantic(generate, rounds=3, warmup_rounds=1)
    assert image.size == (64, 64)


def test_harness_overhead_per_image_with_dummy(benchmark):
    config = load_config("default", ["methods=dummy", "metrics.names=[]"])  # 24 images

    def run():
        folder = tempfile.mkdtemp()
        try:
            return run_benchmark(config, folder, quiet=True)
        finally:
            shutil.rmtree(folder)

    summary = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert summary.done == 24
    benchmark.extra_info["images"] = 24
