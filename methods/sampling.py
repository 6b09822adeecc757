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

Compiled sampling (``generation.compile``, on by default on CUDA): ``build_pipeline(...,
compile_unet=True)`` puts a ``torch.compile``'d view of the UNet in the pipeline
(``compiled_unet``; default inductor mode, static shapes, the up blocks' channel concatenations
laid out channels-last by ``methods.compile_layout.ChannelsLastCat``: H100 −2.5 % per UNet forward;
its large GroupNorms as ``methods.fused_norm``'s Triton kernels: H100 0.2128 → 0.2082 s per image) and
decodes through a compiled view of the VAE's decoder (``with_compiled_decoder``; H200: −3 % per
image, peak memory 18 → 12 GiB at batch 32). The algorithm and the weights are the
same; kernels differ, so images move like they do between two fast-mode runs (H200, ``sd15``
architecture, batch 32, DDIM 50: max 13 uint8 levels, mean 0.99 vs eager; H100 with the
channels-last concatenations (and channels-last UNet weights): max 14, mean 1.004, against 12 and
1.006 for the compile without them in the same process; with the GroupNorm kernels too: max 14, mean 1.015 — two fast-mode runs differed by up to 13, fast vs deterministic by 14;
``benchmarks/results``), and on the tiny backbone on CPU within the tolerance
``tests/test_sampling_compile.py`` states. Modules of one architecture share the compiled code,
so a new working copy per subject costs no recompile; the compiled artifacts persist in
``TORCHINDUCTOR_CACHE_DIR`` (the harness points it into its cache), so a later process pays the
warm-cache cost (H200: 21 s) rather than a cold compile (65 s). If compiling fails (no compiler
toolchain, an unsupported op), the call warns once and runs eager: slower, never wrong.

Images leave the pipeline as [0, 1] tensors and become uint8 on the device (``pil_images``,
bit-identical to diffusers' PIL conversion), so the host copies a quarter of the bytes and does
no float work per pixel before the image writer's threads encode the PNGs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

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


log = logging.getLogger(__name__)

# torch.compile options of the sampling UNet; tests may swap the backend.
COMPILE_OPTIONS: dict = {"dynamic": False}
_compile_failed: list[str] = []  # the first failure's message; non-empty = eager from now on


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
    compile_unet: bool = False,
):
    """A ``StableDiffusionPipeline`` over the backbone's modules, with any of them replaced.

    ``compile_unet``: the pipeline samples through ``compiled_unet(unet)`` and decodes through
    ``with_compiled_decoder(backbone.vae)`` (the module docstring says what that changes);
    callers that hook into the UNet per call (attention control, guidance callbacks) leave it off.

    Building one is cheap (no weights are copied); the pipeline never owns the shared modules,
    so callers must not use API that modifies them in place (e.g. ``load_lora_weights``) unless
    they passed their own copies.
    """
    from diffusers import StableDiffusionPipeline

    compiling = compile_unet and not _compile_failed  # maybe_compiled's own test, once for both modules
    pipeline = StableDiffusionPipeline(
        vae=with_compiled_decoder(backbone.vae) if compiling else backbone.vae,
        text_encoder=text_encoder if text_encoder is not None else backbone.text_encoder,
        tokenizer=tokenizer if tokenizer is not None else backbone.tokenizer,
        unet=maybe_compiled(unet if unet is not None else backbone.unet, compiling, inference=True),
        scheduler=make_scheduler(backbone.scheduler_config, sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def set_compile_cache(cache_dir: Path | None) -> None:
    """Keep inductor's compiled artifacts in ``cache_dir/inductor`` unless the user chose a place."""
    if cache_dir is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "inductor")


def compiled_unet(unet: torch.nn.Module, *, inference: bool = False) -> torch.nn.Module:
    """A ``torch.compile``'d view of ``unet`` (same parameters, same module underneath).

    A new wrapper per call, which costs nothing: dynamo keeps the compiled code on the UNet
    class's ``forward``, shared by every module of that architecture (no recompile; tested). The
    wrapper is deliberately not cached per module: a cache keyed by the module whose value (the
    wrapper) holds the module keeps every working copy alive — it did, +1.7 GB of GPU memory per
    DreamBooth subject on the H200 (``benchmarks/results``), until this was changed.

    ``inference=True`` (sampling): inductor also runs ``methods.compile_layout.ChannelsLastCat``,
    which lays the up blocks' channel concatenations out channels-last on CUDA (the same values;
    H100: 132.7 → 129.4 ms per 64-latent forward; end to end with channels-last weights as well,
    0.2190 → 0.2116 s per image; ``benchmarks/results``), and ``methods.fused_norm.FusedGroupNorm``,
    which runs the GroupNorms (+ SiLU, + the conv bias and time embedding before them) of 32x32
    pixels and more as its Triton kernels on CUDA (H100, 32 images per call: 0.2128 → 0.2082 s per
    image, the suite's own path, one process). Training compiles keep inductor's defaults (neither
    pass is measured there; the GroupNorm op has no backward).
    """
    return torch.compile(unet, **_compile_options(inference))


def _compile_options(inference: bool) -> dict:
    options = dict(COMPILE_OPTIONS)
    if inference and options.get("backend", "inductor") == "inductor":  # tests may swap the backend
        from methods.compile_layout import channels_last_cat
        from methods.fused_norm import fused_group_norm

        options["options"] = {**options.get("options", {}), "post_grad_custom_pre_pass": channels_last_cat(),
                              "pre_grad_custom_pass": fused_group_norm()}
    return options


def maybe_compiled(unet: torch.nn.Module, wanted: bool, *, channels_last: bool = False,
                   inference: bool = False) -> torch.nn.Module:
    """``compiled_unet(unet, inference=inference)`` if ``wanted`` and no compile has failed in this
    process, else ``unet``.

    ``channels_last=True`` (for a module the caller owns, e.g. a fine-tune's private copy): when
    it will be compiled, its 4-D weights are first converted in place to ``channels_last``
    (``diffusion_loss`` then feeds its inputs in the same layout). Compiled and on cuDNN, a
    DreamBooth step in the default layout still spends ~10 of its 51 ms of kernels on cuDNN's
    NCHW↔NHWC transposes; with channels-last weights the step's kernels are 42 ms (H200,
    ``benchmarks/results``). Eager steps get slower in that layout, so an eager fallback keeps
    the default one. The values are unchanged (a layout, not a cast); checkpoints are saved
    contiguous.
    """
    if not wanted or _compile_failed:
        return unet
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return compiled_unet(unet, inference=inference)


class _CompiledDecoder(torch.nn.Module):
    """A VAE decoder called through ``torch.compile``; if compiling fails, one warning
    (``compile_failure``) and the same decoder eagerly. The decode reads no generator, so the
    eager redo gives what an eager pipeline would have."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.eager = decoder
        self.compiled = torch.compile(decoder, **COMPILE_OPTIONS)

    def forward(self, *args, **kwargs):
        if not _compile_failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - only compiler failures are absorbed, see compile_failure
                if not compile_failure(error, "sampling VAE decoder", "generation.compile"):
                    raise
        return self.eager(*args, **kwargs)


def with_compiled_decoder(vae: torch.nn.Module) -> torch.nn.Module:
    """A view of ``vae`` (same parameters and submodules, nothing copied) whose ``decoder`` runs
    through ``torch.compile``; ``vae`` itself is unchanged, so encoders, other callers and saved
    state dicts never see the compiled wrapper. H200, batch 32, DDIM 50: 0.2198 → 0.2134 s per
    image, the UNet compiled (and in channels-last) in both arms (``benchmarks/results``,
    ``gpu_sampling_modes.py``)."""
    view = copy.copy(vae)  # a shallow copy shares every tensor and submodule with ``vae``
    view._modules = dict(vae._modules)  # its own submodule table, so the swap below stays in the view
    view._modules["decoder"] = _CompiledDecoder(vae.decoder)
    return view


def _eager(unet: torch.nn.Module) -> torch.nn.Module:
    return getattr(unet, "_orig_mod", unet)


def compile_failure(error: BaseException, what: str, setting: str) -> bool:
    """True if ``error`` is torch.compile's (dynamo/inductor): then compiling is off for the
    rest of the process (``compiled_unet`` callers run eager) and one warning says so; False
    for any other error, which the caller re-raises."""
    import torch._dynamo.exc as dynamo_errors

    compiler_error = isinstance(error, dynamo_errors.TorchDynamoException) or type(error).__module__.startswith(
        ("torch._dynamo", "torch._inductor")
    )
    if not compiler_error:
        return False
    if not _compile_failed:
        reason = " ".join([line.strip() for line in str(error).splitlines() if line.strip()][:2])
        _compile_failed.append(f"{type(error).__name__}: {reason}")
        log.warning(
            "torch.compile of the %s failed (%s); running eagerly from now on "
            "(same results within the stated tolerance, slower). Set %s=false to skip the attempt.",
            what, _compile_failed[0], setting,
        )
    return True


def _call_pipeline(pipeline, **kwargs):
    """The pipeline call; a compiled UNet that fails to compile is replaced by eager, with a warning."""
    unet = pipeline.unet
    if unet is _eager(unet):
        return pipeline(**kwargs)
    try:
        return pipeline(**kwargs)
    except Exception as error:  # noqa: BLE001 - only compiler failures are absorbed, see compile_failure
        if not compile_failure(error, "sampling UNet", "generation.compile"):
            raise
        # A compile fails at the first UNet call, before the scheduler has drawn from the
        # generators, so the caller's latents and generators are reused unchanged.
        pipeline.register_modules(unet=_eager(unet))
        return pipeline(**kwargs)


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
    output = _call_pipeline(
        pipeline,
        prompt=None if "prompt_embeds" in pipeline_kwargs else prompts,
        height=resolution,
        width=resolution,
        num_inference_steps=sampler.steps,
        guidance_scale=sampler.guidance,
        eta=sampler.eta,
        generator=generators,
        latents=latents,
        **{"output_type": "pt", **pipeline_kwargs},
    )
    if "output_type" in pipeline_kwargs:  # the caller asked for latents, arrays or tensors
        return list(output.images)
    return pil_images(output.images)


def pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """diffusers' PIL conversion of the pipeline's [0, 1] pixels (``VaeImageProcessor``:
    ``numpy_to_pil(pt_to_numpy(x))``), with the ×255 and rounding done on the pixels' device: the
    host receives uint8 (a quarter of float32's bytes) and the sampling thread only wraps arrays.
    The same fp32 arithmetic and round-half-to-even, so the images are bit-identical (tested
    against diffusers' own conversion)."""
    array = (pixels.float() * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if array.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(-1), mode="L") for image in array]
    return [Image.fromarray(image) for image in array]
