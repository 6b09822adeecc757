"""bf16 metric backbones hold the weights autocast would cast per call already cast: every value
must equal autocast over the fp32 model bit for bit (the reference path), the fp32 backbone must
be left untouched, and the weights hash must still identify the fp32 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics.backbones import get_clip, get_lpips, get_vit
from metrics.base import MetricSettings, ScoringInputs

FP32 = MetricSettings(weights="random")
BF16 = MetricSettings(weights="random", precision="bf16")


def _autocast_reference(backbone, call):
    """``call(model)`` under bf16 autocast over the fp32 model: what the backbone did before."""
    with torch.inference_mode(), torch.autocast(device_type=backbone.device.type, dtype=torch.bfloat16):
        return call(backbone.model)


def _cast(module):
    return [p for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            for p in (m.weight, m.bias) if p is not None]


@pytest.mark.parametrize("get_backbone", [
    pytest.param(lambda s: get_clip(s), id="clip"),
    pytest.param(lambda s: get_vit(s, "s16"), id="dino-s16"),
    pytest.param(lambda s: get_vit(s, "v2_s14"), id="dinov2-s14"),  # layer scale
])
def test_image_embeddings_equal_autocast_over_the_fp32_model(get_backbone):
    fp32, bf16 = get_backbone(FP32), get_backbone(BF16)
    pixels = fp32.pipeline(torch.rand(3, 3, 96, 80, generator=torch.Generator().manual_seed(0)))
    part = "visual" if fp32.kind == "clip" else ""
    reference = _autocast_reference(
        fp32, lambda model: model.encode_image(pixels) if fp32.kind == "clip" else model(pixels))
    with torch.inference_mode(), bf16.autocast():
        got = bf16.encode_image(pixels)
    assert got.dtype == reference.dtype and torch.equal(got, reference)
    # the cast copy: its image side's Linear/conv weights bf16, the fp32 model's still fp32
    assert {p.dtype for p in _cast(bf16.model.get_submodule(part))} == {torch.bfloat16}
    assert {p.dtype for p in _cast(fp32.model.get_submodule(part))} == {torch.float32}
    assert bf16.weights_sha256() == fp32.weights_sha256()  # hashes the fp32 weights
    assert bf16.fingerprint()["precision"] == "bf16-autocast" and fp32.fingerprint()["precision"] == "fp32"


def test_clip_text_tower_is_shared_and_its_embeddings_unchanged():
    fp32, bf16 = get_clip(FP32), get_clip(BF16)
    # every tensor outside the image side is the fp32 model's own (no copy held)
    shared = {id(p) for p in fp32.model.parameters()} & {id(p) for p in bf16.model.parameters()}
    outside = [p for name, p in fp32.model.named_parameters() if not name.startswith("visual.")]
    assert outside and all(id(p) in shared for p in outside)
    tokens = fp32.tokenizer(["a photo of a dog", "a red teapot on a table"])
    reference = _autocast_reference(fp32, lambda model: model.encode_text(tokens))
    with torch.inference_mode(), bf16.autocast():
        got = bf16.model.encode_text(tokens)
    assert torch.equal(got, reference)


def test_lpips_distances_equal_autocast_over_the_fp32_model():
    fp32, bf16 = get_lpips(FP32), get_lpips(BF16)
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2))
    reference = _autocast_reference(fp32, lambda model: model(a, b))
    with torch.inference_mode(), bf16.autocast():
        got = bf16.model(a, b)
    assert torch.equal(got, reference)
    # the trunk cast; the linear heads stay float32: DIV and lpips_scene run them outside autocast
    assert {p.dtype for p in _cast(bf16.model.net)} == {torch.bfloat16}
    assert {p.dtype for p in _cast(bf16.model.lins)} == {torch.float32}
    assert {p.dtype for p in _cast(fp32.model)} == {torch.float32}


@pytest.mark.parametrize("name", ["div", "lpips_scene"])
def test_lpips_metrics_under_bf16_equal_autocast_over_the_fp32_model(name):
    """What the score stage runs on a GPU (precision auto = bf16): the trunk under autocast, the
    heads in float32 on its features. With the heads cast to bf16 too these failed outright
    (float32 features into bf16 convolutions), which no CPU test saw: the CPU scores in fp32."""
    import dataclasses

    from metrics.registry import build_metric

    generator = torch.Generator().manual_seed(2)
    inputs = ScoringInputs(
        images=torch.rand(6, 3, 48, 48, generator=generator),
        image_keys=[f"bf16-{name}/{i}" for i in range(6)],
        texts=[],
        references=[],
        reference_key="",
        groups=["a", "a", "a", "b", "b", "c"],
        scene_images=[torch.rand(3, 48, 48, generator=generator)],
    )
    got = build_metric(name, BF16).score(inputs)
    # the reference: bf16 autocast over the fp32 model, as before the weights were held cast
    metric = build_metric(name, BF16)
    metric.load_backbone = lambda settings: dataclasses.replace(get_lpips(FP32), precision="bf16")
    expected = metric.score(inputs)
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got[:5]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["clip", "dino"])
def test_on_cuda_image_embeddings_equal_autocast_over_the_fp32_model(name):
    settings = {"device": "cuda"}
    get = get_clip if name == "clip" else (lambda s: get_vit(s, "s16"))
    fp32 = get(MetricSettings(weights="random", precision="fp32", **settings))
    bf16 = get(MetricSettings(weights="random", precision="bf16", **settings))
    pixels = fp32.pipeline(torch.rand(8, 3, 256, 256, generator=torch.Generator().manual_seed(0)).cuda())
    reference = _autocast_reference(
        fp32, lambda model: model.encode_image(pixels) if name == "clip" else model(pixels))
    with torch.inference_mode(), bf16.autocast():
        assert torch.equal(bf16.encode_image(pixels), reference)


@pytest.mark.slow
def test_every_shipped_metric_scores_a_run_under_bf16(tmp_path, monkeypatch):
    """A GPU scores in bf16 (precision auto), the CPU tests in fp32: a path only bf16 takes can
    break unseen (DIV and lpips_scene once did). Every shipped metric but the VLM judge scores a
    tiny run with bf16 forced on the CPU, without a failure."""
    from benchmark.config import load_config
    from benchmark.driver import run_benchmark
    from metrics import backbones
    from metrics.registry import available_metrics

    monkeypatch.setattr(backbones, "resolve_precision", lambda settings: "bf16")  # what CUDA resolves auto to
    names = sorted(name for name in available_metrics() if not name.startswith("vlm_judge"))
    overrides = ["methods=dummy", f"metrics.names=[{','.join(names)}]", "metrics.weights=random",
                 "protocol.prompts=[0,1]", "protocol.images_per_prompt=2", "protocol.prior_images=2"]
    run_benchmark(load_config("default", overrides), tmp_path / "run", quiet=True)
    assert not list((tmp_path / "run" / "failures").glob("*.json"))
    precisions = {f.parent.parent.name: '"bf16-autocast"' in f.read_text()
                  for f in (tmp_path / "run" / "scores").glob("*/*/fingerprint.json")}
    assert set(precisions) == set(names) and all(precisions.values())
