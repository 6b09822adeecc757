"""The attention-collapse diagnostic: how a checkpoint's cross-attention spreads over the prompt.

DreamBlend (Ram et al. 2025) shows, in figures, a "catastrophic attention collapse" of late
DreamBooth checkpoints: the prompt's tokens stop getting attention of their own and everything
attends to the subject. Measured here, per attention-grid resolution, while the checkpoint
samples a few protocol prompts (DDIM, conditional half of the CFG batch, every step, every head,
every query position):

- ``entropy``: the entropy of the attention over the prompt's *word* tokens (positions between
  BOS and EOS; BOS, EOS and padding left out, then renormalised), divided by log(#words) so that
  prompts of different length compare: 1 = spread evenly over the words, 0 = on one word.
- ``subject_share``: the renormalised attention on the identifier's tokens ("sks"): 1/#words
  when the subject gets no more than any word, → 1 under collapse.
- ``word_mass``: the raw share of attention on the word tokens at all (SD's cross-attention puts
  most of its mass on BOS; a drop here is another face of collapse).

Each value is a mean over (steps, images, heads, query positions). Simple and honest: it is one
reading of the paper's figure, not the paper's measurement (which is not public).
``collapse_statistics`` returns rows; DreamBooth stores them in its ``state.json`` for every
checkpoint (``attention_collapse``), and the report plots them against the training step.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from methods.attention import (
    AttentionCall,
    AttentionController,
    attention_control,
    word_token_positions,
)
from methods.base import SamplerConfig
from methods.diffusion import autocast_context
from methods.sampling import build_pipeline, generate_images

COLLAPSE_VERSION = "1"
# Few DDIM steps suffice for attention statistics; ours, not the paper's (not public).
COLLAPSE_SAMPLER = SamplerConfig(name="ddim", steps=10, guidance=7.5, eta=0.0)


class CollapseStatistics(AttentionController):
    """Accumulates entropy, subject share and word mass per attention-grid side."""

    def __init__(self, word_positions: Sequence[Sequence[int]], subject_positions: Sequence[Sequence[int]], keys: int):
        super().__init__()
        images = len(word_positions)
        self.words = torch.zeros((images, keys))
        self.subject = torch.zeros((images, keys))
        for row, (words, subject) in enumerate(zip(word_positions, subject_positions)):
            self.words[row, list(words)] = 1.0
            self.subject[row, list(subject)] = 1.0
        self.normaliser = torch.tensor([math.log(max(len(words), 2)) for words in word_positions])
        self.sums: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(3, dtype=torch.float64))
        self.counts: dict[int, int] = defaultdict(int)

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> None:
        if not call.is_cross:
            return None
        _, conditional = call.split(probs)
        with torch.no_grad():
            probs32 = conditional.float()  # (n, heads, queries, keys)
            words = self.words.to(probs32.device)[:, None, None, :]
            subject = self.subject.to(probs32.device)[:, None, None, :]
            on_words = (probs32 * words).sum(-1)
            renormalised = probs32 * words / on_words.clamp_min(1e-12)[..., None]
            entropy = -(renormalised * renormalised.clamp_min(1e-12).log()).sum(-1)
            entropy = entropy / self.normaliser.to(probs32.device)[:, None, None]
            share = (renormalised * subject).sum(-1)
            totals = torch.stack([entropy.sum(), share.sum(), on_words.sum()]).double().cpu()
        self.sums[call.size] += totals
        self.counts[call.size] += entropy.numel()
        return None

    def rows(self) -> list[dict]:
        out = []
        for side in sorted(self.sums, reverse=True):
            entropy, share, mass = (self.sums[side] / self.counts[side]).tolist()
            out.append({"resolution": side, "entropy": entropy, "subject_share": share, "word_mass": mass})
        return out


def _word_positions(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return list(range(1, len(ids) - 1))  # between BOS and EOS


def collapse_statistics(
    backbone,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    identifier: str,
    resolution: int,
    sampler: SamplerConfig = COLLAPSE_SAMPLER,
) -> list[dict]:
    """Rows {resolution, entropy, subject_share, word_mass} of ``unet`` sampling ``prompts``.

    Runs under autocast in the backbone's dtype (so an fp32 training copy works beside a bf16
    backbone) with the UNet in eval mode, restoring its mode afterwards.
    """
    tokenizer = backbone.tokenizer
    words = [_word_positions(tokenizer, prompt) for prompt in prompts]
    subject = [word_token_positions(tokenizer, prompt, identifier) for prompt in prompts]
    statistics = CollapseStatistics(words, subject, tokenizer.model_max_length)
    statistics.cfg = sampler.guidance > 1
    pipeline = build_pipeline(backbone, sampler, unet=unet, text_encoder=text_encoder)
    was_training = unet.training
    unet.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(autocast_context(backbone.device, backbone.dtype))
            stack.enter_context(attention_control(unet, statistics, select="cross"))
            generate_images(pipeline, prompts, seeds, sampler, resolution, output_type="latent")
    finally:
        unet.train(was_training)
    return statistics.rows()
