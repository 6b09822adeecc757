"""``dreamblend``: DreamBlend (reconstructed) — Ram et al., WACV 2025 (arXiv 2411.19390).

The paper's code and body are not public (see ``../shared/METHODS.md``); this is a
**reconstruction** from its abstract and figures, labelled so wherever a user sees the name.
Idea: an early ("underfit") DreamBooth checkpoint follows the prompt, a late ("overfit") one
reproduces the subject; sample with the overfit checkpoint while pulling its cross-attention maps
toward those the underfit checkpoint produced for the same prompt and seed.

It trains nothing of its own: ``trains_as = DreamBooth`` and its training fields are
DreamBooth's, so one DreamBooth training per subject serves DreamBooth's cells and every
DreamBlend cell; ``prepare`` writes exactly what ``DreamBooth.prepare`` writes. Every DreamBlend
knob is generation-only.

| step of the algorithm | where in code | value (default) | source |
|---|---|---|---|
| DreamBooth training, checkpoints saved | ``prepare`` → ``DreamBooth.prepare`` | steps 1000, ``checkpoint_steps`` (5, 250) | paper figure: checkpoints at 5, 250, 1000 |
| underfit / overfit checkpoint | ``underfit_step``, ``overfit_step`` | 5 / 250 | paper figure: "step 250 + guidance from the step-5 image is effective"; at 1000 attention collapses |
| 1. reference: sample with the underfit checkpoint, record cross-attention probs per layer and step | ``_reference_maps`` (``AttentionRecorder`` through ``methods.attention``) | same prompt, seed, sampler as the output | paper (reference from the underfit checkpoint, same prompt and seed) |
| maps recorded | ``_reference_maps`` | conditional half of the CFG batch, per head, keys = all 77 text positions | ours: the prompt's maps are the conditional ones; per head as Pix2Pix-Zero's loss |
| 2. sample with the overfit checkpoint from the same initial latent | ``generate`` → ``methods.sampling.generate_images`` | DDIM, protocol sampler | paper (same prompt and seed) |
| guidance step before each guided UNet evaluation: x ← x − w ∇ₓ L | ``_guide`` (x_T through ``adjust_initial_latents``, later steps through ``callback_on_step_end``) | one plain gradient step per sampling step | ours, after Pix2Pix-Zero's cross-attention guidance (one SGD step on the latent per step) |
| L = Σ_images Σ_layers mean_heads Σ_{queries,tokens} (A_overfit − A_ref)² | ``_guidance_loss`` | summed over images so each image's step is independent of the batch | Pix2Pix-Zero's L2 form (sum over the map, mean over heads); loss form in the paper **unknown** |
| guidance weight w | ``guidance_weight`` | 0.1 | Pix2Pix-Zero's default step size (paper **unknown**) |
| guided steps | ``guidance_window`` (fractions of the sampling steps, [start, end)) | (0, 1): every step | Pix2Pix-Zero guides every step (paper **unknown**) |
| guided layers | ``guided_blocks`` ("down", "mid", "up"), ``guided_resolutions`` (attention-grid sides; empty = all) | every cross-attention (attn2) layer | Pix2Pix-Zero uses every attn2 layer (paper **unknown**) |
| guided tokens | ``guided_tokens``: "all" (77 positions) or "subject" (the identifier's tokens; a prompt without the identifier, e.g. the class-prior "a dog", is then not guided) | all | Pix2Pix-Zero matches whole maps (paper **unknown**) |
| the paper's "cross-attention guidance regularization" across checkpoints | — | not reconstructed | the body of the paper is unavailable |

``guidance_weight=0`` still generates the reference and runs the guidance passes (the losses are
logged) but leaves the latents untouched, so its images equal the overfit checkpoint's DreamBooth
images bit for bit (tested): a cell that measures the machinery, not only the overfit model.

Checkpoints: a DreamBlend cell produces one image set per (underfit, overfit) pair, and the pair
is a pair of generation knobs, so ``checkpoints()`` names that one pair (``blend-5-to-250``).
Sweeping pairs is a grid over ``underfit_step``/``overfit_step`` (trains once per subject);
naming all pairs of ``checkpoint_steps`` as checkpoints instead would multiply every weight and
window cell by every pair, most of them meaningless (underfit ≥ overfit).

Cost per image (guided steps × (a UNet forward + backward at batch n) on top of two samplings)
and memory (per-head reference maps for every guided layer and step: about 33 MB per image and
step for SD 1.5 at 512 px with all 16 attn2 layers in bf16, so 1.7 GB per image over 50 steps)
are measured by
``benchmarks/gpu_dreamblend.py``; narrow ``guided_resolutions`` to cut the memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from data.subjects import Subject
from methods.attention import (
    AttentionControlError,
    AttentionRecorder,
    attention_control,
    is_cross_attention_layer,
    step_callback,
    word_token_positions,
)
from methods.base import Method, ParamsError, SamplerConfig, State, param, training_params_dict
from methods.dreambooth import DreamBooth, DreamBoothParams
from methods.sampling import build_pipeline, generate_images

BLOCKS = ("down", "mid", "up")
_BLOCK_PREFIX = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


@dataclass(frozen=True)
class DreamBlendParams(DreamBoothParams):
    checkpoint_steps: tuple[int, ...] = param(
        (5, 250), source="paper figure (checkpoints at 5, 250, 1000 steps)", doc="DreamBooth checkpoints to save"
    )
    underfit_step: int = param(
        5, source="paper figure", doc="training step of the checkpoint that makes the reference", generation=True
    )
    overfit_step: int = param(
        250, source="paper figure", doc="training step of the checkpoint that makes the output", generation=True
    )
    guidance_weight: float = param(
        0.1,
        source="ours: Pix2Pix-Zero's cross-attention guidance step size (paper unknown)",
        doc="step size w of x <- x - w * grad L",
        generation=True,
    )
    guidance_window: tuple[float, ...] = param(
        (0.0, 1.0),
        source="ours: Pix2Pix-Zero guides every step (paper unknown)",
        doc="[start, end) fractions of the sampling steps that are guided",
        generation=True,
    )
    guided_blocks: tuple[str, ...] = param(
        BLOCKS,
        source="ours: Pix2Pix-Zero uses every cross-attention layer (paper unknown)",
        doc="UNet parts whose attn2 layers are guided: down, mid, up",
        generation=True,
    )
    guided_resolutions: tuple[int, ...] = param(
        (),
        source="ours: every resolution, as Pix2Pix-Zero (paper unknown)",
        doc="attention-grid sides guided (SD 1.5 at 512 px: 64, 32, 16, 8); empty = all",
        generation=True,
    )
    guided_tokens: Literal["all", "subject"] = param(
        "all",
        source="ours: Pix2Pix-Zero matches whole maps (paper unknown)",
        doc="'all' = the 77 text positions, 'subject' = the identifier's tokens only",
        generation=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        saved = self.save_steps()
        for name in ("underfit_step", "overfit_step"):
            step = getattr(self, name)
            if step not in saved:
                raise ParamsError(
                    f"{name}={step} is not a saved DreamBooth checkpoint (saved: {saved}); add {step} "
                    f"to checkpoint_steps (at most steps={self.steps})"
                )
        if self.underfit_step >= self.overfit_step:
            raise ParamsError(
                f"underfit_step={self.underfit_step} must be earlier than overfit_step={self.overfit_step}"
            )
        if self.guidance_weight < 0:
            raise ParamsError(f"guidance_weight must be >= 0 (0 = no guidance), got {self.guidance_weight}")
        window = self.guidance_window
        if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
            raise ParamsError(
                f"guidance_window must be [start, end) with 0 <= start < end <= 1 (fractions of the "
                f"sampling steps), got {list(window)}"
            )
        unknown = [block for block in self.guided_blocks if block not in BLOCKS]
        if unknown or not self.guided_blocks:
            raise ParamsError(f"guided_blocks {list(self.guided_blocks)}: each must be one of {list(BLOCKS)}")
        bad = [side for side in self.guided_resolutions if side < 1]
        if bad:
            raise ParamsError(f"guided_resolutions must be positive grid sides, got {bad}")

    def guided_steps(self, sampling_steps: int) -> range:
        start, end = self.guidance_window
        return range(round(start * sampling_steps), round(end * sampling_steps))


class DreamBlend(Method):
    name = "dreamblend"
    version = "1"
    Params = DreamBlendParams
    trains_as = DreamBooth
    description = (
        "DreamBlend (reconstructed), after Ram et al. 2025: overfit DreamBooth checkpoint guided toward "
        "an underfit checkpoint's cross-attention maps"
    )

    def __init__(self, params: DreamBlendParams, context):
        super().__init__(params, context)
        training = DreamBoothParams(**training_params_dict(params))
        # Two DreamBooth adapters, one per checkpoint role, so both checkpoints stay loaded.
        self._underfit = DreamBooth(training, context)
        self._overfit = DreamBooth(training, context)
        self.guidance_log: list[dict] = []  # per guided step of the last generate call

    def checkpoints(self) -> Sequence[str]:
        return [f"blend-{self.params.underfit_step}-to-{self.params.overfit_step}"]

    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        self._underfit.prepare(subject, workdir, seed)

    def load_state(self, workdir: Path, subject: Subject) -> State:
        state = self._underfit.load_state(workdir, subject)
        p = self.params
        for step in (p.underfit_step, p.overfit_step):
            name = self._checkpoint(step)
            if name not in state.data["checkpoints"]:
                raise ValueError(
                    f"{self.name}: DreamBooth state {workdir} has no checkpoint {name!r} "
                    f"(it has {sorted(state.data['checkpoints'])}); train with {step} in checkpoint_steps"
                )
        return state

    def _checkpoint(self, step: int) -> str:
        return "final" if step == self.params.steps else f"step-{step}"

    def _guided_layer(self, layer: str) -> bool:
        return is_cross_attention_layer(layer) and any(
            layer.startswith(_BLOCK_PREFIX[block]) for block in self.params.guided_blocks
        )

    def _recorder(self, steps: range, keep_grad: bool) -> AttentionRecorder:
        return AttentionRecorder(
            cross=True,
            resolutions=self.params.guided_resolutions,
            steps=steps.__contains__,
            conditional_only=True,
            mean_heads=False,
            keep_grad=keep_grad,
        )

    def _token_mask(self, prompts: Sequence[str], tokenizer, device) -> torch.Tensor:
        """(n, 77) weights of the key positions the loss compares."""
        length = tokenizer.model_max_length
        if self.params.guided_tokens == "all":
            return torch.ones((len(prompts), length), device=device)
        mask = torch.zeros((len(prompts), length), device=device)
        for row, prompt in enumerate(prompts):
            # A prompt without the identifier (the protocol's class-prior prompt "a dog") has no
            # subject token: its image gets no guidance (a zero row).
            try:
                mask[row, word_token_positions(tokenizer, prompt, self.context.identifier)] = 1.0
            except AttentionControlError:
                continue
        return mask

    def _reference_maps(
        self, state: State, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig, steps: range
    ) -> dict[tuple[int, str], torch.Tensor]:
        unet, text_encoder = self._underfit._generation_modules(state, self._checkpoint(self.params.underfit_step))
        pipeline = build_pipeline(self._underfit._backbone(), sampler, unet=unet, text_encoder=text_encoder)
        recorder = self._recorder(steps, keep_grad=False)
        recorder.cfg = sampler.guidance > 1
        with attention_control(unet, recorder, select=self._guided_layer):
            generate_images(
                pipeline,
                prompts,
                seeds,
                sampler,
                self.context.resolution,
                output_type="latent",  # only the maps are wanted
                callback_on_step_end=step_callback(recorder),
            )
        if not recorder.maps and len(steps):
            raise ValueError(
                f"{self.name}: no cross-attention layer matches guided_blocks={list(self.params.guided_blocks)} "
                f"and guided_resolutions={list(self.params.guided_resolutions)} on this backbone"
            )
        return recorder.maps

    def _guidance_loss(
        self, maps: dict[str, torch.Tensor], reference: dict[tuple[int, str], torch.Tensor], step: int, mask
    ) -> torch.Tensor:
        total = torch.zeros((), device=mask.device)
        for layer, current in maps.items():
            target = reference[(step, layer)].to(current.dtype)
            squared = (current - target).float().pow(2) * mask[:, None, None, :]
            total = total + squared.sum(dim=(-2, -1)).mean(dim=1).sum()
        return total

    def generate(
        self,
        state: State,
        checkpoint: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
    ) -> list[Image.Image]:
        if checkpoint not in self.checkpoints():
            raise ValueError(
                f"{self.name}: unknown checkpoint {checkpoint!r}; this cell has {list(self.checkpoints())} "
                "(sweep underfit_step/overfit_step to blend other pairs)"
            )
        prompts = list(prompts)
        p = self.params
        steps = p.guided_steps(sampler.steps)
        reference = self._reference_maps(state, prompts, seeds, sampler, steps) if len(steps) else {}
        unet, text_encoder = self._overfit._generation_modules(state, self._checkpoint(p.overfit_step))
        backbone = self._overfit._backbone()
        pipeline = build_pipeline(backbone, sampler, unet=unet, text_encoder=text_encoder)
        with torch.no_grad():
            conditional, _ = pipeline.encode_prompt(prompts, unet.device, 1, False)
        mask = self._token_mask(prompts, pipeline.tokenizer, unet.device)
        self.guidance_log = []

        def guide(latents: torch.Tensor, step: int) -> torch.Tensor:
            if step not in steps:
                return latents
            timestep = pipeline.scheduler.timesteps[step]
            recorder = self._recorder(range(step, step + 1), keep_grad=True)
            recorder.step = step
            with torch.enable_grad(), attention_control(unet, recorder, select=self._guided_layer):
                x = latents.detach().requires_grad_(True)
                model_input = pipeline.scheduler.scale_model_input(x, timestep)
                unet(model_input, timestep, encoder_hidden_states=conditional, return_dict=False)
                loss = self._guidance_loss(recorder.at_step(step), reference, step, mask)
                (gradient,) = torch.autograd.grad(loss, x)
            self.guidance_log.append({"step": step, "loss": float(loss.detach()), "grad_norm": float(gradient.norm())})
            if p.guidance_weight == 0:
                return latents
            return (x - p.guidance_weight * gradient).detach().to(latents.dtype)

        def adjust_initial(latents: torch.Tensor) -> torch.Tensor:
            pipeline.scheduler.set_timesteps(sampler.steps, device=unet.device)
            sigma = pipeline.scheduler.init_noise_sigma
            if sigma == 1:
                return guide(latents, 0)
            # The pipeline multiplies x_T by sigma: guide the scaled latent, hand back unscaled.
            guided = guide(latents * sigma, 0)
            return latents if p.guidance_weight == 0 or 0 not in steps else guided / sigma

        def on_step_end(pipe, index: int, timestep, callback_kwargs: dict) -> dict:
            if index + 1 < len(pipe.scheduler.timesteps):
                callback_kwargs["latents"] = guide(callback_kwargs["latents"], index + 1)
            return callback_kwargs

        return generate_images(
            pipeline,
            prompts,
            seeds,
            sampler,
            self.context.resolution,
            adjust_initial_latents=adjust_initial,
            callback_on_step_end=on_step_end,
        )

    def release(self) -> None:
        self._underfit.release()
        self._overfit.release()
