"""CPU benchmarks run offline, with caches in a temporary folder (as the tests do)."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    if "SUBJECTBENCH_CACHE" not in os.environ:
        os.environ["SUBJECTBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def compare_to_reference(benchmark):
    """``compare(reference, ours, images, labels=(ref, ours))``: the reference path timed once
    after a warm-up call, our path's first call timed (a warm-up or a compile), then our path
    through pytest-benchmark (best of 3); both calls return PIL images, compared by their largest
    uint8 difference. Returns the figures, also stored in the benchmark's extra_info."""
    import time

    import numpy as np

    def pixels(images) -> np.ndarray:
        return np.stack([np.asarray(image, dtype=np.int16) for image in images])

    def compare(reference, ours, images: int, labels: tuple[str, str]) -> dict:
        reference()  # warm-up
        started = time.perf_counter()
        theirs = reference()
        figures = {f"{labels[0]}_s_per_image": (time.perf_counter() - started) / images}
        started = time.perf_counter()
        ours()
        figures[f"{labels[1]}_first_call_s"] = time.perf_counter() - started
        got = benchmark.pedantic(ours, rounds=3, iterations=1)
        figures[f"{labels[1]}_s_per_image"] = benchmark.stats.stats.min / images if benchmark.stats else float("nan")
        figures["max_abs_diff_levels"] = int(np.abs(pixels(theirs) - pixels(got)).max())
        benchmark.extra_info.update({k: round(v, 4) for k, v in figures.items()})
        print(figures)
        return figures

    return compare
