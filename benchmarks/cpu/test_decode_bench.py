"""Stored-PNG decoding while the scoring thread is busy: what the score stage's decode threads do.

The score stage decodes the next subject batch's PNGs in threads while its own thread launches
the metrics' kernels, which is Python work holding the GIL most of the time (an H200 profile had
the GPU ~15 % busy while scoring: the host's launches are the limit). A decoder that goes back to
Python often waits for the GIL at every return. This times one decode thread beside a thread
running pure Python, and beside one calling small modules' forwards (operator dispatch, each
kernel run without the GIL, as launching GPU kernels), for the decode the score stage uses (``benchmark.scoring._decode``: libpng
through torchvision, two calls without the GIL) and for the reference a user would write, PIL's
``Image.open(...).convert("RGB")`` (the score stage's decode until the sixteenth session), and
each alone. Images: 512-px PNGs of the bundled subjects' photos, as the store writes them.

Run explicitly: ``python -m pytest benchmarks/cpu/test_decode_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import threading
import time

import torch
from PIL import Image

from benchmark.scoring import _decode, _decode_with_pil
from benchmark.store import Store
from data.images import load_image
from tests.helpers import REPO_ROOT

PHOTOS = sorted((REPO_ROOT / "data" / "mini").rglob("*.png"))[:8]
BUSY_SECONDS = 1.5


def _pil_decode(store: Store, label: str, subject: str, key: str) -> torch.Tensor:
    return _decode_with_pil(store.image_path(label, subject, key))


def _store(tmp_path) -> tuple[Store, list[str]]:
    store, keys = Store(tmp_path / "run"), []
    for index, photo in enumerate(PHOTOS):
        key = f"k{index}"
        path = store.image_path("m", "dog", key)
        path.parent.mkdir(parents=True, exist_ok=True)
        load_image(photo).resize((512, 512), Image.BICUBIC).save(path, format="PNG")
        keys.append(key)
    return store, keys


def _busy_python(until: float) -> None:
    total = 0
    while time.perf_counter() < until:
        for i in range(10_000):
            total += i


def _busy_launching(until: float) -> None:
    """Small modules' forwards on a tiny tensor: nn.Module calls and operator dispatch, each
    operator releasing the GIL for its kernel, as a thread launching GPU kernels does."""
    model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.GELU())
                                  for _ in range(12)))
    x = torch.zeros(1, 8)
    with torch.inference_mode():
        while time.perf_counter() < until:
            model(x)


def _decodes_per_second(decode, store: Store, keys: list[str], busy) -> float:
    """Images one decode thread makes per second, beside a busy thread (``busy(until)``) or alone."""
    stop, done = threading.Event(), [0]

    def loop():
        while not stop.is_set():
            decode(store, "m", "dog", keys[done[0] % len(keys)])
            done[0] += 1

    worker = threading.Thread(target=loop)
    worker.start()
    time.sleep(0.2)  # past the first calls
    first, started = done[0], time.perf_counter()
    if busy:
        busy(started + BUSY_SECONDS)  # in this thread, as the scoring thread
    else:
        time.sleep(BUSY_SECONDS)
    rate = (done[0] - first) / (time.perf_counter() - started)
    stop.set()
    worker.join()
    return rate


def test_decode_beside_a_busy_python_thread(benchmark, tmp_path):
    assert PHOTOS, "the bundled mini subjects' photos are missing"
    store, keys = _store(tmp_path)
    for key in keys:  # same pixels both ways
        assert torch.equal(_decode(store, "m", "dog", key), _pil_decode(store, "m", "dog", key))
    figures = {}
    for name, decode in (("pil_reference", _pil_decode), ("ours", _decode)):
        figures[f"{name}_alone_per_s"] = round(_decodes_per_second(decode, store, keys, None), 1)
        for busy_name, busy in (("python", _busy_python), ("launching", _busy_launching)):
            figures[f"{name}_beside_{busy_name}_per_s"] = round(_decodes_per_second(decode, store, keys, busy), 1)
    benchmark.pedantic(lambda: _decode(store, "m", "dog", keys[0]), rounds=20, warmup_rounds=2)
    for busy_name in ("python", "launching"):
        figures[f"beside_{busy_name}_ours_over_reference"] = round(
            figures[f"ours_beside_{busy_name}_per_s"] / max(figures[f"pil_reference_beside_{busy_name}_per_s"], 1e-9), 2)
    benchmark.extra_info.update(figures)
    print("\n" + ", ".join(f"{k} {v}" for k, v in figures.items()))
    assert figures["ours_alone_per_s"] > 0 and figures["pil_reference_alone_per_s"] > 0
