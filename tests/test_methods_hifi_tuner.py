"""HiFi Tuner (reconstructed) on the tiny backbone: TI equivalence, masks, step-wise, reference guidance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from data.subjects import load_subjects
from methods.backbones import load_backbone, resolve_backbone
from methods.base import MethodContext, ParamsError, SamplerConfig, expand_params
from methods.diffusion import diffusion_loss, encode_text, make_noise_scheduler, subject_latents
from methods.hifi_tuner import HifiTuner, HifiTunerParams, with_subject
from methods.registry import get_method
from methods.textual_inversion import TextualInversion, TextualInversionParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = SamplerConfig(steps=4)
# Every HiFi switch off, and TI's own optimiser settings (HiFi's defaults are the paper's Adam).
SWITCHES_OFF = dict(
    embedding="token", mask_loss=False, reg_weight=0.0, stepwise=False, reference_guidance=False,
    scale_lr=True, adam_weight_decay=1e-2,
)
TINY = dict(steps=4, stepwise_iters=2, stepwise_steps=4, reference_dino="random", segmenter="grabcut")


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path_factory.mktemp("hifi-cache"))


@pytest.fixture(scope="module")
def teapot():
    return load_subjects("mini", subjects=["teapot"])[0]


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def _trained(method, subject, folder):
    folder.mkdir(parents=True, exist_ok=True)
    method.prepare(subject, folder, seed=0)
    return method.load_state(folder, subject)


@pytest.fixture(scope="module")
def output_state(context, teapot, tmp_path_factory):
    """c_s in the output space, masks, reg and the step-wise stage (4 steps x 2 iterations)."""
    method = HifiTuner(HifiTunerParams(**TINY, reference_guidance=False), context)
    return method, _trained(method, teapot, tmp_path_factory.mktemp("hifi-output"))


def test_registered_and_labelled_reconstructed():
    assert get_method("hifi_tuner") is HifiTuner
    assert "reconstructed" in HifiTuner.description and "no public code" in HifiTuner.description


def test_every_switch_off_gives_textual_inversion_images_bit_for_bit(context, dog, tmp_path):
    ti = TextualInversion(TextualInversionParams(steps=4), context)
    hifi = HifiTuner(HifiTunerParams(steps=4, **SWITCHES_OFF), context)
    ti_state = _trained(ti, dog, tmp_path / "ti")
    hifi_state = _trained(hifi, dog, tmp_path / "hifi")
    assert torch.equal(ti_state.data["vectors"]["final"], hifi_state.data["vectors"]["final"])
    prompts = ["a <sks-dog> on the beach", "a <sks-dog> in the snow"]
    ours = hifi.generate(hifi_state, "final", prompts, [3, 4], FAST)
    theirs = ti.generate(ti_state, "final", prompts, [3, 4], FAST)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(ours), _pixels(theirs)))


def test_all_ones_mask_is_exactly_the_unmasked_loss(context, dog, tmp_path):
    backbone = load_backbone(context.backbone)
    latents = subject_latents(backbone, dog, 64)
    with torch.no_grad():
        hidden = encode_text(backbone.text_encoder, backbone.tokenizer, ["a dog"] * len(latents), backbone.device)
        draws = [torch.Generator().manual_seed(7) for _ in range(2)]
        masked, _ = diffusion_loss(backbone.unet, make_noise_scheduler(backbone), latents, hidden, draws[0],
                                   mask=torch.ones(len(latents), 1, 16, 16))
        plain, _ = diffusion_loss(backbone.unet, make_noise_scheduler(backbone), latents, hidden, draws[1])
    assert torch.equal(masked, plain)
    # Through the whole trainer: all-white masks given with the subject train exactly like no mask.
    folder = tmp_path / "masks"
    folder.mkdir()
    paths = []
    for image in dog.images:
        path = folder / f"{image.stem}.png"
        Image.new("L", Image.open(image).size, 255).save(path)
        paths.append(path)
    ones = dataclasses.replace(dog, masks=tuple(paths))
    params = dict(steps=3, **{**SWITCHES_OFF, "mask_loss": True})
    with_mask = _trained(HifiTuner(HifiTunerParams(**params), context), ones, tmp_path / "a")
    without = _trained(HifiTuner(HifiTunerParams(**{**params, "mask_loss": False}), context), ones, tmp_path / "b")
    assert with_mask.data["hifi"]["masks"]["producer"] == "given with the subject"
    assert torch.equal(with_mask.data["vectors"]["final"], without.data["vectors"]["final"])


def test_mask_loss_uses_the_subject_mask_and_records_its_producer(output_state):
    _, state = output_state
    masks = state.data["hifi"]["masks"]
    assert masks["mask_loss"] and masks["producer"] == "grabcut"
    fractions = masks["latent_foreground_fraction"]  # GrabCut is crude on two teapot photos
    assert len(fractions) == 4 and all(0 < f < 0.95 for f in fractions) and np.mean(fractions) > 0.1


def test_output_embedding_starts_at_the_null_rows_and_reloads(output_state, context):
    method, state = output_state
    backbone = load_backbone(context.backbone)
    with torch.no_grad():
        null = encode_text(backbone.text_encoder, backbone.tokenizer, [""], backbone.device)[0]
    assert torch.equal(state.data["phi_s"], null[-5:])
    assert state.data["c_s"].shape == (5, 32) and not torch.equal(state.data["c_s"], state.data["phi_s"])
    reloaded = method.load_state(state.path, state.subject)
    assert torch.equal(reloaded.data["c_s_steps"], state.data["c_s_steps"])
    assert sorted(p.name for p in state.path.iterdir()) == [
        "state.json", "stepwise_embeddings.safetensors", "subject_embedding.safetensors",
    ]


def test_stepwise_embeddings_differ_per_step_and_drive_each_sampling_step(output_state, context):
    method, state = output_state
    steps = state.data["c_s_steps"]
    assert steps.shape == (4, 5, 32)
    assert state.data["stepwise_timesteps"].tolist() == [751, 501, 251, 1]
    assert all(not torch.equal(steps[i], steps[i + 1]) for i in range(3))
    assert not torch.equal(steps[0], state.data["c_s"])
    backbone = load_backbone(context.backbone)
    seen = []
    hook = backbone.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]).clone()),
        with_kwargs=True,
    )
    try:
        method.generate(state, "final", ["a <sks-teapot> on a table", "a teapot"], [1, 2], FAST)
    finally:
        hook.remove()
    assert len(seen) == 4
    with torch.no_grad():
        hidden = encode_text(backbone.text_encoder, backbone.tokenizer, ["a teapot on a table", "a teapot"], backbone.device)
    for step, context_states in enumerate(seen):
        conditional = context_states[2:]  # [null, null, subject prompt, prior prompt]
        torch.testing.assert_close(conditional[0], with_subject(hidden[:1], steps[step])[0])
        torch.testing.assert_close(conditional[1], hidden[1])  # no placeholder: no c_s
    # Without the switch, sampling uses the final c_s at every step (same training, other images).
    plain = HifiTuner(dataclasses.replace(method.params, stepwise=False), context)
    assert plain.training_fingerprint() == method.training_fingerprint()
    a = method.generate(state, "final", ["a <sks-teapot> on a table"], [1], FAST)
    b = plain.generate(state, "final", ["a <sks-teapot> on a table"], [1], FAST)
    assert not np.array_equal(_pixels(a)[0], _pixels(b)[0])


def test_reference_guidance_skips_live_subjects_by_default(context, dog, tmp_path):
    method = HifiTuner(HifiTunerParams(**{**TINY, "stepwise_iters": 0}, stepwise=False), context)
    state = _trained(method, dog, tmp_path)
    assert dog.kind == "live" and not method.guides(dog)
    guided = method.generate(state, "final", ["a <sks-dog> on the beach"], [5], FAST)
    unguided = HifiTuner(dataclasses.replace(method.params, reference_guidance=False), context)
    plain = unguided.generate(state, "final", ["a <sks-dog> on the beach"], [5], FAST)
    assert np.array_equal(_pixels(guided)[0], _pixels(plain)[0]) and method.last_guidance == []
    assert HifiTuner(dataclasses.replace(method.params, reference_subjects="all"), context).guides(dog)


class CentredSubject(HifiTuner):
    """The tiny random model draws no object for a segmenter to find; this stand-in says the
    subject is a centred disc in the first generation (image 0) and absent in image 1."""

    def _segment(self, images):
        yy, xx = np.mgrid[:64, :64]
        disc = (yy - 32) ** 2 + (xx - 30) ** 2 < 18**2
        return [disc, np.zeros_like(disc)][: len(images)]


def test_reference_guidance_on_an_object_changes_the_subject_region(output_state, context):
    method, state = output_state
    sampler = SamplerConfig(steps=10)
    guided = CentredSubject(dataclasses.replace(method.params, reference_guidance=True), context)
    assert guided.training_fingerprint() == method.training_fingerprint()
    prompts = ["a <sks-teapot> on a table", "a <sks-teapot> in the snow"]
    first = method.generate(state, "final", prompts, [1, 2], sampler)
    second = guided.generate(state, "final", prompts, [1, 2], sampler)
    records = guided.last_guidance
    assert [r["guided"] for r in records] == [True, False]
    assert records[0]["reference"].endswith(".png") and np.array(records[0]["transform"]).shape == (2, 3)
    assert not np.array_equal(_pixels(first)[0], _pixels(second)[0])
    assert np.array_equal(_pixels(first)[1], _pixels(second)[1])  # no subject found: left alone


def test_dreambooth_variant_trains_dreambooth_and_guides_generation(context, teapot, tmp_path):
    params = HifiTunerParams(base="dreambooth", dreambooth_steps=2, dreambooth_class_images=0, segmenter="grabcut",
                             reference_dino="random", reference_guidance=False)
    plain = HifiTuner(params, context)
    state = _trained(plain, teapot, tmp_path)
    assert state.data["hifi"]["base"] == "dreambooth" and list(state.data["checkpoints"]) == ["final"]
    prompts = [plain.render_prompt(p, teapot) for p in teapot.prompts()[:1]]
    assert prompts[0].startswith("a sks teapot")
    sampler = SamplerConfig(steps=10)
    from methods.dreambooth import DreamBooth

    as_dreambooth = DreamBooth(plain._dreambooth().params, context).generate(state, "final", prompts, [1], sampler)
    first = plain.generate(state, "final", prompts, [1], sampler)
    assert np.array_equal(_pixels(first)[0], _pixels(as_dreambooth)[0])  # reference guidance off = DreamBooth
    guided = CentredSubject(dataclasses.replace(params, reference_guidance=True), context)
    second = guided.generate(state, "final", prompts, [1], sampler)
    assert guided.last_guidance[0]["guided"] and not np.array_equal(_pixels(first)[0], _pixels(second)[0])
    assert {"first_generation", "inversion", "guided_generation", "null_text_optimisation"} <= set(guided.last_timings)


def test_dreambooth_base_shares_training_across_reference_guidance(context):
    on = HifiTuner(HifiTunerParams(base="dreambooth"), context)
    off = HifiTuner(HifiTunerParams(base="dreambooth", reference_guidance=False, reg_weight=0.5), context)
    assert on.training_fingerprint() == off.training_fingerprint()
    assert on.fingerprint() != off.fingerprint()
    assert on._dreambooth().params.steps == 400


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"embedding": "token", "stepwise": True, "reg_weight": 0}, "step-wise embeddings need embedding=output"),
        ({"embedding": "token", "stepwise": False}, "reg_weight pulls c_s"),
        ({"reg_weight": -1}, "reg_weight must be >= 0"),
        ({"mask_corruption": "erode:x"}, "mask_corruption:.*not a number"),
        ({"mask_corruption": "erode:2;flip:0.1"}, "takes one corruption"),
        ({"reference_start": 5, "reference_end": 10}, "reference_end <= reference_start"),
        ({"checkpoint_steps": [2]}, "checkpoint_steps are not supported"),
    ],
)
def test_bad_params_fail_at_validation(raw, message):
    with pytest.raises(ParamsError, match=message):
        expand_params(HifiTunerParams, raw, "methods.hifi_tuner.params")


def test_mask_corruption_records_iou(context, teapot, tmp_path):
    method = HifiTuner(HifiTunerParams(**{**TINY, "steps": 1, "stepwise_iters": 0}, mask_corruption="erode:8"), context)
    state = _trained(method, teapot, tmp_path)
    masks = state.data["hifi"]["masks"]
    assert masks["corruption"] == "erode:8" and 0.0 < masks["mean_iou_with_clean"] < 1.0


def test_similarity_fit_recovers_a_known_transform():
    from methods.reference_guidance import fit_similarity, warp
    from metrics.mask_noise import mask_iou

    yy, xx = np.mgrid[:64, :64]
    reference = ((yy - 24) / 10) ** 2 + ((xx - 22) / 6) ** 2 < 1  # an ellipse
    angle, scale, shift = 0.3, 1.4, np.array([10.0, 6.0])
    truth = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0], [scale * np.sin(angle), scale * np.cos(angle), 0]])
    truth[:, 2] = shift
    generated = warp(reference.astype(np.uint8), truth, 64, nearest=True) > 0
    fitted = fit_similarity(reference, generated)
    moved = warp(reference.astype(np.uint8), fitted, 64, nearest=True) > 0
    assert mask_iou(moved, generated) > 0.9
    np.testing.assert_allclose(fitted[:, :2], truth[:, :2], atol=0.06)
    np.testing.assert_allclose(fitted[:, 2], truth[:, 2], atol=1.5)  # pixels
