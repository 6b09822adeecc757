"""Metric throughput on a CPU at tiny size (random-init backbones of the real architectures).

Run explicitly: ``python -m pytest benchmarks/cpu --benchmark-enable``. Each round clears the
in-memory embedding caches, so it measures computing embeddings, not reading them back; each
case records images/s in ``extra_info``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from metrics.base import MetricSettings, ScoringInputs
from metrics.embeddings import clear_embedding_caches
from metrics.mask_noise import sweep
from metrics.registry import build_metric

SETTINGS = MetricSettings(weights="random", batch_size=16)
SIZE, COUNT = 64, 16  # the embedded default's resolution; 4 prompts x 4 images


def tiny_inputs() -> ScoringInputs:
    generator = torch.Generator().manual_seed(0)
    return ScoringInputs(
        images=torch.rand(COUNT, 3, SIZE, SIZE, generator=generator),
        image_keys=[f"bench/{i}" for i in range(COUNT)],
        texts=[f"a dog in scene {i // 4}" for i in range(COUNT)],
        references=[torch.rand(3, 128, 128, generator=generator) for _ in range(4)],
        reference_key="bench-subject",
        groups=[f"prompt-{i // 4}" for i in range(COUNT)],
    )


def record_rate(benchmark, images: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["images_per_second"] = round(images / stats.stats.mean, 2)


@pytest.mark.parametrize("name", ["clip_t", "clip_i", "dino", "div"])
def test_metric_throughput(benchmark, name):
    metric, inputs = build_metric(name, SETTINGS), tiny_inputs()
    metric.fingerprint()  # backbone built and hashed outside the timed rounds

    def score():
        clear_embedding_caches()
        return metric.score(inputs)

    values = benchmark.pedantic(score, rounds=3, warmup_rounds=1)
    assert values.shape == (COUNT,) and np.isfinite(values).all()
    record_rate(benchmark, COUNT)


def test_cached_rescoring_throughput(benchmark):
    """Re-scoring images whose embeddings are cached: the cost of a metric-only re-run."""
    metric, inputs = build_metric("clip_i", SETTINGS), tiny_inputs()
    metric.score(inputs)
    values = benchmark(metric.score, inputs)
    assert values.shape == (COUNT,)
    record_rate(benchmark, COUNT)


def test_mask_noise_sweep(benchmark):
    ys, xs = np.mgrid[:512, :512]
    mask = (ys - 256) ** 2 + (xs - 256) ** 2 <= 150**2
    results = benchmark(sweep, mask, "erode:2,4,8;dilate:2,4,8;jitter:2,4;flip:0.05,0.1;bbox;empty;full")
    assert len(results) == 13


@pytest.mark.parametrize("path", ["packed", "per_group"])
def test_div_packing(benchmark, path):
    """DIV over a subject batch of 100 images in 25 groups of 4: the groups packed into shared
    trunk and pair batches (``group_mean_lpips``, what DIV runs) beside the per-group path it
    replaced (``pairwise_lpips`` per group: a trunk call, a pair call and a host copy each). On a
    GPU the per-group host syncs are what packing removes; on a CPU this shows it costs nothing."""
    from metrics.backbones import get_lpips
    from metrics.lpips_metrics import group_mean_lpips, pairwise_lpips

    backbone = get_lpips(SETTINGS)
    images = torch.rand(100, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    groups = [list(range(start, start + 4)) for start in range(0, 100, 4)]

    def packed():
        return group_mean_lpips(backbone, images, groups, SETTINGS.batch_size)

    def per_group():
        out = torch.empty(100)
        for group in groups:
            out[group] = pairwise_lpips(backbone, images[group], SETTINGS.batch_size).sum(dim=1) / 3
        return out

    values = benchmark.pedantic(packed if path == "packed" else per_group, rounds=3, warmup_rounds=1)
    torch.testing.assert_close(values, per_group(), rtol=1e-5, atol=1e-6)
    record_rate(benchmark, 100)


@pytest.mark.parametrize("kind", ["clip", "dino", "lpips"])
def test_bf16_cast_weights(benchmark, kind):
    """A bf16 backbone's forward with its Linear/conv weights cast once (what the harness runs)
    beside the reference, bf16 autocast over the fp32 model (which casts each weight per call):
    casts per forward (each one a kernel launch on a GPU, where scoring is host-bound) and CPU
    seconds per forward; the outputs must be equal."""
    from torch.profiler import profile

    from metrics.backbones import get_clip, get_lpips, get_vit

    get = {"clip": get_clip, "dino": lambda s: get_vit(s, "s16"), "lpips": get_lpips}[kind]
    fp32 = get(MetricSettings(weights="random", batch_size=16, precision="fp32"))
    bf16 = get(MetricSettings(weights="random", batch_size=16, precision="bf16"))
    generator = torch.Generator().manual_seed(0)
    if kind == "lpips":  # the trunk, the part that runs under autocast (the heads run in float32)
        a = torch.rand(COUNT, 3, SIZE, SIZE, generator=generator) * 2 - 1

        def forward(backbone):
            outputs = backbone.model.net.forward(backbone.model.scaling_layer(a))
            return torch.cat([output.flatten() for output in outputs])
    else:
        pixels = fp32.pipeline(torch.rand(COUNT, 3, SIZE, SIZE, generator=generator))

        def forward(backbone):
            return backbone.model.encode_image(pixels) if kind == "clip" else backbone.model(pixels)

    def run(backbone):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(backbone)

    def casts(backbone) -> int:
        with profile() as prof:
            run(backbone)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    run(fp32)
    started = time.perf_counter()
    reference = run(fp32)
    reference_s = time.perf_counter() - started
    ours = benchmark.pedantic(lambda: run(bf16), rounds=3, warmup_rounds=1)
    assert torch.equal(ours, reference)
    benchmark.extra_info.update(casts_per_forward_reference=casts(fp32), casts_per_forward_ours=casts(bf16),
                                reference_s_per_forward=round(reference_s, 4))
    print(f"\n{kind}: casts per forward {benchmark.extra_info['casts_per_forward_reference']} -> "
          f"{benchmark.extra_info['casts_per_forward_ours']}; reference {reference_s:.4f} s per forward")


@pytest.mark.parametrize("path", ["checked_once", "checked_per_metric"])
def test_input_checks_of_four_metrics(benchmark, path):
    """``check_inputs`` of the four metrics of a subject batch (CLIP-T, CLIP-I, DINO, DIV: 100
    images of 512 px and 5 reference photos of DreamBooth's ~780 px), handed the same tensors as
    the score stage hands them: each tensor's values checked once (today), against the check
    repeated per metric (before; reproduced by forgetting what was checked)."""
    from metrics import inputs as checks

    generator = torch.Generator().manual_seed(0)
    batch = ScoringInputs(
        images=torch.rand(100, 3, 512, 512, generator=generator),
        image_keys=[f"bench-check/{i}" for i in range(100)],
        texts=["a dog"] * 100,
        references=[torch.rand(3, 780, 780, generator=generator) for _ in range(5)],
        reference_key="bench-check",
        groups=[f"g{i // 4}" for i in range(100)],
    )

    def four_metrics():
        checks._CHECKED.clear()  # a new subject batch: nothing checked yet
        for needs in ({"texts": True}, {"references": True}, {"references": True}, {"groups": True}):
            if path == "checked_per_metric":
                checks._CHECKED.clear()
            checks.check_inputs(batch, **needs)

    benchmark.pedantic(four_metrics, rounds=5, warmup_rounds=1)
