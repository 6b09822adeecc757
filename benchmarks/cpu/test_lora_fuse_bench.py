"""DreamBooth-LoRA sampling: fused weights (what ``dreambooth_lora`` does) vs the adapter path
a user of diffusers' ``load_lora_weights`` runs, on the `tiny` backbone, in one process.

A 2-step LoRA (rank 4, lr 1e-2, so B has moved off its zero init) on the mini dog; 8 images of 64 px
per call, DDIM 20, guidance 7.5; seconds per image for both paths and the largest pixel
difference. The GPU figure (0.340 → 0.259 s/image, `sd15`, batch 16) is in
``benchmarks/results/README.md`` from ``benchmarks/gpu_protocol.py``.

Run explicitly: ``python -m pytest benchmarks/cpu/test_lora_fuse_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import torch

from data.subjects import load_subjects
from methods.backbones import resolve_backbone
from methods.base import MethodContext, SamplerConfig
from methods.diffusion import working_copy
from methods.dreambooth import DreamBoothLoRA, DreamBoothLoRAParams
from methods.sampling import build_pipeline, generate_images

SAMPLER = SamplerConfig(steps=20)
PROMPTS = [f"a sks dog number {i}" for i in range(8)]
SEEDS = list(range(8))


def test_fused_vs_adapter_lora_sampling_tiny(compare_to_reference, tmp_path):
    torch.set_num_threads(1)
    dog = load_subjects("mini", subjects=["dog"])[0]
    context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache")
    method = DreamBoothLoRA(DreamBoothLoRAParams(steps=2, learning_rate=1e-2, class_images=0), context)
    method.prepare(dog, tmp_path / "state", seed=0)
    state = method.load_state(tmp_path / "state", dog)
    backbone = method._backbone()

    adapter = build_pipeline(backbone, SAMPLER, unet=working_copy(backbone.unet))
    adapter.load_lora_weights(str(state.path / "lora-final"))
    figures = compare_to_reference(
        lambda: generate_images(adapter, PROMPTS, SEEDS, SAMPLER, 64),
        lambda: method.generate(state, "final", PROMPTS, SEEDS, SAMPLER),  # first call loads and fuses
        len(PROMPTS), ("adapter", "fused"),
    )
    assert figures["max_abs_diff_levels"] <= 2
