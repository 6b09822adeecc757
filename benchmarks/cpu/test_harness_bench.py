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


class _Instant:
    """A metric that returns at once: what is left of the score stage is the harness's own work."""

    version = "instant-1"
    higher_is_better = True
    needs_complete_groups = False
    role = "eval"

    def __init__(self, settings):
        self.settings, self.notes = settings, []

    def fingerprint(self) -> dict:
        return {"metric": self.name, "version": self.version}

    def score(self, inputs):
        import numpy as np

        self.notes = [""] * inputs.images.shape[0]
        return np.zeros(inputs.images.shape[0])


def _instant(name: str, **more):
    from metrics.base import Metric

    return type(f"Instant_{name}", (_Instant, Metric), {"name": name, **more})


InstantClipT, InstantClipI, InstantDino = (_instant(n) for n in ("clip_t", "clip_i", "dino"))
InstantDiv = _instant("div", needs_complete_groups=True)


def test_score_stage_overhead_3000_images(benchmark, monkeypatch, tmp_path):
    """``score_run`` over 3000 stored 64-px PNGs (30 subjects, the protocol's count) with CLIP-T,
    CLIP-I, DINO and DIV replaced by metrics that return at once: the harness's own host work per
    score stage (plan checks, context keys, sibling groups, decoding, score parts), the part a GPU
    cannot hide. Beside it, the changed piece against its reference: sibling-group ids for the
    3000 rows column-wise (ours) and by the row-wise join it replaced."""
    import argparse
    import time

    import metrics.registry
    from benchmark import scoring
    from benchmark.results import SIBLING_GROUP, sibling_groups
    from benchmarks import gpu_scoring

    for name, cls in (("clip_t", "InstantClipT"), ("clip_i", "InstantClipI"), ("dino", "InstantDino"), ("div", "InstantDiv")):
        monkeypatch.setitem(metrics.registry.BUILTIN_METRICS, name, f"{__name__}:{cls}")
    args = argparse.Namespace(n=3000, size=64, seed=0, metrics=["clip_t", "clip_i", "dino", "div"],
                              batch_size=None, prior_images=0, device="cpu")
    gpu_scoring.write_dataset(tmp_path / "dataset", 30, args.size, 0)
    store, plan, subjects, _ = gpu_scoring.populate(tmp_path / "run", tmp_path / "dataset", args.n, args)
    config, _ = gpu_scoring.harness_config(tmp_path / "dataset", args)

    def score():
        gpu_scoring.reset_scores(store)
        return scoring.score_run(store, plan, subjects, config.metrics, "cpu")

    computed, failures = benchmark.pedantic(score, rounds=3, warmup_rounds=1)
    assert computed == 4 * 3000 and not failures

    started = time.perf_counter()
    ours = sibling_groups(plan)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = plan[SIBLING_GROUP].astype(str).agg("|".join, axis=1)
    reference_s = time.perf_counter() - started
    assert list(ours) == list(reference)
    benchmark.extra_info.update(images=3000, sibling_groups_s=round(ours_s, 4),
                                sibling_groups_row_wise_reference_s=round(reference_s, 4))
    print(f"\nsibling groups of 3000 rows: {ours_s:.4f} s (row-wise reference {reference_s:.4f} s)")
