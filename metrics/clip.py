"""CLIP-T (image–text) and CLIP-I (image–reference) on one shared open_clip model.

Stored values are raw cosines; 100·cos and CLIPScore 2.5·max(cos, 0) are derived in reports
(``metrics.conventions``). Texts longer than CLIP's 77-token context are truncated explicitly,
as open_clip's tokenizer does (first 75 BPE tokens, then end-of-text), and every truncation is
logged and written to ``notes``; torchmetrics instead cuts the padded ids and can drop the
end-of-text token (torchmetrics #2883), so long texts are where the two may disagree.

Convention variants (issue 15), on the same code: ``clip_i_b32`` / ``clip_i_l14`` fix the CLIP
model whatever ``metrics.clip`` says; ``clip_t_identifier`` compares to the prompt the method
was given (identifier included) instead of the identifier-free text; ``clip_t_clipscore`` is
CLIPScore as Hessel et al.'s reference code computes it (ViT-B/32, caption prefixed with
"A photo depicts ", 2.5 * max(cos, 0)). ``metrics.conventions.VARIANTS`` says who uses which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from metrics.backbones import get_clip
from metrics.base import BackboneMetric, MetricSettings, ScoringInputs
from metrics.embeddings import image_embeddings, reference_embeddings, text_store
from metrics.inputs import check_inputs

log = logging.getLogger(__name__)

CLIP_METRIC_VERSION = 1
CONTEXT_LENGTH = 77
CLIPSCORE_PREFIX = "A photo depicts "  # Hessel et al.'s clipscore.py (CLIPCapDataset prefix)
CLIPSCORE_WEIGHT = 2.5


def tokenize(tokenizer, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> tuple[torch.Tensor, list[int]]:
    """Token ids (len(texts)×context_length) and each text's untruncated length (with SOT/EOT).

    A text is truncated when its length exceeds ``context_length``: it keeps SOT, the first
    ``context_length - 2`` BPE tokens and EOT, so the pooled EOT embedding still exists.
    """
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    lengths = []
    for row, text in enumerate(texts):
        tokens = [tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id]
        lengths.append(len(tokens))
        if len(tokens) > context_length:
            tokens = [*tokens[: context_length - 1], tokenizer.eot_token_id]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, lengths


def truncation_note(length: int, context_length: int = CONTEXT_LENGTH) -> str:
    if length <= context_length:
        return ""
    return f"clip text truncated from {length} to {context_length} tokens (kept the first {context_length - 2})"


class _ClipMetric(BackboneMetric):
    version = CLIP_METRIC_VERSION
    load_backbone = staticmethod(get_clip)

    def _image_embeddings(self, inputs: ScoringInputs) -> torch.Tensor:
        return image_embeddings(
            self.backbone, inputs.images, inputs.image_keys, self.settings.batch_size, self.settings.cache_dir
        )


class ClipT(_ClipMetric):
    name = "clip_t"
    higher_is_better = True
    description = "CLIP image-text cosine to the prompt without the identifier (raw cosine)"

    convention = (
        "cosine(image embedding, text embedding), per image; stored raw "
        "(100*cos and CLIPScore 2.5*max(cos,0) are derived)"
    )

    def fingerprint(self) -> dict:
        return {
            **super().fingerprint(),
            "text": "inputs.texts: the prompt with the identifier removed, class noun kept",
            "truncation": {
                "context_length": CONTEXT_LENGTH,
                "policy": "SOT + first 75 BPE tokens + EOT; recorded in notes and logged",
            },
        }

    def text_embeddings(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Normalized embeddings of ``texts`` and their untruncated token lengths."""
        backbone = self.backbone
        cache = text_store(backbone)
        # each distinct text tokenized once (BPE in Python: a subject batch repeats each prompt
        # once per image), its ids reused for the texts not yet encoded
        unique = sorted(set(texts))
        unique_ids, unique_lengths = tokenize(backbone.tokenizer, unique)
        row_of = {text: row for row, text in enumerate(unique)}
        lengths = [unique_lengths[row_of[text]] for text in texts]
        missing = [text for text in unique if text not in cache]
        for start in range(0, len(missing), self.settings.batch_size):
            chunk = missing[start : start + self.settings.batch_size]
            chunk_ids = unique_ids[[row_of[text] for text in chunk]]
            with torch.inference_mode(), backbone.autocast():
                features = backbone.model.encode_text(chunk_ids.to(backbone.device))
            for text, row in zip(chunk, F.normalize(features.float(), dim=-1).cpu()):
                cache[text] = row
        if not texts:
            return torch.zeros(0, 0), lengths
        return torch.stack([cache[text] for text in texts]), lengths

    def texts(self, inputs: ScoringInputs) -> list[str]:
        """The text each image is compared to (validated)."""
        check_inputs(inputs, texts=True)
        return list(inputs.texts)

    def cosines(self, inputs: ScoringInputs) -> np.ndarray:
        texts = self.texts(inputs)
        if inputs.images.shape[0] == 0:
            self.notes = []
            return np.zeros(0)
        text_rows, lengths = self.text_embeddings(texts)
        self.notes = [truncation_note(length) for length in lengths]
        for text, note in zip(texts, self.notes):
            if note:
                log.warning("%s: %s: %r", self.name, note, text[:80])
        image_rows = self._image_embeddings(inputs)
        return (image_rows * text_rows).sum(dim=-1).double().numpy()

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        return self.cosines(inputs)


class ClipI(_ClipMetric):
    name = "clip_i"
    higher_is_better = True
    description = "CLIP image-image cosine to the real subject images, mean over references"

    convention = (
        "mean over the subject's real references of cosine(image, reference) "
        "(mean over images = mean over all generated x reference pairs); stored raw"
    )

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        check_inputs(inputs, references=True)
        self.notes = [""] * inputs.images.shape[0]
        if inputs.images.shape[0] == 0:
            return np.zeros(0)
        references = reference_embeddings(self.backbone, inputs.references, inputs.reference_key)
        image_rows = self._image_embeddings(inputs)
        return (image_rows @ references.T).mean(dim=1).double().numpy()


def fixed_arch_clip(arch: str):
    """A backbone loader of the shared CLIP ``arch``, whatever ``settings.clip`` says."""

    def load(settings: MetricSettings):
        return get_clip(dataclasses.replace(settings, clip=arch))

    return staticmethod(load)


class ClipIB32(ClipI):
    name = "clip_i_b32"
    description = "CLIP-I on CLIP ViT-B/32 (OpenAI), whatever metrics.clip says"
    load_backbone = fixed_arch_clip("ViT-B-32")


class ClipIL14(ClipI):
    name = "clip_i_l14"
    description = "CLIP-I on CLIP ViT-L/14 (OpenAI), whatever metrics.clip says"
    load_backbone = fixed_arch_clip("ViT-L-14")


class ClipTIdentifier(ClipT):
    name = "clip_t_identifier"
    description = "CLIP image-text cosine to the prompt the method was given, identifier included (raw cosine)"
    convention = "cosine(image embedding, embedding of the generation prompt with its identifier), per image; stored raw"
    text_source: ClassVar[str] = "inputs.prompt_texts: the prompt the method was given, identifier included"

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "text": self.text_source}

    def texts(self, inputs: ScoringInputs) -> list[str]:
        check_inputs(inputs, prompt_texts=True)
        return list(inputs.prompt_texts)


class ClipTClipScore(ClipT):
    name = "clip_t_clipscore"
    description = "CLIPScore (Hessel et al. 2021): 2.5 * max(cos, 0), ViT-B/32, text 'A photo depicts ' + prompt without identifier"
    convention = (
        f"{CLIPSCORE_WEIGHT} * max(cosine(image, text), 0) with text = {CLIPSCORE_PREFIX!r} + the prompt without "
        "the identifier (Hessel et al. 2021, clipscore.py); CLIP ViT-B/32 whatever metrics.clip says"
    )
    load_backbone = fixed_arch_clip("ViT-B-32")

    def fingerprint(self) -> dict:
        return {
            **super().fingerprint(),
            "text": f"{CLIPSCORE_PREFIX!r} + inputs.texts (the prompt with the identifier removed, class noun kept)",
            "scale": {"weight": CLIPSCORE_WEIGHT, "clamp": "max(cos, 0) per image"},
        }

    def texts(self, inputs: ScoringInputs) -> list[str]:
        return [CLIPSCORE_PREFIX + text for text in super().texts(inputs)]

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        return CLIPSCORE_WEIGHT * np.maximum(self.cosines(inputs), 0.0)
