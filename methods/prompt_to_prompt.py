"""Prompt-to-Prompt (Hertz et al., ICLR 2023) on ``methods.attention``, and real-image editing
through null-text inversion (``methods.inversion``): the subject-replacement path of HiFi Tuner.

Controller (``PromptToPrompt``): the UNet batch holds one source and one or more edited prompts;
with classifier-free guidance the pipeline stacks [unconditional; conditional], and **only the
conditional half of the edited images is changed** (the official code does the same):

- cross-attention, during the first ``int(cross_replace_steps · S)`` steps: each edited token's
  map is the source map of the token it is aligned with (``mapper``), except tokens marked
  ``own`` (new words, HiFi Tuner's c_s positions), which keep their own maps. ``replace`` aligns
  position by position (prompts of equal token length, the word-swap edit; the new word takes the
  old word's map); ``refine`` aligns by the longest common token subsequence (added words are
  own). ``equalizer`` (77,) multiplies the edited maps per token (``reweight``).
- self-attention, during the first ``int(self_replace_steps · S)`` steps, on layers with at most
  ``self_max_queries`` = 16² queries: the edited maps are the source's (official code).
- Defaults: cross_replace_steps 0.8, self_replace_steps 0.4 (the paper's examples use 0.8 and
  0.4–0.5). LocalBlend is not implemented; its rule (16×16-or-coarsest cross-attention maps of the
  chosen words, averaged, normalised to max 1, threshold 0.3) gives the edit's mask
  (``subject_mask``).

``run_edit`` samples the source and edited prompts together from one x_T with per-step null
embeddings (null-text inversion's, for a real image: ``methods/subject_replacement.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from methods.attention import AttentionCall, AttentionController, attention_control
from methods.diffusion import tokenize

MODES = ("replace", "refine")


class EditError(ValueError):
    """A prompt pair or setting Prompt-to-Prompt cannot use, naming it and the fix."""


@dataclass(frozen=True)
class EditSettings:
    mode: str = "replace"
    cross_replace_steps: float = 0.8  # paper's examples
    self_replace_steps: float = 0.4  # paper's examples (0.4-0.5)
    self_max_queries: int = 16 * 16  # official code: self-attention replaced up to 16x16 maps
    mask_threshold: float = 0.3  # official LocalBlend threshold

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EditError(f"edit mode {self.mode!r} is not one of {MODES}")
        for name in ("cross_replace_steps", "self_replace_steps"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EditError(f"{name} must be a fraction of the steps in [0, 1], got {getattr(self, name)}")


def _length(ids: torch.Tensor, eos: int) -> int:
    """Tokens up to and including the first EOS."""
    hits = (ids == eos).nonzero()
    return int(hits[0]) + 1 if len(hits) else len(ids)


def token_alignment(tokenizer, source: str, target: str, mode: str = "replace") -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper (77,) long, own (77,) bool): for each target position, the source position whose map
    it takes, and whether it keeps its own map instead."""
    ids = tokenize(tokenizer, [source, target])
    size = ids.shape[1]
    eos = tokenizer.eos_token_id
    n_source, n_target = _length(ids[0], eos), _length(ids[1], eos)
    mapper = torch.arange(size)
    own = torch.zeros(size, dtype=torch.bool)
    if mode == "replace":
        if n_source != n_target:
            raise EditError(
                f"replace needs prompts of equal token length: {source!r} has {n_source - 2} tokens, "
                f"{target!r} has {n_target - 2}; use mode refine for prompts that add or remove words"
            )
        return mapper, own
    # refine: longest common subsequence of the token ids (BOS..EOS), the rest of the target is own.
    a, b = ids[0, :n_source].tolist(), ids[1, :n_target].tolist()
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int32)
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            table[i, j] = table[i + 1, j + 1] + 1 if a[i] == b[j] else max(table[i + 1, j], table[i, j + 1])
    own[:n_target] = True
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            mapper[j], own[j] = i, False
            i, j = i + 1, j + 1
        elif table[i + 1, j] >= table[i, j + 1]:
            i += 1
        else:
            j += 1
    # Padding after the target's EOS reads the source's padding at the same offset from its EOS.
    tail = torch.arange(size - n_target)
    mapper[n_target:] = (n_source + tail).clamp(max=size - 1)
    return mapper, own


@dataclass
class PromptToPrompt(AttentionController):
    """Edits the conditional maps of images 1.. of the batch toward image 0's (the source)."""

    steps: int
    mapper: torch.Tensor
    own: torch.Tensor
    settings: EditSettings = field(default_factory=EditSettings)
    equalizer: torch.Tensor | None = None
    mask_positions: Sequence[int] = ()

    def __post_init__(self) -> None:
        super().__init__()
        self.cross_until = int(self.settings.cross_replace_steps * self.steps)
        self.self_until = int(self.settings.self_replace_steps * self.steps)
        self.mask_maps: dict[int, torch.Tensor] = {}  # queries -> summed edited maps of mask_positions

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor | None:
        _, conditional = call.split(probs)
        if conditional.shape[0] < 2:
            return None
        source, edited = conditional[:1], conditional[1:]
        if call.is_cross and self.mask_positions:
            maps = edited[..., list(self.mask_positions)].mean(dim=(1, 3)).detach()  # (n, q)
            self.mask_maps[call.resolution] = self.mask_maps.get(call.resolution, 0) + maps
        if call.is_cross and call.step < self.cross_until:
            mapper = self.mapper.to(probs.device)
            new = torch.where(self.own.to(probs.device), edited, source[..., mapper])
            if self.equalizer is not None:
                new = new * self.equalizer.to(new.device, new.dtype)
        elif (
            not call.is_cross
            and call.step < self.self_until
            and call.resolution[0] * call.resolution[1] <= self.settings.self_max_queries
        ):
            new = source.expand_as(edited)
        else:
            return None
        images = call.per_image(probs).clone()
        images[images.shape[0] - edited.shape[0] :] = new
        return images.view_as(probs)

    def subject_mask(self, size: int) -> np.ndarray | None:
        """LocalBlend's rule on the coarsest recorded maps: mean, / max, > threshold; size×size."""
        if not self.mask_maps:
            return None
        resolution = min(self.mask_maps, key=lambda r: r[0] * r[1])
        maps = self.mask_maps[resolution][0].float().view(1, 1, *resolution)
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        maps = maps / maps.max().clamp_min(1e-12)
        return (maps > self.settings.mask_threshold).cpu().numpy()


def run_edit(
    pipeline,
    controller: PromptToPrompt,
    start: torch.Tensor,
    conditioning: Callable[[int], torch.Tensor],
    nulls: Sequence[torch.Tensor],
    steps: int,
    guidance: float,
    resolution: int,
    output_type: str = "pil",
):
    """Sample the batch (source + edits) from ``start`` (n,C,h,w) under ``controller``, with
    ``conditioning(step)`` (n,T,D) and per-step null embeddings (n,T,D) installed by the step
    callback. The attention processors are restored afterwards, also on error."""
    controller.cfg = guidance > 1.0
    controller.step = 0

    def callback(pipe, step: int, timestep, kwargs: dict) -> dict:
        controller.step = step + 1
        if step + 1 < steps:
            embeds = torch.cat([nulls[step + 1], conditioning(step + 1)])
            return {"prompt_embeds": embeds.to(kwargs["prompt_embeds"].dtype)}
        return {}

    with attention_control(pipeline.unet, controller):
        output = pipeline(
            prompt_embeds=conditioning(0),
            negative_prompt_embeds=nulls[0],
            latents=start.to(pipeline.unet.device, pipeline.unet.dtype),
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            eta=0.0,
            output_type=output_type,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )
    return output.images
