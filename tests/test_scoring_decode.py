"""The scoring pass's image path: stored PNG -> uint8 in a decode thread -> float on the device.

It must hand metrics exactly what ``data.images.to_tensor`` makes of the same file (the metrics'
parity tests are stated against that), whatever the device.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from benchmark.scoring import _decode, _images
from benchmark.store import Store
from data.images import to_tensor
from tests.helpers import assert_same_scores


def _store_with_images(tmp_path, count=3, size=40):
    store = Store(tmp_path / "run")
    rows = []
    generator = np.random.default_rng(0)
    for index in range(count):
        path = store.image_path("m", "dog", f"k{index}")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        rows.append({"label": "m", "subject": "dog", "key": f"k{index}"})
    return store, pd.DataFrame(rows)


def test_decoded_batch_equals_to_tensor(tmp_path):
    store, rows = _store_with_images(tmp_path)
    expected = torch.cat([to_tensor([Image.open(store.image_path("m", "dog", k))]) for k in rows["key"]])
    decoded = {}
    got = _images(store, rows, decoded)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, expected)
    assert all(t.dtype == torch.uint8 for t in decoded.values())  # kept as uint8 for the other metrics
    assert torch.equal(_images(store, rows, decoded), expected)  # the second metric reuses the decode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoded_batch_on_cuda_equals_to_tensor(tmp_path):
    store, rows = _store_with_images(tmp_path)
    expected = torch.cat([to_tensor([Image.open(store.image_path("m", "dog", k))]) for k in rows["key"]])
    got = _images(store, rows, {}, "cuda")
    assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)


def test_decode_of_a_broken_png_names_nothing_silently(tmp_path):
    store, rows = _store_with_images(tmp_path, count=1)
    store.image_path("m", "dog", "k0").write_bytes(b"not a png")
    with pytest.raises(Exception, match="cannot identify image file"):
        _decode(store, "m", "dog", "k0")


def test_unit_table_is_to_tensor_of_every_level():
    from benchmark.scoring import _unit_table

    levels = torch.arange(256, dtype=torch.uint8)
    image = Image.fromarray(np.stack([levels.numpy().reshape(16, 16)] * 3, axis=-1))
    expected = to_tensor([image])[0, 0].flatten()
    assert torch.equal(_unit_table("cpu"), expected)


def test_each_photo_is_decoded_once_per_scoring_pass(tmp_path, monkeypatch):
    """A subject's photos serve as references, training images and subject images for several
    metrics; the scoring pass decodes each path once (in the decode threads, ahead of its batch),
    and the scores equal a pass that decodes per role (the old path) — checked by value."""
    from benchmark import scoring
    from benchmark.config import load_config
    from benchmark.driver import run_benchmark

    overrides = ["methods=dummy", "metrics.names=[clip_i,dino,copy]", "metrics.weights=random",
                 "protocol.prompts=[0]", "protocol.images_per_prompt=1"]
    calls: list[str] = []
    real = scoring._load_photo
    monkeypatch.setattr(scoring, "_load_photo", lambda path: (calls.append(str(path)), real(path))[1])
    run_benchmark(load_config("default", overrides), tmp_path / "once", quiet=True)
    assert calls and len(calls) == len(set(calls)), "a photo was decoded more than once"
    assert "scoring seconds (inputs" in (tmp_path / "once" / "run.log").read_text()  # where scoring time went

    # the same run scored with one decode per role and metric call (no shared photo cache)
    monkeypatch.setattr(scoring, "_photo", lambda path, photos: real(path))
    run_benchmark(load_config("default", overrides), tmp_path / "per_role", quiet=True)
    assert_same_scores(tmp_path / "once", tmp_path / "per_role", ("clip_i", "dino", "copy"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"])
def test_decode_equals_pil_convert_rgb_for_every_png_kind(tmp_path, mode):
    """The fast decode (libpng via torchvision) gives PIL's ``convert("RGB")`` pixels, bit for bit,
    for each kind of PNG a user's store could hold; what it cannot take goes through PIL."""
    store, _ = _store_with_images(tmp_path, count=1, size=37)
    path = store.image_path("m", "dog", "k0")
    generator = np.random.default_rng(1)
    if mode == "I;16":
        image = Image.fromarray(generator.integers(0, 65536, (37, 29), dtype=np.uint16))
    elif mode == "P":
        image = Image.fromarray(generator.integers(0, 256, (37, 29, 3), dtype=np.uint8)).quantize(17)
    else:
        image = Image.fromarray(generator.integers(0, 256, (37, 29, 4), dtype=np.uint8), "RGBA").convert(mode)
    image.save(path)
    with Image.open(path) as handle:
        expected = torch.from_numpy(np.array(handle.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    got = _decode(store, "m", "dog", "k0")
    assert got.dtype == torch.uint8 and got.shape == (3, 37, 29)
    assert torch.equal(got, expected), mode


def test_decode_of_a_missing_png_names_the_file(tmp_path):
    store, _ = _store_with_images(tmp_path, count=1)
    store.image_path("m", "dog", "k0").unlink()
    with pytest.raises(FileNotFoundError, match="k0"):
        _decode(store, "m", "dog", "k0")
