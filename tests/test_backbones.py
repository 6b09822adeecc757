"""Backbone resolver: names, local folders, the tiny build, the real CLIP tokenizer, and a hub
that is unreachable failing in seconds with the fix."""

from __future__ import annotations

import json
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


def _keys(folder):
    """Backbone fingerprint, prepare keys, image keys and the class-prior key of a plan on ``folder``."""
    from benchmark.config import load_config
    from benchmark.units import expand, method_context
    from methods.base import SamplerConfig
    from methods.class_prior import class_prior_key

    cfg = load_config("default", [f"backbone={folder}", "methods=dreambooth", "metrics.names=[]",
                                  "dataset.subjects=[dog]", "protocol.prompts=[0,1]", "protocol.images_per_prompt=1",
                                  "protocol.prior_images=0"])
    context = method_context(cfg, "cpu", "float32")
    plan = expand(cfg, context)
    prior = class_prior_key(load_backbone(context.backbone), "dog", 0, 64, SamplerConfig())
    return (context.backbone.fingerprint(), {g.prepare.key for g in plan.groups},
            {u.key for u in plan.image_units}, json.dumps(prior, sort_keys=True))


def test_local_folder_is_keyed_by_its_content(tmp_path, monkeypatch):
    """Replacing a weight file in a local backbone folder re-keys states, images and class priors;
    an unchanged folder keeps its keys, and a rerun reads the cached file hashes, not the files."""
    from safetensors.torch import load_file, save_file

    import methods.backbones as backbones

    folder = tmp_path / "model"
    _pipeline(load_backbone(resolve_backbone("tiny"))).save_pretrained(folder)
    before = _keys(folder)
    assert len(before[1]) == 1 and len(before[2]) >= 2
    assert "content_sha256" not in resolve_backbone("tiny").fingerprint()  # built/hub keys unchanged

    backbones._FILE_HASHES.clear()  # a new process: only the on-disk cache is left
    monkeypatch.setattr(backbones, "open", lambda *a, **k: pytest.fail(f"re-read {a[0]}"), raising=False)
    assert _keys(folder) == before  # unchanged folder, same keys, no file read
    monkeypatch.undo()

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights)  # same size, new content and mtime
    after = _keys(folder)
    assert after[1].isdisjoint(before[1]) and after[2].isdisjoint(before[2]) and after[3] != before[3]
    assert after[0]["content_sha256"] != before[0]["content_sha256"] and after[0]["location"] == before[0]["location"]
