"""Image generation through diffusers' ``StableDiffusionPipeline``, one seeded generator per image.

Every method samples through here, so that sampler settings mean the same thing everywhere:
the scheduler named by ``SamplerConfig.name`` built from the backbone's scheduler config,
``guidance`` as classifier-free guidance scale, ``eta`` for DDIM. Image ``i``'s initial latent
is drawn from a CPU ``torch.Generator`` seeded with ``seeds[i]`` (so it is the same on any
device), and that generator also feeds any later noise of image ``i`` (DDIM with eta > 0).

Batch independence: image ``i`` depends only on (prompt ``i``, seed ``i``) mathematically. In
floating point, matrix multiplies pick kernels by batch size (MKL on CPU, cuBLAS on GPU), so an
image generated in a different batch can differ in the last bits of its latents. On the tiny
test backbone the uint8 images are then equal or one level apart in a few pixels (tested); a
real model over 50 steps, in bf16, may drift a little more (not measured here). Generating one
image per call would be bit-exact but throws the batching away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image

from methods.backbones import Backbone
from methods.base import SamplerConfig
from methods.diffusion import frozen_dtype

# SamplerConfig.name -> diffusers scheduler class; "ddim" is the protocol's sampler.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
}


class SamplerError(ValueError):
    """A sampler configuration that cannot be used, naming the value and the valid ones."""


def make_scheduler(scheduler_config: dict, sampler: SamplerConfig):
    if sampler.name not in SCHEDULERS:
        raise SamplerError(f"unknown sampler {sampler.name!r}; valid: {', '.join(SCHEDULERS)}")
    if sampler.steps < 1:
        raise SamplerError(f"sampler steps must be >= 1, got {sampler.steps}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[sampler.name]).from_config(scheduler_config)


def build_pipeline(
    backbone: Backbone,
    sampler: SamplerConfig,
    *,
    unet: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    tokenizer=None,
):
    """A ``StableDiffusionPipeline`` over the backbone's modules, with any of them replaced.

    Building one is cheap (no weights are copied); the pipeline never owns the shared modules,
    so callers must not use API that modifies them in place (e.g. ``load_lora_weights``) unless
    they passed their own copies.
    """
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=text_encoder if text_encoder is not None else backbone.text_encoder,
        tokenizer=tokenizer if tokenizer is not None else backbone.tokenizer,
        unet=unet if unet is not None else backbone.unet,
        scheduler=make_scheduler(backbone.scheduler_config, sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers/transformers info logs and progress bars while loading adapters."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars:
            transformers_logging.enable_progress_bar()


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(seed) % (1 << 64)) for seed in seeds]


def initial_latents(generators: Sequence[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    """One fp32 standard-normal latent per generator, drawn on the CPU (device-independent)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def generate_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerConfig,
    resolution: int,
    *,
    adjust_initial_latents: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """One PIL image per (prompt, seed), all in one pipeline call.

    With ``prompt_embeds`` in ``pipeline_kwargs`` (methods that condition in the text encoder's
    output space, e.g. HiFi Tuner) the prompts only count the images; the embeddings are used.
    ``adjust_initial_latents`` may change the seeded initial latents (on the UNet's device and
    dtype, before the pipeline scales them by the scheduler's ``init_noise_sigma``), e.g. a
    guidance step on x_T; ``pipeline_kwargs`` go to the pipeline (e.g. ``callback_on_step_end``;
    ``output_type="latent"`` returns latents instead of images, for callers that only observe).
    """
    prompts = list(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if not prompts:
        return []
    scale = pipeline.vae_scale_factor
    if resolution % scale:
        raise SamplerError(f"resolution {resolution} is not a multiple of the VAE factor {scale}")
    generators = seeded_generators(seeds)
    channels = pipeline.unet.config.in_channels
    latents = initial_latents(generators, (channels, resolution // scale, resolution // scale))
    unet_dtype = frozen_dtype(pipeline.unet)
    latents = latents.to(device=pipeline.unet.device, dtype=unet_dtype)
    if adjust_initial_latents is not None:
        latents = adjust_initial_latents(latents)
    output = pipeline(
        prompt=None if "prompt_embeds" in pipeline_kwargs else prompts,
        height=resolution,
        width=resolution,
        num_inference_steps=sampler.steps,
        guidance_scale=sampler.guidance,
        eta=sampler.eta,
        generator=generators,
        latents=latents,
        **{"output_type": "pil", **pipeline_kwargs},
    )
    return list(output.images)
