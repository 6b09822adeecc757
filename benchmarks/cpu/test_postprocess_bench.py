"""The sampling path's pixels-to-PIL step: diffusers' conversion vs ``methods.sampling.pil_images``.

After the VAE decode, diffusers' ``output_type="pil"`` copies float32 pixels to the host, scales
and rounds them in numpy there, then wraps them as PIL; ``generate_images`` now asks the pipeline
for tensors and ``pil_images`` makes the uint8 on the pixels' device, so the host receives a
quarter of the bytes. On a GPU the float work moves to the device; on this CPU both do the same
arithmetic, so this measures the host-side cost of each path on a batch of 16 bf16 512-px images
(the pipeline's output dtype under bf16), in one process, and checks the images are identical.

Run explicitly: ``python -m pytest benchmarks/cpu/test_postprocess_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from methods.sampling import pil_images


def test_pil_conversion(benchmark):
    pixels = torch.rand(16, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def diffusers_path():
        return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(pixels))

    reference = []
    for _ in range(3):
        started = time.perf_counter()
        theirs = diffusers_path()
        reference.append(time.perf_counter() - started)
    ours = benchmark.pedantic(lambda: pil_images(pixels), rounds=3, iterations=1)
    figures = {"diffusers_s_per_image": min(reference) / 16, "pil_images_s_per_image": benchmark.stats.stats.min / 16}
    benchmark.extra_info.update({k: round(v, 5) for k, v in figures.items()})
    print(figures)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))
