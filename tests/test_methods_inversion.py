"""DDIM inversion and null-text inversion on the tiny backbone, against diffusers and direct formulas."""

from __future__ import annotations

import copy

import pytest
import torch

from methods.backbones import load_backbone, resolve_backbone
from methods.diffusion import encode_text, subject_latents
from methods.inversion import (
    DdimSchedule,
    InversionError,
    ddim_inversion_step,
    ddim_invert,
    ddim_step,
    masked_mse,
    null_text_inversion,
    optimise_null_step,
    sample_with_nulls,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 10


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(resolve_backbone("tiny"))


@pytest.fixture(scope="module")
def schedule(backbone):
    return DdimSchedule.from_config(backbone.scheduler_config, STEPS)


@pytest.fixture(scope="module")
def inputs(backbone, dog):
    latents = subject_latents(backbone, dog, 64)[:2]
    with torch.no_grad():
        cond = encode_text(backbone.text_encoder, backbone.tokenizer, ["a photo of a dog"] * 2, backbone.device)
        null = encode_text(backbone.text_encoder, backbone.tokenizer, [""], backbone.device)[0]
    return latents, cond, null


def test_ddim_step_equals_diffusers_scheduler(backbone, schedule):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(backbone.scheduler_config)
    scheduler.set_timesteps(STEPS)
    assert schedule.timesteps == tuple(int(t) for t in scheduler.timesteps)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        theirs = scheduler.step(noise, t, latents, eta=0.0).prev_sample
        torch.testing.assert_close(ddim_step(schedule, noise, int(t), latents), theirs, rtol=1e-5, atol=1e-6)


def test_one_inversion_step_is_the_formula(schedule):
    """x_next = √ᾱ_t·(x − √(1−ᾱ_prev)ε)/√ᾱ_prev + √(1−ᾱ_t)ε, with ᾱ read off the table by hand."""
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 4, 4, 4, generator=generator)
    timestep = schedule.timesteps[-3]  # 201 for 10 steps of 1000 (steps_offset 1)
    assert timestep == 201 and schedule.stride == 100
    a_prev, a_next = float(schedule.alphas_cumprod[101]), float(schedule.alphas_cumprod[201])
    expected = a_next**0.5 * (latents - (1 - a_prev) ** 0.5 * noise) / a_prev**0.5 + (1 - a_next) ** 0.5 * noise
    torch.testing.assert_close(ddim_inversion_step(schedule, noise, timestep, latents), expected)
    # The first inversion step starts from the final ᾱ (ᾱ_0 for SD, set_alpha_to_one false).
    first = schedule.timesteps[-1]
    a0 = schedule.final_alpha_cumprod
    assert a0 == pytest.approx(float(schedule.alphas_cumprod[0]))
    a1 = float(schedule.alphas_cumprod[first])
    expected = a1**0.5 * (latents - (1 - a0) ** 0.5 * noise) / a0**0.5 + (1 - a1) ** 0.5 * noise
    torch.testing.assert_close(ddim_inversion_step(schedule, noise, first, latents), expected)


@pytest.fixture(scope="module")
def smooth_unet(backbone):
    """The tiny UNet with its output layer scaled by 0.1. At random init its ε-prediction swings
    between neighbouring noise levels so much that DDIM inversion itself diverges (reconstruction
    error above the latents' variance even at guidance 1); a 10x smaller output makes it the
    smooth denoiser inversion assumes, as a trained SD UNet is. Real weights, no mock."""
    unet = copy.deepcopy(backbone.unet)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet


def test_null_text_reconstruction_beats_plain_ddim_inversion(smooth_unet, schedule, inputs):
    latents, cond, null = inputs
    latents = latents / latents.std()  # SD latents are ~unit std (x 0.18215); the tiny VAE's are not
    trajectory = ddim_invert(smooth_unet, schedule, latents, cond)
    assert len(trajectory) == STEPS + 1 and torch.equal(trajectory[0], latents)
    plain = sample_with_nulls(smooth_unet, schedule, trajectory[-1], cond, null, guidance=7.5)
    # lr 0.1 instead of the paper's 1e-2: the tiny text space (32 dims, random) needs larger
    # steps than CLIP's 768 to move the guidance within N = 10 iterations.
    inverted = null_text_inversion(smooth_unet, schedule, latents, cond, null, trajectory=trajectory, learning_rate=0.1)
    assert len(inverted.null_embeddings) == STEPS
    optimised = sample_with_nulls(smooth_unet, schedule, trajectory[-1], cond, inverted.null_embeddings, 7.5)
    plain_error = masked_mse(plain, latents)
    optimised_error = masked_mse(optimised, latents)
    assert (optimised_error < plain_error / 10).all(), (plain_error, optimised_error)
    # Per-step embeddings start from ∅ and move.
    assert not torch.equal(inverted.null_embeddings[0][0], null)


def test_batched_null_text_equals_one_image_at_a_time(backbone, schedule, inputs):
    latents, cond, null = inputs
    target = ddim_invert(backbone.unet, schedule, latents, cond)
    start, goal, t = target[-1], target[-2], schedule.timesteps[0]
    both, _ = optimise_null_step(
        backbone.unet, schedule, start, t, cond, null.expand(2, -1, -1), goal,
        guidance=7.5, iterations=5, learning_rate=1e-2,
    )
    alone, _ = optimise_null_step(
        backbone.unet, schedule, start[1:], t, cond[1:], null.unsqueeze(0), goal[1:],
        guidance=7.5, iterations=5, learning_rate=1e-2,
    )
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-5)


def test_all_ones_mask_is_the_unmasked_loss_and_mask_restricts_it():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    assert torch.equal(masked_mse(a, b, torch.ones(2, 1, 8, 8)), masked_mse(a, b))
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1
    expected = ((a - b) ** 2)[..., :4].mean(dim=(1, 2, 3))
    torch.testing.assert_close(masked_mse(a, b, half), expected)


def test_bad_shapes_name_the_argument(backbone, schedule):
    with pytest.raises(InversionError, match="cond must be"):
        ddim_invert(backbone.unet, schedule, torch.zeros(2, 4, 8, 8), torch.zeros(3, 77, 32))
    with pytest.raises(InversionError, match="steps must be >= 1"):
        DdimSchedule.from_config(backbone.scheduler_config, 0)
