"""PNG writing off the generation path: main-thread seconds per image, in line vs ``ImageWriter``.

On a GPU the runner's main thread should only launch work; every millisecond it spends encoding
PNGs is a millisecond the GPU idles between batches. This measures, for 32 images at 512 px,
the time ``ImageWriter.submit`` holds the main thread with ``write_threads=0`` (the old in-line
path) and with the default 4 threads, and the total until every file is on disk. Images: the
uniform noise a random-weight backbone (``sd15-random``) produces, the costliest case for zlib,
and a photo (a bundled mini subject upscaled), closer to a trained model's output.

Run explicitly: ``python -m pytest benchmarks/cpu/test_writer_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from PIL import Image

from benchmark.config import load_config
from benchmark.runner import GroupResult, ImageWriter
from benchmark.store import Store
from benchmark.units import expand, method_context
from tests.helpers import REPO_ROOT

N = 32


def _images(kind: str) -> list[Image.Image]:
    if kind == "noise":
        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(N)]
    photo = REPO_ROOT / "data" / "mini" / "dog" / "00.png"
    base = Image.open(photo).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)
    return [base.rotate(i) for i in range(N)]


@pytest.mark.parametrize("kind", ["noise", "photo"])
def test_png_off_the_main_thread(benchmark, tmp_path, kind):
    images = _images(kind)
    config = load_config("default", ["subjects=dog"])
    group = expand(config, method_context(config, "cpu", "float32")).groups[0]
    units = [group.images[i % len(group.images)] for i in range(N)]
    figures = {}

    def run(threads: int, root) -> tuple[float, float]:
        store = Store(root)
        writer = ImageWriter(store, group, GroupResult(group="bench"), threads)
        started = time.perf_counter()
        blocked = 0.0
        for index, (unit, image) in enumerate(zip(units, images)):
            unit = dataclasses.replace(unit, key=f"{unit.key}-{index}")
            t0 = time.perf_counter()
            writer.submit(unit, image, {"key": unit.key})
            blocked += time.perf_counter() - t0
        writer.drain()
        return blocked / N, (time.perf_counter() - started) / N

    figures["inline_main_s_per_image"], figures["inline_total_s_per_image"] = run(0, tmp_path / "inline")
    background = benchmark.pedantic(lambda: run(4, tmp_path / f"bg-{time.monotonic_ns()}"), rounds=3, iterations=1)
    figures["background_main_s_per_image"], figures["background_total_s_per_image"] = background
    benchmark.extra_info.update({k: round(v, 4) for k, v in figures.items()})
    print(kind, figures)
    assert figures["background_main_s_per_image"] < figures["inline_main_s_per_image"]
