"""Shared diffusion plumbing: latents, objective, sampling, class-prior cache, training params."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data.subjects import load_subjects
from methods.backbones import load_backbone, resolve_backbone
from methods.base import MethodContext, ParamsError, SamplerConfig, expand_params
from methods.class_prior import class_prior_images
from methods.diffusion import (
    diffusion_loss,
    fp32_trainable_copy,
    gradient_checkpointing,
    make_noise_scheduler,
    prediction_target,
    subject_latents,
    working_copy,
)
from methods.dreambooth import DreamBooth, DreamBoothLoRA, DreamBoothLoRAParams, DreamBoothParams
from methods.sampling import SamplerError, build_pipeline, generate_images
from methods.textual_inversion import TextualInversion, TextualInversionParams
from methods.training import TrainingParams, build_optimizer, train_loop

FAST = SamplerConfig(steps=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(resolve_backbone("tiny"))


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------- latents


def test_subject_latents_encoded_once_scaled_and_keyed(backbone, dog):
    latents = subject_latents(backbone, dog, 64)
    assert latents.shape == (4, 4, 16, 16) and latents.dtype == torch.float32
    assert subject_latents(backbone, dog, 64) is latents  # cached, not re-encoded
    from data.images import load_image, to_tensor

    pixels = to_tensor([load_image(dog.images[0], 64)]) * 2 - 1
    with torch.no_grad():
        mean = backbone.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(latents[:1], mean * backbone.vae.config.scaling_factor)
    flipped = subject_latents(backbone, dog, 64, flip=True)
    assert not torch.equal(flipped, latents)
    sampled = subject_latents(backbone, dog, 64, mode="sample", seed=1)
    assert not torch.equal(sampled, latents)
    assert torch.equal(sampled, subject_latents(backbone, dog, 64, mode="sample", seed=1))
    assert not torch.equal(sampled, subject_latents(backbone, dog, 64, mode="sample", seed=2))


# ----------------------------------------------------------------------------- objective


def test_prediction_targets_follow_the_scheduler(backbone):
    scheduler = make_noise_scheduler(backbone)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    assert prediction_target(scheduler, latents, noise, timesteps) is noise
    from diffusers import DDPMScheduler

    v_scheduler = DDPMScheduler.from_config({**backbone.scheduler_config, "prediction_type": "v_prediction"})
    alphas = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    torch.testing.assert_close(prediction_target(v_scheduler, latents, noise, timesteps), expected)
    bad = DDPMScheduler.from_config({**backbone.scheduler_config, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="sample"):
        prediction_target(bad, latents, noise, timesteps)


def test_loss_weights_and_mask(backbone, dog):
    scheduler = make_noise_scheduler(backbone)
    latents = subject_latents(backbone, dog, 64)[:2]
    hidden = torch.randn(2, 77, 32)

    def loss(**kwargs):
        with torch.no_grad():
            return diffusion_loss(backbone.unet, scheduler, latents, hidden, torch.Generator().manual_seed(0), **kwargs)

    mean, per_sample = loss()
    torch.testing.assert_close(mean, per_sample.mean())
    weighted, _ = loss(weights=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(weighted, per_sample[1])
    masked, _ = loss(mask=torch.zeros(2, 1, 16, 16))
    assert float(masked) == 0.0


def test_gradient_checkpointing_same_gradient_and_restored(backbone, dog):
    scheduler = make_noise_scheduler(backbone)
    latents = subject_latents(backbone, dog, 64)[:2]

    def gradient():
        hidden = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        loss, _ = diffusion_loss(backbone.unet, scheduler, latents, hidden, torch.Generator().manual_seed(0))
        loss.backward()
        return hidden.grad

    plain = gradient()
    with gradient_checkpointing(backbone.unet, True):
        assert backbone.unet.is_gradient_checkpointing
        checkpointed = gradient()
    assert not backbone.unet.is_gradient_checkpointing
    torch.testing.assert_close(plain, checkpointed)


# ----------------------------------------------------------------------------- sampling


def test_generation_is_seeded_per_image(backbone):
    pipeline = build_pipeline(backbone, FAST)
    prompts, seeds = ["a dog in the jungle", "a red teapot"], [11, 22]
    batch = generate_images(pipeline, prompts, seeds, FAST, 64)
    again = generate_images(pipeline, prompts, seeds, FAST, 64)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(batch, again))
    alone = generate_images(pipeline, prompts[1:], seeds[1:], FAST, 64)[0]
    # Not bit-identical in general: BLAS picks kernels by batch size (see methods.sampling).
    difference = np.abs(_pixels(batch[1]) - _pixels(alone))
    assert difference.max() <= 1, difference.max()
    other_seed = generate_images(pipeline, prompts[1:], [23], FAST, 64)[0]
    assert np.abs(_pixels(other_seed) - _pixels(alone)).mean() > 5


def test_images_equal_the_pipelines_own_pil_output(backbone):
    """``generate_images`` makes uint8 on the device (``pil_images``); the reference is the same
    pipeline call with diffusers' own ``output_type="pil"`` conversion: bit-identical."""
    from methods.sampling import initial_latents, seeded_generators

    pipeline = build_pipeline(backbone, FAST)
    prompts, seeds = ["a dog in the jungle", "a red teapot"], [11, 22]
    ours = generate_images(pipeline, prompts, seeds, FAST, 64)
    latents = initial_latents(seeded_generators(seeds), (4, 64 // pipeline.vae_scale_factor, 64 // pipeline.vae_scale_factor))
    theirs = pipeline(prompt=prompts, height=64, width=64, num_inference_steps=FAST.steps, guidance_scale=FAST.guidance,
                      eta=FAST.eta, generator=seeded_generators(seeds), latents=latents.to(pipeline.unet.dtype),
                      output_type="pil").images
    assert all(a.mode == b.mode == "RGB" for a, b in zip(ours, theirs))
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pil_images_round_as_diffusers_does(dtype):
    """On exact half levels too (k + 0.5)/255, where rounding half-to-even decides."""
    from diffusers.image_processor import VaeImageProcessor

    from methods.sampling import pil_images

    pixels = torch.rand(3, 3, 17, 19, generator=torch.Generator().manual_seed(0))
    pixels[0, 0, 0, :10] = (torch.arange(10) + 0.5) / 255
    pixels[1, :, 0, 0] = torch.tensor([0.0, 1.0, 0.5])
    pixels = pixels.to(dtype)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(pixels))
    ours = pil_images(pixels)
    assert [im.size for im in ours] == [(19, 17)] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))
    gray = pil_images(pixels[:, :1])
    assert gray[0].mode == "L" and np.array_equal(
        np.asarray(gray[0]), np.asarray(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(pixels[:1, :1]))[0]))


def test_ddim_eta_noise_stays_per_image(backbone):
    sampler = SamplerConfig(steps=8, eta=1.0)
    pipeline = build_pipeline(backbone, sampler)
    batch = generate_images(pipeline, ["a", "b", "c"], [1, 2, 3], sampler, 64)
    alone = generate_images(pipeline, ["c"], [3], sampler, 64)[0]
    assert np.abs(_pixels(batch[2]) - _pixels(alone)).max() <= 1
    deterministic = generate_images(pipeline, ["c"], [3], FAST, 64)[0]
    assert not np.array_equal(_pixels(deterministic), _pixels(alone))


def test_bad_sampler_inputs(backbone):
    with pytest.raises(SamplerError, match="'heun'.*valid: ddim"):
        build_pipeline(backbone, SamplerConfig(name="heun"))
    pipeline = build_pipeline(backbone, FAST)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate_images(pipeline, ["a", "b"], [1], FAST, 64)
    with pytest.raises(SamplerError, match="resolution 66"):
        generate_images(pipeline, ["a"], [1], FAST, 66)


# ----------------------------------------------------------------------------- class prior


def test_class_prior_cache_is_shared_and_never_regenerated(backbone, tmp_path):
    first = class_prior_images(backbone, "dog", 3, cache_dir=tmp_path, resolution=64, sampler=FAST)
    assert first.generated == 3 and len(first.paths) == 3 and first.prompt == "a dog"
    stamps = [p.stat().st_mtime_ns for p in first.paths]
    again = class_prior_images(backbone, "dog", 3, cache_dir=tmp_path, resolution=64, sampler=FAST)
    assert again.generated == 0 and again.paths == first.paths
    assert [p.stat().st_mtime_ns for p in again.paths] == stamps
    fewer = class_prior_images(backbone, "dog", 2, cache_dir=tmp_path, resolution=64, sampler=FAST)
    assert fewer.generated == 0 and fewer.paths == first.paths[:2]
    more = class_prior_images(backbone, "dog", 5, cache_dir=tmp_path, resolution=64, sampler=FAST)
    assert more.generated == 2 and [p.stat().st_mtime_ns for p in more.paths[:3]] == stamps
    # Image k depends only on k: a fresh cache generating 5 at once makes the same files.
    fresh = class_prior_images(backbone, "dog", 5, cache_dir=tmp_path / "fresh", resolution=64, sampler=FAST)
    for a, b in zip(fresh.paths, more.paths):
        assert np.abs(_pixels(_open(a)) - _pixels(_open(b))).max() <= 1
    other_class = class_prior_images(backbone, "teapot", 1, cache_dir=tmp_path, resolution=64, sampler=FAST)
    other_sampler = class_prior_images(
        backbone, "dog", 1, cache_dir=tmp_path, resolution=64, sampler=SamplerConfig(steps=9)
    )
    assert len({first.folder, other_class.folder, other_sampler.folder}) == 3
    assert other_sampler.generated == 1
    with pytest.raises(ValueError, match="class noun"):
        class_prior_images(backbone, " ", 1, cache_dir=tmp_path, resolution=64)


def _open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


# ----------------------------------------------------------------------------- training params


def test_training_params_validate_checkpoint_steps():
    with pytest.raises(ParamsError, match=r"checkpoint_steps \[50\].*steps=40"):
        TrainingParams(steps=40, checkpoint_steps=(10, 50))
    with pytest.raises(ParamsError, match="checkpoint_steps"):
        expand_params(TrainingParams, {"steps": 40, "checkpoint_steps": [10, 50]}, "methods.x.params")
    with pytest.raises(ParamsError, match="positive"):
        TrainingParams(steps=40, checkpoint_steps=(0,))
    params = TrainingParams(steps=40, checkpoint_steps=(40, 20, 10, 20))
    assert params.checkpoint_steps == (10, 20, 40)
    assert params.checkpoint_names() == ["step-10", "step-20", "final"]
    assert params.save_steps() == [10, 20, 40]
    assert params.checkpoint_step("step-40") == params.checkpoint_step("final") == 40
    with pytest.raises(ValueError, match="'step-30'.*valid: step-10, step-20, final"):
        params.checkpoint_step("step-30")
    grid = expand_params(TrainingParams, {"steps": 40, "checkpoint_steps": [[10], [20]]}, "m")
    assert [g for _, g in grid] == [{"checkpoint_steps": [10]}, {"checkpoint_steps": [20]}]


def test_optimizer_and_loop_guards(backbone):
    params = TrainingParams(optimizer="adamw8bit")
    tensor = torch.zeros(3, requires_grad=True)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="bitsandbytes"):
            build_optimizer([tensor], params, 1e-3)
    with pytest.raises(ValueError, match="fp32 master weights"):
        train_loop(
            unet=backbone.unet,
            noise_scheduler=make_noise_scheduler(backbone),
            parameters=[torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)],
            params=TrainingParams(steps=1),
            learning_rate=1e-3,
            next_batch=lambda step: None,
            encode_prompts=lambda prompts: None,
            generator=torch.Generator(),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )


# ----------------------------------------------------------------------------- precision and attention


def test_mixed_precision_path_runs_in_bfloat16(tmp_path):
    """The GPU recipe on a CPU: bf16 frozen modules, fp32 trainable tensors, bf16 autocast."""
    dog = load_subjects("mini", subjects=["dog"])[0]
    context = MethodContext(
        backbone=resolve_backbone("tiny"), resolution=64, dtype="bfloat16", cache_dir=tmp_path / "cache"
    )
    prior = {"class_images": 2, "class_image_steps": 3}
    methods = [
        TextualInversion(TextualInversionParams(steps=3, gradient_checkpointing=True), context),
        DreamBooth(DreamBoothParams(steps=3, train_text_encoder=True, gradient_checkpointing=True, **prior), context),
        DreamBoothLoRA(DreamBoothLoRAParams(steps=3, train_text_encoder=True, **prior), context),
    ]
    for method in methods:
        workdir = tmp_path / method.name
        workdir.mkdir()
        method.prepare(dog, workdir, seed=0)
        state = method.load_state(workdir, dog)
        assert all(np.isfinite(state.data["losses"])) and len(state.data["losses"]) == 3
        prompt = method.render_prompt(dog.prompts()[0], dog)
        assert method.generate(state, "final", [prompt], [1], FAST)[0].size == (64, 64)
    assert load_file(str(tmp_path / "dreambooth" / "unet-final.safetensors"))["conv_in.weight"].dtype == torch.bfloat16
    assert next(iter(load_file(str(tmp_path / "textual_inversion" / "learned_embeds.safetensors")).values())).dtype == torch.float32


def test_attention_runs_through_sdpa(backbone):
    for unet in (backbone.unet, working_copy(backbone.unet), fp32_trainable_copy(backbone, "unet")):
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_fp32_master_copy_starts_from_fp32_weights():
    spec = resolve_backbone("tiny")
    half = load_backbone(spec, "cpu", torch.bfloat16)
    full = load_backbone(spec, "cpu", torch.float32)
    copy = fp32_trainable_copy(half, "unet")
    assert all(p.dtype == torch.float32 and p.requires_grad for p in copy.parameters())
    reference = full.unet.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in copy.state_dict().items())
    assert not any(p.requires_grad for p in half.unet.parameters())  # the shared module is untouched
