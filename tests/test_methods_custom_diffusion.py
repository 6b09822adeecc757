"""Custom Diffusion on the tiny backbone: only attn2 K/V and the modifier token learn, the saved
files are diffusers' format and reproduce the trained model, checkpoints differ, bad knobs fail."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from methods.backbones import load_backbone, resolve_backbone
from methods.base import MethodContext, ParamsError, SamplerConfig, expand_params
from methods.custom_diffusion import (
    WEIGHTS_FILE,
    CustomDiffusion,
    CustomDiffusionParams,
    load_custom_diffusion_processors,
)
from methods.diffusion import encode_text, working_copy
from methods.registry import get_method
from methods.sampling import build_pipeline, generate_images, quiet_loading

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = SamplerConfig(steps=6)
# lr far above the paper's so that 20 steps on the random tiny UNet move K/V visibly.
PARAMS = {"steps": 20, "learning_rate": 5e-3, "checkpoint_steps": (5,), "class_images": 2, "class_image_steps": 3}
PROMPTS, SEEDS = ["a <new1> dog in the jungle", "a <new1> dog"], [3, 4]


class Recording(CustomDiffusion):
    """The real method, also keeping the trained model's noise prediction on a fixed input at
    each checkpoint (what the saved files must reproduce)."""

    probes: dict[str, torch.Tensor]

    def _save_checkpoint(self, workdir, name, unet, vector):
        folder = super()._save_checkpoint(workdir, name, unet, vector)
        backbone = self._backbone()
        tokenizer, text_encoder = self.tokenizer(backbone), self.text_encoder(backbone)
        text_encoder.get_input_embeddings().set_vectors(vector.detach().clone())
        with torch.no_grad():
            self.probes[name] = _probe(unet, encode_text(text_encoder, tokenizer, PROMPTS[:1], backbone.device))
        return folder


def _probe(unet, hidden) -> torch.Tensor:
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    return unet(latents, torch.tensor(400), hidden, return_dict=False)[0]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path_factory.mktemp("cd-cache"))


@pytest.fixture(scope="module")
def trained(context, dog, tmp_path_factory):
    backbone = load_backbone(context.backbone)
    before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    method = Recording(CustomDiffusionParams(**PARAMS), context)
    method.probes = {}
    workdir = tmp_path_factory.mktemp("cd-state")
    method.prepare(dog, workdir, seed=0)
    return method, method.load_state(workdir, dog), before


def test_registered_and_defaults_have_sources():
    assert get_method("custom_diffusion") is CustomDiffusion
    p = CustomDiffusionParams()
    assert (p.steps, p.learning_rate, p.batch_size, p.class_images, p.modifier_token) == (250, 1e-5, 2, 200, "<new1>")
    assert p.effective_learning_rate == pytest.approx(4e-5)  # 1e-5 x batch 2 x 2 (prior), the script's scale_lr


def test_only_kv_and_the_token_learn(trained, dog):
    method, state, before = trained
    backbone = method._backbone()
    assert all(torch.equal(v, before[k]) for k, v in backbone.unet.state_dict().items())  # shared UNet untouched
    assert state.data["losses"] and len(state.data["losses"]) == 20
    assert sorted(state.data["checkpoints"]) == ["final", "step-5"]
    folder = state.path / state.data["checkpoints"]["final"]
    weights = load_file(str(folder / WEIGHTS_FILE))
    cross = [name for name in backbone.unet.attn_processors if name.endswith("attn2.processor")]
    assert set(weights) == {f"{name}.to_{kv}_custom_diffusion.weight" for name in cross for kv in "kv"}
    for name in cross:
        layer = backbone.unet.get_submodule(name.removesuffix(".processor"))
        assert not torch.equal(weights[f"{name}.to_k_custom_diffusion.weight"], layer.to_k.weight)
    token = load_file(str(folder / "<new1>.safetensors"))
    assert list(token) == ["<new1>"] and token["<new1>"].shape == (1, 32)
    initial, _ = method.initial_vector(backbone)
    assert not torch.allclose(token["<new1>"], initial)


def test_saved_weights_load_with_diffusers_and_reproduce_the_trained_model(trained, context):
    method, state, _ = trained
    backbone = method._backbone()
    for name, probe in method.probes.items():
        folder = state.path / state.data["checkpoints"][name]
        # diffusers' side: its textual-inversion loader, and its own parser of the K/V file
        unet, text_encoder = working_copy(backbone.unet), working_copy(backbone.text_encoder)
        tokenizer = copy.deepcopy(backbone.tokenizer)
        pipeline = build_pipeline(backbone, FAST, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer)
        with quiet_loading():
            pipeline.load_textual_inversion(str(folder / "<new1>.safetensors"))
        parsed = unet._process_custom_diffusion(load_file(str(folder / WEIGHTS_FILE)))
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

        unet.set_attn_processor(
            {k: parsed.get(k, CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)) for k in unet.attn_processors}
        )
        with torch.no_grad():
            theirs = _probe(unet, encode_text(text_encoder, tokenizer, PROMPTS[:1], backbone.device))
        # diffusers' loader builds the explicit-softmax processor, we train and sample with its SDPA
        # twin: the same math, fp32 rounding apart
        torch.testing.assert_close(theirs, probe, rtol=0, atol=1e-5)
        our_unet, our_text_encoder, our_tokenizer = method.generation_modules(state, name)
        with torch.no_grad():
            ours_probe = _probe(our_unet, encode_text(our_text_encoder, our_tokenizer, PROMPTS[:1], backbone.device))
        torch.testing.assert_close(ours_probe, probe, rtol=0, atol=1e-6)  # our loader: the trained model
        images_theirs = generate_images(pipeline, PROMPTS, SEEDS, FAST, 64)
        ours = method.generate(state, name, PROMPTS, SEEDS, FAST)
        for a, b in zip(ours, images_theirs):
            difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # uint8 rounding at most
    base = generate_images(build_pipeline(backbone, FAST), ["a dog in the jungle"], SEEDS[:1], FAST, 64)
    assert not np.array_equal(np.asarray(base[0]), np.asarray(method.generate(state, "final", PROMPTS[:1], SEEDS[:1], FAST)[0]))
    early = method.generate(state, "step-5", PROMPTS, SEEDS, FAST)
    final = method.generate(state, "final", PROMPTS, SEEDS, FAST)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(early, final))


def test_diffusers_load_attn_procs_is_a_silent_no_op_here(trained):
    """Documents huggingface/diffusers#9320 on the pinned diffusers: ``unet.load_attn_procs`` of
    a safetensors Custom Diffusion file installs nothing. When this fails, diffusers fixed it and
    our loader can become a call to it."""
    method, state, _ = trained
    unet = working_copy(method._backbone().unet)
    folder = state.path / state.data["checkpoints"]["final"]
    with quiet_loading():
        unet.load_attn_procs(str(folder), weight_name=WEIGHTS_FILE)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    load_custom_diffusion_processors(unet, folder / WEIGHTS_FILE)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"CustomDiffusionAttnProcessor2_0"}


def test_a_file_of_another_backbone_is_refused(trained, tmp_path):
    method, state, _ = trained
    folder = state.path / state.data["checkpoints"]["final"]
    weights = load_file(str(folder / WEIGHTS_FILE))
    from safetensors.torch import save_file

    save_file(dict(list(weights.items())[:2]), str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="not a Custom Diffusion K/V file for this UNet"):
        load_custom_diffusion_processors(working_copy(method._backbone().unet), tmp_path / WEIGHTS_FILE)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"modifier_token": "dog"}, "already in the tokenizer"),
        ({"flip_p": 2}, "flip_p must be in"),
        ({"class_images": -1}, "must be >= 0"),
        ({"initializer": " "}, "initializer must be a word"),
    ],
)
def test_bad_params_fail_at_config_validation(raw, message):
    with pytest.raises(ParamsError, match=message):
        expand_params(CustomDiffusionParams, raw, "methods.custom_diffusion.params")


def test_mixed_precision_path_runs_in_bfloat16(dog, tmp_path):
    """The GPU recipe on a CPU: bf16 frozen UNet, fp32 K/V master copies from fp32 weights."""
    context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, dtype="bfloat16", cache_dir=tmp_path / "cache")
    method = CustomDiffusion(CustomDiffusionParams(steps=3, class_images=2, class_image_steps=3, gradient_checkpointing=True), context)
    method.prepare(dog, tmp_path, seed=0)
    state = method.load_state(tmp_path, dog)
    assert all(np.isfinite(state.data["losses"]))
    weights = load_file(str(tmp_path / state.data["checkpoints"]["final"] / WEIGHTS_FILE))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert method.generate(state, "final", PROMPTS[:1], SEEDS[:1], FAST)[0].size == (64, 64)
    unet, _, _ = method.generation_modules(state, "final")
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
