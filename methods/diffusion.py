"""Shared diffusion plumbing: noise scheduler, training objective, precision, cached VAE latents.

Conventions every method inherits from here (documented once, not per method):

- **Latents.** Training images are encoded once per (backbone, device, dtype, images,
  resolution, flip, latent mode) and kept in memory for the process. ``mode="mean"`` (default)
  takes the mean of the VAE posterior, which makes the cache exact; ``mode="sample"`` draws one
  posterior sample per image from a CPU generator seeded by (seed, image index), so it is
  device- and batch-independent. This differs from the diffusers examples, which re-sample the
  posterior every step (augmentation by VAE noise, not measured here); it saves the encoder
  pass per step. Latents are scaled by ``vae.config.scaling_factor``.
- **Objective.** Noise and timesteps are drawn on a CPU generator (so a CPU and a GPU run see the
  same draws), timesteps uniform in [0, num_train_timesteps), the target follows the scheduler's
  ``prediction_type`` (epsilon, or v for v-prediction backbones such as SD 2.1-768); squared
  error is computed in fp32.
- **Precision.** Frozen modules run in the context dtype (bf16 on CUDA). Trainable parameters
  are kept in fp32 (master weights) and the forward runs under ``torch.autocast`` in the context
  dtype, which is mixed-precision training; fp16 adds a gradient scaler. fp32 contexts (CPU) run
  without autocast.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from data.images import load_image, to_tensor
from data.protocol import derive_seed
from data.subjects import Subject
from methods.backbones import Backbone, load_backbone

LATENT_MODES = ("mean", "sample")
_ENCODE_BATCH = 8


# ----------------------------------------------------------------------------- precision


def autocast_context(device: torch.device, dtype: torch.dtype, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for mixed precision; a no-op in fp32. ``cache=False`` turns off
    autocast's cache of weight casts, which a step captured as a CUDA graph must not use
    (PyTorch's CUDA-graph notes); the values are the same either way."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def fp32_trainable_copy(backbone: Backbone, part: str) -> torch.nn.Module:
    """A trainable fp32 copy of ``backbone.<part>`` on the backbone's device.

    The copy is made from fp32 weights (a CPU fp32 load of the same spec when the shared backbone
    is in bf16/fp16), so master weights start from the original values, not a bf16 rounding.
    """
    module = copy.deepcopy(getattr(backbone, part))
    if backbone.dtype != torch.float32:
        # Upcast on the device, then overwrite with the fp32 values: one host-to-device copy and
        # no second full copy in host memory.
        module.to(torch.float32)
        reference = getattr(load_backbone(backbone.spec, "cpu", torch.float32), part)
        module.load_state_dict(reference.state_dict())
    module.requires_grad_(True)
    module.train()
    return module


def working_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy in the module's own dtype/device, to hold per-subject weights for sampling."""
    copied = copy.deepcopy(module)
    copied.requires_grad_(False)
    copied.eval()
    return copied


@contextlib.contextmanager
def gradient_checkpointing(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Turn diffusers/transformers gradient checkpointing on for the block, restoring it after.

    Used on shared frozen modules too (Textual Inversion back-propagates through the frozen
    UNet): the flag changes memory use, never the result.
    """
    if not enabled:
        yield
        return
    # diffusers models, then transformers (which renamed the method in 5.x).
    names = (
        ("enable_gradient_checkpointing", "disable_gradient_checkpointing"),
        ("activation_checkpointing_enable", "activation_checkpointing_disable"),
        ("gradient_checkpointing_enable", "gradient_checkpointing_disable"),
    )
    enable, disable = next(pair for pair in names if hasattr(module, pair[0]))
    getattr(module, enable)()
    try:
        yield
    finally:
        getattr(module, disable)()


# ----------------------------------------------------------------------------- objective


def make_noise_scheduler(backbone: Backbone):
    """The training noise schedule: DDPM built from the backbone's scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(backbone.scheduler_config)


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"scheduler prediction_type {prediction_type!r} is not supported for training; "
        "expected 'epsilon' or 'v_prediction'"
    )


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor.to(device, dtype)`` without a stream synchronisation for host tensors bound for CUDA.

    A copy from pageable host memory makes the CUDA stream synchronise before it starts, so the
    host cannot queue the next kernels while the GPU works: the per-step noise, timesteps and
    loss weights (drawn on CPU generators for device independence) made every training step
    wait for the previous one. Staging through pinned memory and copying asynchronously keeps
    the values bit for bit and lets the host run ahead (the caching host allocator keeps the
    pinned buffer alive until its copy has finished).
    """
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device=device, dtype=dtype) if dtype is not None else tensor.to(device=device)


def draw_noise_and_timesteps(
    noise_scheduler, latents: torch.Tensor, generator: torch.Generator,
    noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's noise and timesteps: those given, else drawn from ``generator`` on the CPU
    (noise first, then timesteps: the one order every path uses, so a step whose draws are made
    ahead of it — a captured step — sees the same numbers as one that draws inside the loss)."""
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    return noise, timesteps


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-sample loss) of the denoising objective on one batch.

    ``weights`` (B,) combine per-sample losses (prior preservation: 1/n for instance samples,
    λ/n for class samples); without them the loss is the batch mean. ``mask`` (B,1,h,w) weights
    the squared error spatially (mask-guided losses). ``timesteps``/``noise`` may be fixed by
    callers that probe the loss on a fixed draw.
    """
    device = latents.device
    noise, timesteps = draw_noise_and_timesteps(noise_scheduler, latents, generator, noise, timesteps)
    noise = to_device(noise, device, latents.dtype)
    timesteps = to_device(timesteps, device, torch.long)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    unet_dtype = frozen_dtype(unet)
    prediction = unet(
        noisy.to(unet_dtype, memory_format=input_layout(unet)), timesteps, encoder_hidden_states.to(unet_dtype),
        return_dict=False,
    )[0]
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if mask is not None:
        squared = squared * to_device(mask, device, squared.dtype)
    per_sample = squared.mean(dim=tuple(range(1, squared.ndim)))
    if weights is None:
        return per_sample.mean(), per_sample.detach()
    return (per_sample * to_device(weights, device, per_sample.dtype)).sum(), per_sample.detach()


def fixed_draw_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    seed: int,
    draws: int = 8,
) -> float:
    """The objective on a fixed draw of (timestep, noise) per latent: a low-variance probe for
    comparing parameters (e.g. before vs after training) on exactly the same noise."""
    generator = torch.Generator().manual_seed(seed)
    repeated = latents.repeat_interleave(draws, dim=0)
    hidden = encoder_hidden_states.repeat_interleave(draws, dim=0)
    with torch.no_grad():
        loss, _ = diffusion_loss(unet, noise_scheduler, repeated, hidden, generator)
    return float(loss)


def input_layout(unet: torch.nn.Module) -> torch.memory_format:
    """``channels_last`` for a UNet whose input convolution's weight is in that layout
    (``methods.sampling.maybe_compiled(..., channels_last=True)``), else the input's own layout."""
    weight = getattr(getattr(unet, "conv_in", None), "weight", None)
    if weight is not None and weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) \
            and not weight.is_contiguous():
        return torch.channels_last
    return torch.preserve_format


def frozen_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's frozen weights (LoRA/TI parameters may be fp32 on a bf16 base)."""
    dtypes = {p.dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()}
    if len(dtypes) == 1:
        return dtypes.pop()
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


# ----------------------------------------------------------------------------- text


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length (77 for CLIP), as the SD pipelines do."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_text(text_encoder: torch.nn.Module, tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """The last hidden state of the text encoder (what SD's cross-attention reads)."""
    return text_encoder(to_device(tokenize(tokenizer, prompts), torch.device(device)), return_dict=False)[0]


class CachedTextEncoding:
    """Prompt embeddings of a frozen text encoder, computed once per distinct prompt."""

    def __init__(self, text_encoder: torch.nn.Module, tokenizer, device: torch.device):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with torch.no_grad():
                encoded = encode_text(self.text_encoder, self.tokenizer, missing, self.device)
            self._cache.update(zip(missing, encoded))
        return torch.stack([self._cache[p] for p in prompts])


# ----------------------------------------------------------------------------- latents

_LATENT_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_LATENT_CACHE_SIZE = 64
_LATENT_LOCK = threading.Lock()


def encode_pixels(
    backbone: Backbone,
    pixels: torch.Tensor,
    mode: str = "mean",
    sample_seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Scaled fp32 latents of images in [-1, 1] (N,3,H,W), encoded in batches of 8."""
    if mode not in LATENT_MODES:
        raise ValueError(f"latent mode {mode!r} is not one of {LATENT_MODES}")
    vae = backbone.vae
    out = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], _ENCODE_BATCH):
            chunk = pixels[start : start + _ENCODE_BATCH].to(backbone.device, backbone.dtype)
            distribution = vae.encode(chunk).latent_dist
            latents = distribution.mean.float()
            if mode == "sample":
                noise = torch.stack(
                    [
                        torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed))
                        for seed in sample_seeds[start : start + _ENCODE_BATCH]
                    ]
                ).to(latents.device)
                latents = latents + distribution.std.float() * noise
            out.append(latents * vae.config.scaling_factor)
    return torch.cat(out)


def _pixels(paths: Sequence[Path], resolution: int, flip: bool) -> torch.Tensor:
    images = [load_image(path, resolution) for path in paths]
    if flip:
        from PIL import Image

        images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
    return to_tensor(images) * 2.0 - 1.0


def image_latents(
    backbone: Backbone,
    paths: Sequence[Path],
    resolution: int,
    *,
    flip: bool = False,
    mode: str = "mean",
    seed: int = 0,
    cache_key: tuple | None = None,
) -> torch.Tensor:
    """Latents (N,4,h,w, fp32, on the backbone's device) of image files, cached per process.

    ``cache_key`` identifies the images' content (default: their paths, for files that never
    change once written, like class-prior images).
    """
    identity = cache_key if cache_key is not None else ("files", tuple(str(p) for p in paths))
    key = (
        backbone.spec,
        str(backbone.device),
        backbone.dtype,
        identity,
        resolution,
        flip,
        mode,
        seed if mode == "sample" else None,
    )
    with _LATENT_LOCK:
        if key in _LATENT_CACHE:
            _LATENT_CACHE.move_to_end(key)
            return _LATENT_CACHE[key]
    seeds = [derive_seed("vae-sample", seed, index, flip) for index in range(len(paths))]
    latents = encode_pixels(backbone, _pixels(paths, resolution, flip), mode, seeds)
    with _LATENT_LOCK:
        _LATENT_CACHE[key] = latents
        while len(_LATENT_CACHE) > _LATENT_CACHE_SIZE:
            _LATENT_CACHE.popitem(last=False)
    return latents


def subject_latents(
    backbone: Backbone,
    subject: Subject,
    resolution: int,
    *,
    flip: bool = False,
    mode: str = "mean",
    seed: int = 0,
) -> torch.Tensor:
    """Latents of a subject's images (optionally mirrored), keyed by the subject's image hash."""
    identity = ("subject", subject.data_sha, tuple(str(p) for p in subject.images))
    return image_latents(
        backbone, subject.images, resolution, flip=flip, mode=mode, seed=seed, cache_key=identity
    )


def clear_latent_cache() -> None:
    with _LATENT_LOCK:
        _LATENT_CACHE.clear()


def cycle_indices(count: int, generator: torch.Generator) -> Callable[[], int]:
    """Indices in successive random permutations of range(count), like a shuffled data loader."""
    order: list[int] = []

    def draw() -> int:
        if not order:
            order.extend(torch.randperm(count, generator=generator).tolist())
        return order.pop(0)

    return draw
