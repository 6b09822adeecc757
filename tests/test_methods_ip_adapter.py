"""IP-Adapter on the tiny backbone: random weights written in diffusers' format load through
``load_ip_adapter``; scale 0 gives a plain diffusers pipeline's images, scale > 0 changes them;
a scale sweep prepares once per subject; it runs through the harness; bad weights are one error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.units import expand, method_context
from data.common import UserError
from methods.backbones import load_backbone, resolve_backbone
from methods.base import MethodContext, SamplerConfig, generation_param_names
from methods.diffusion import working_copy
from methods.ip_adapter import (
    SUBFOLDER,
    TINY_VISION,
    WEIGHT_NAME,
    IPAdapter,
    IPAdapterParams,
    IPAdapterWeightsError,
    write_random_adapter,
)
from methods.registry import get_method
from methods.sampling import build_pipeline, quiet_loading
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = SamplerConfig(steps=4)
PROMPTS, SEEDS = ["a dog in the jungle", "a dog"], [3, 4]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path_factory.mktemp("ipa-cache"))


@pytest.fixture(scope="module")
def weights(context, tmp_path_factory):
    """Random IP-Adapter weights for the tiny UNet in a local folder laid out like h94/IP-Adapter."""
    folder = tmp_path_factory.mktemp("ipa-weights")
    with quiet_loading():
        return write_random_adapter(load_backbone(context.backbone).unet, folder, TINY_VISION)


def _images(method: IPAdapter, subject, tmp_path, prompts=PROMPTS, seeds=SEEDS) -> np.ndarray:
    method.prepare(subject, tmp_path, seed=0)
    state = method.load_state(tmp_path, subject)
    return np.stack([np.asarray(image, dtype=np.int16) for image in method.generate(state, "final", prompts, seeds, FAST)])


def test_registered_with_generation_only_scale_and_a_keyed_reference():
    assert get_method("ip_adapter") is IPAdapter
    assert set(generation_param_names(IPAdapterParams)) == {"scale", "adapter"}
    assert IPAdapterParams().reference == "first" and IPAdapterParams().scale == 0.5


def test_random_weights_are_in_diffusers_format_and_load_through_load_ip_adapter(context, weights):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    tensors = load_file(str(weights / SUBFOLDER / WEIGHT_NAME))
    assert {k.split(".")[0] for k in tensors} == {"image_proj", "ip_adapter"}
    backbone = load_backbone(context.backbone)
    unet = working_copy(backbone.unet)
    pipeline = build_pipeline(backbone, FAST, unet=unet)
    with quiet_loading():
        pipeline.load_ip_adapter(str(weights), subfolder=SUBFOLDER, weight_name=WEIGHT_NAME)
    adapted = {n: p for n, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}
    assert adapted and all(n.endswith("attn2.processor") for n in adapted)
    # diffusers numbers the file's layers 1, 3, 5, … in attn_processors order: each got its own weights
    for index, processor in enumerate(adapted.values()):
        assert torch.equal(processor.to_k_ip[0].weight, tensors[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"])
    assert pipeline.image_encoder.config.projection_dim == TINY_VISION["projection_dim"]
    # the shared UNet is untouched (load_ip_adapter edits the copy in place)
    assert type(backbone.unet.attn_processors[next(iter(adapted))]) is not IPAdapterAttnProcessor2_0
    assert backbone.unet.encoder_hid_proj is None and backbone.unet.config.encoder_hid_dim_type is None


def test_scale_zero_is_the_plain_pipeline_and_scale_one_is_not(context, weights, dog, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    zero = _images(IPAdapter(IPAdapterParams(scale=0.0, adapter=str(weights)), context), dog, tmp_path / "0")
    one = _images(IPAdapter(IPAdapterParams(scale=1.0, adapter=str(weights)), context), dog, tmp_path / "1")
    # the independent reference: diffusers' pipeline on the backbone's own modules, same seeded latents
    backbone = load_backbone(context.backbone)
    plain = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    plain.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    side = 64 // plain.vae_scale_factor
    latents = torch.stack([torch.randn((4, side, side), generator=g) for g in generators])
    reference = plain(
        prompt=PROMPTS, height=64, width=64, num_inference_steps=FAST.steps, guidance_scale=FAST.guidance,
        generator=generators, latents=latents, output_type="pil",
    ).images
    reference = np.stack([np.asarray(image, dtype=np.int16) for image in reference])
    assert np.abs(zero - reference).max() <= 1  # equal up to a kernel's last bit
    assert np.abs(one - reference).max() > 20  # the image prompt acts


def test_all_references_concatenate_and_differ_from_the_first(context, weights, dog, tmp_path):
    first = IPAdapter(IPAdapterParams(scale=1.0, adapter=str(weights)), context)
    every = IPAdapter(IPAdapterParams(scale=1.0, adapter=str(weights), reference="all"), context)
    every.prepare(dog, tmp_path, seed=0)
    recorded = json.loads((tmp_path / "state.json").read_text())
    assert [e["name"] for e in recorded["images"]] == [p.name for p in dog.images]
    assert first.training_fingerprint() != every.training_fingerprint()  # the choice keys the preparation
    state = every.load_state(tmp_path, dog)
    images = every.generate(state, "final", PROMPTS[:1], SEEDS[:1], FAST)
    assert np.abs(np.asarray(images[0], dtype=np.int16) - _images(first, dog, tmp_path / "f", PROMPTS[:1], SEEDS[:1])[0]).max() > 0


def test_prompt_has_the_class_noun_and_no_identifier(context, dog):
    method = IPAdapter(IPAdapterParams(adapter="random"), context)
    prompt = dog.prompts()[0]
    assert method.render_prompt(prompt, dog) == prompt.evaluation_text(dog.class_noun)
    assert context.identifier not in method.render_prompt(prompt, dog).split()


def _overrides(*extra: str) -> list[str]:
    return ["methods=ip_adapter", "methods.ip_adapter.adapter=random", "metrics.names=[]", "protocol.prompts=[0]",
            "protocol.images_per_prompt=1", "protocol.prior_images=1", "protocol.sampler.steps=3", *extra]


def test_a_scale_sweep_plans_one_preparation_per_subject():
    cfg = load_config("default", _overrides("subjects=dog,teapot", "methods.ip_adapter.scale=[0,0.5,1]"))
    plan = expand(cfg, method_context(cfg, "cpu", "float32"))
    assert len(plan.groups) == 2 and all(len(group.cells) == 3 for group in plan.groups)
    assert len({unit.key for unit in plan.image_units}) == 2 * 3 * 2  # subjects × scales × (eval + prior)
    both = load_config("default", _overrides("subjects=dog", "methods.ip_adapter.reference=[first,all]"))
    assert len(expand(both, method_context(both, "cpu", "float32")).groups) == 2


def test_runs_through_the_harness(tmp_path):
    cfg = load_config("default", _overrides("subjects=dog", "methods.ip_adapter.scale=[0,1]"))
    summary = run_benchmark(cfg, tmp_path, quiet=True)
    assert summary.exit_code == 0
    assert len(list((tmp_path / "states").glob("*/*/*/DONE"))) == 1
    records = [json.loads(p.read_text()) for p in (tmp_path / "images").rglob("*.json")]
    assert len(records) == 4 and {r["grid"]["scale"] for r in records} == {0, 1}
    assert all("sks" not in r["prompt_text"].split() for r in records)


def test_missing_or_incomplete_weights_folder_is_one_clear_error(context, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(IPAdapterWeightsError, match="no-such-folder.*does not exist.*huggingface-cli download h94/IP-Adapter"):
        IPAdapter(IPAdapterParams(adapter=str(missing)), context).fingerprint()
    (tmp_path / "half" / SUBFOLDER).mkdir(parents=True)
    with pytest.raises(IPAdapterWeightsError, match=f"incomplete: missing .*{WEIGHT_NAME}"):
        IPAdapter(IPAdapterParams(adapter=str(tmp_path / "half")), context).fingerprint()
    assert issubclass(IPAdapterWeightsError, UserError)
    # through the CLI: one `error:` line at planning, before anything runs
    result = run_cli("run", "--out", str(tmp_path / "run"), "--quiet", *_overrides(f"methods.ip_adapter.adapter={missing}"))
    assert result.returncode != 0 and "error:" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    # the pinned release, offline and not cached
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(IPAdapterWeightsError, match="not in the local Hugging Face cache"):
        IPAdapter(IPAdapterParams(adapter="h94"), context).fingerprint()


def test_list_methods_shows_params_and_sources():
    result = run_cli("list", "methods", "ip_adapter", check=True)
    for text in ("scale", "gen-axis", "diffusers IP-Adapter guide", "h94/IP-Adapter@018e4027", "reference"):
        assert text in result.stdout
