"""Backbone resolver: names, local folders, the tiny build, the real CLIP tokenizer, and a hub
that is unreachable failing in seconds with the fix."""

from __future__ import annotations

import socket
import time

import open_clip
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from methods.backbones import (
    BACKBONE_NAMES,
    BackboneError,
    clear_backbone_cache,
    load_backbone,
    resolve_backbone,
)


def _pipeline(backbone):
    pipe = StableDiffusionPipeline(
        unet=backbone.unet, vae=backbone.vae, text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer, scheduler=DDIMScheduler.from_config(backbone.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_names_resolve_and_unknown_names_list_the_valid_ones(tmp_path):
    for name in BACKBONE_NAMES:
        spec = resolve_backbone(name)
        assert spec.name == name and spec.resolution in (64, 512)
    assert resolve_backbone("sd15").revision and len(resolve_backbone("sd15").revision) == 40
    with pytest.raises(BackboneError, match=r"unknown backbone 'sd16'; valid: sd14, sd15, sd21-base, tiny, sd15-random"):
        resolve_backbone("sd16")
    with pytest.raises(BackboneError, match="looks like a path, but no such folder exists"):
        resolve_backbone(str(tmp_path / "missing" / "model"))
    with pytest.raises(BackboneError, match=f"backbone folder {tmp_path} has no model_index.json"):
        resolve_backbone(str(tmp_path))


def test_tiny_is_seeded_and_generates_64px():
    clear_backbone_cache()
    first = load_backbone(resolve_backbone("tiny"))
    weights = {k: v.clone() for k, v in first.unet.state_dict().items()}
    clear_backbone_cache()
    second = load_backbone(resolve_backbone("tiny"))
    assert second is not first
    assert all(torch.equal(weights[k], v) for k, v in second.unet.state_dict().items())
    assert load_backbone(resolve_backbone("tiny")) is second  # built once per process
    image = _pipeline(second)("a sks dog", height=64, width=64, num_inference_steps=4,
                              generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_tokenizer_is_the_real_clip_bpe():
    tokenizer = load_backbone(resolve_backbone("tiny")).tokenizer
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in ("a sks dog in the jungle", "a cube shaped <sks-dog> toy", "Eiffel Tower, wet & shiny!"):
        ids = tokenizer(text).input_ids
        expected = [int(t) for t in reference([text])[0] if int(t) != 0]
        assert ids == expected


def test_local_diffusers_folder_loads(tmp_path):
    _pipeline(load_backbone(resolve_backbone("tiny"))).save_pretrained(tmp_path / "model")
    spec = resolve_backbone(str(tmp_path / "model"))
    assert spec.source == "local"
    local = load_backbone(spec)
    tiny = load_backbone(resolve_backbone("tiny"))
    assert all(torch.equal(a, b) for a, b in zip(local.unet.state_dict().values(), tiny.unet.state_dict().values()))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "closed endpoint"])
def test_unreachable_hub_fails_in_seconds_with_the_fix(monkeypatch, tmp_path, how):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    with pytest.raises(BackboneError) as error:
        load_backbone(resolve_backbone("sd15"))
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "not in the local Hugging Face cache" in message and "backbone=/path/to/folder" in message
