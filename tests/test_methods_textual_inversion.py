"""Textual Inversion on the tiny backbone: learning, untouched rows, diffusers format, checkpoints."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data.protocol import prompt_templates
from methods.backbones import load_backbone, resolve_backbone
from methods.base import MethodContext, ParamsError, SamplerConfig, expand_params
from methods.diffusion import encode_text, fixed_draw_loss, make_noise_scheduler, subject_latents
from methods.registry import get_method
from methods.sampling import build_pipeline, generate_images
from methods.textual_inversion import TextualInversion, TextualInversionParams

FAST = SamplerConfig(steps=8)
STEPS = 30


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path_factory.mktemp("ti-cache"))


@pytest.fixture(scope="module")
def trained(context, dog, tmp_path_factory):
    """30 steps with the paper's settings (effective lr 1e-2, batch 2), a checkpoint at 10."""
    backbone = load_backbone(context.backbone)
    embedding_before = backbone.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    method = TextualInversion(TextualInversionParams(steps=STEPS, checkpoint_steps=(10,)), context)
    workdir = tmp_path_factory.mktemp("ti-state")
    method.prepare(dog, workdir, seed=0)
    state = method.load_state(workdir, dog)
    return method, state, embedding_before, unet_before


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _probe(method, subject, vectors) -> float:
    """The loss on one fixed draw of timesteps and noise, for the given token vectors."""
    backbone = method._backbone()
    tokens = method.placeholder_tokens(subject)
    tokenizer = method._tokenizer(backbone, tokens)
    text_encoder = method._text_encoder_copy(backbone)
    text_encoder.get_input_embeddings().set_vectors(vectors)
    latents = subject_latents(backbone, subject, 64)
    with torch.no_grad():
        hidden = encode_text(text_encoder, tokenizer, [f"a photo of a {tokens[0]}"] * len(latents), backbone.device)
    text_encoder.get_input_embeddings().set_vectors(None)
    return fixed_draw_loss(backbone.unet, make_noise_scheduler(backbone), latents, hidden, seed=123, draws=16)


def test_registered_under_its_name():
    assert get_method("textual_inversion") is TextualInversion


def test_training_lowers_the_loss(trained, dog):
    method, state, _, _ = trained
    assert len(state.data["losses"]) == STEPS
    initial, _ = method.initial_vectors(method._backbone(), dog)
    before = _probe(method, dog, initial)
    after = _probe(method, dog, state.data["vectors"]["final"])
    # The random tiny UNet reads one token among 77 through near-uniform attention, so the
    # effect is small but systematic: a no-op or sign error leaves it equal or higher.
    assert after < before - 1e-4, (before, after)
    assert not torch.equal(initial, state.data["vectors"]["final"])


def test_only_the_new_rows_change(trained):
    method, state, embedding_before, unet_before = trained
    backbone = method._backbone()
    assert torch.equal(backbone.text_encoder.get_input_embeddings().weight, embedding_before)
    assert len(backbone.tokenizer) == 49408  # the shared tokenizer got no token
    assert all(torch.equal(v, unet_before[k]) for k, v in backbone.unet.state_dict().items())
    # Loaded the diffusers way, the whole matrix is the old one plus one learned row.
    pipeline = build_pipeline(
        backbone,
        FAST,
        text_encoder=copy.deepcopy(backbone.text_encoder),
        tokenizer=copy.deepcopy(backbone.tokenizer),
    )
    pipeline.load_textual_inversion(str(state.path / "learned_embeds.safetensors"))
    matrix = pipeline.text_encoder.get_input_embeddings().weight
    assert matrix.shape[0] == 49409
    assert torch.equal(matrix[:49408], embedding_before)
    assert torch.equal(matrix[49408], state.data["vectors"]["final"][0])


def test_diffusers_load_textual_inversion_gives_the_same_images(trained, dog):
    method, state, _, _ = trained
    backbone = method._backbone()
    prompts = [method.render_prompt(p, dog) for p in prompt_templates("live")[:2]]
    assert prompts[0].startswith("a <sks-dog> ") and " dog" not in prompts[0]
    ours = method.generate(state, "final", prompts, [5, 6], FAST)
    file = state.path / "learned_embeds.safetensors"
    assert list(load_file(str(file))) == ["<sks-dog>"]
    pipeline = build_pipeline(
        backbone,
        FAST,
        text_encoder=copy.deepcopy(backbone.text_encoder),
        tokenizer=copy.deepcopy(backbone.tokenizer),
    )
    pipeline.load_textual_inversion(str(file))
    theirs = generate_images(pipeline, prompts, [5, 6], FAST, 64)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(ours, theirs))
    untrained = generate_images(build_pipeline(backbone, FAST), ["a dog", "a dog"], [5, 6], FAST, 64)
    assert any(not np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(ours, untrained))


def test_checkpoints_reload_and_differ(trained, dog):
    method, state, _, _ = trained
    assert list(method.checkpoints()) == ["step-10", "final"]
    assert sorted(p.name for p in state.path.iterdir()) == [
        "learned_embeds-step-10.safetensors",
        "learned_embeds.safetensors",
        "state.json",
    ]
    reloaded = method.load_state(state.path, dog)
    prompt = ["a <sks-dog> on the beach"]
    images = {name: method.generate(reloaded, name, prompt, [9], FAST)[0] for name in method.checkpoints()}
    assert not np.array_equal(_pixels(images["step-10"]), _pixels(images["final"]))
    alias = method.generate(reloaded, f"step-{STEPS}", prompt, [9], FAST)[0]
    assert np.array_equal(_pixels(alias), _pixels(images["final"]))
    with pytest.raises(ValueError, match="'step-20'.*valid: step-10, final"):
        method.generate(reloaded, "step-20", prompt, [9], FAST)


def test_render_prompt_styles(context, dog):
    template = prompt_templates("live")[0]
    assert "jungle" in template.template
    token_only = TextualInversion(TextualInversionParams(), context).render_prompt(template, dog)
    with_class = TextualInversion(TextualInversionParams(prompt_style="token_class"), context).render_prompt(
        template, dog
    )
    assert token_only == "a <sks-dog> in the jungle"
    assert with_class == "a <sks-dog> dog in the jungle"
    custom = TextualInversion(TextualInversionParams(placeholder_token="<my-pet>"), context)
    assert custom.render_prompt(template, dog) == "a <my-pet> in the jungle"
    from data.protocol import PRIOR_PROMPT

    assert custom.render_prompt(PRIOR_PROMPT, dog) == "a dog"


def test_multi_vector_tokens_and_multi_word_initializer(context, dog, tmp_path):
    plush = replace(dog, id="plush", class_noun="stuffed animal")
    method = TextualInversion(TextualInversionParams(steps=2, num_vectors=2, batch_size=1), context)
    backbone = method._backbone()
    vectors, ids = method.initial_vectors(backbone, plush)
    assert len(ids) == 2 and vectors.shape == (2, 32)
    rows = backbone.text_encoder.get_input_embeddings().weight[torch.tensor(ids)].float()
    torch.testing.assert_close(vectors[0], rows.mean(dim=0))
    method.prepare(plush, tmp_path, seed=1)
    state = method.load_state(tmp_path, plush)
    assert state.data["tokens"] == ["<sks-plush>", "<sks-plush>_1"]
    saved = load_file(str(tmp_path / "learned_embeds.safetensors"))["<sks-plush>"]
    assert saved.shape == (2, 32) and saved.dtype == torch.float32
    pipeline = build_pipeline(
        backbone, FAST, text_encoder=copy.deepcopy(backbone.text_encoder), tokenizer=copy.deepcopy(backbone.tokenizer)
    )
    pipeline.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    assert pipeline.maybe_convert_prompt("a <sks-plush>", pipeline.tokenizer) == "a <sks-plush> <sks-plush>_1"
    ours = method.generate(state, "final", ["a <sks-plush> on a bed"], [3], FAST)[0]
    theirs = generate_images(pipeline, ["a <sks-plush> on a bed"], [3], FAST, 64)[0]
    assert np.array_equal(_pixels(ours), _pixels(theirs))


def test_single_image_subject(context, dog, tmp_path):
    single = replace(dog, id="dog_single", images=dog.images[:1], data_sha="single")
    method = TextualInversion(TextualInversionParams(steps=3), context)
    method.prepare(single, tmp_path, seed=0)
    state = method.load_state(tmp_path, single)
    assert len(state.data["losses"]) == 3
    assert len(method.generate(state, "final", ["a <sks-dog_single>"], [1], FAST)) == 1


def test_fingerprint_holds_every_hyper_parameter(context):
    fingerprint = TextualInversion(TextualInversionParams(), context).fingerprint()
    assert fingerprint["params"]["learning_rate"] == 5e-3 and fingerprint["params"]["steps"] == 5000
    assert set(fingerprint["params"]) >= {"scale_lr", "num_vectors", "templates", "flip_p", "prompt_style"}
    other = TextualInversion(TextualInversionParams(flip_p=0.0), context).fingerprint()
    assert other != fingerprint


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"placeholder_token": "dog"}, "'dog' is already in the tokenizer"),
        ({"placeholder_token": "sks"}, "'sks' is already in the tokenizer"),
        ({"placeholder_token": "<My-Dog>"}, "must be lowercase"),
        ({"placeholder_token": "two words"}, "without spaces"),
        ({"steps": 100, "checkpoint_steps": [50, 200]}, r"checkpoint_steps \[200\] are beyond.*steps=100"),
        ({"num_vectors": 0}, "num_vectors must be >= 1"),
        ({"flip_p": 2}, "flip_p"),
        ({"placeholder_tok": "x"}, "unknown parameter 'placeholder_tok'.*did you mean"),
    ],
)
def test_bad_params_fail_at_config_validation(raw, message):
    with pytest.raises(ParamsError, match=message):
        expand_params(TextualInversionParams, raw, "methods.textual_inversion.params")


def test_missing_class_noun_names_the_subject(context, dog, tmp_path):
    nameless = replace(dog, id="mystery", class_noun="")
    with pytest.raises(ValueError, match="'mystery' has no class noun"):
        TextualInversion(TextualInversionParams(steps=1), context).prepare(nameless, tmp_path, seed=0)
    assert not any(Path(tmp_path).iterdir())
    json.dumps(TextualInversionParams().__dict__)  # params stay JSON-serializable
