"""CLIP-T (image–text) and CLIP-I (image–reference) on one shared open_clip model.

Stored values are raw cosines; 100·cos and CLIPScore 2.5·max(cos, 0) are derived in reports
(``metrics.conventions``). Texts longer than CLIP's 77-token context are truncated explicitly,
as open_clip's tokenizer does (first 75 BPE tokens, then end-of-text), and every truncation is
logged and written to ``notes``; torchmetrics instead cuts the padded ids and can drop the
end-of-text token (torchmetrics #2883), so long texts are where the two may disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metrics.backbones import get_clip
from metrics.base import BackboneMetric, ScoringInputs
from metrics.embeddings import image_embeddings, reference_embeddings, text_store
from metrics.inputs import check_inputs

log = logging.getLogger(__name__)

CLIP_METRIC_VERSION = 1
CONTEXT_LENGTH = 77


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
        _, lengths = tokenize(backbone.tokenizer, texts)
        missing = sorted({text for text in texts if text not in cache})
        for start in range(0, len(missing), self.settings.batch_size):
            chunk = missing[start : start + self.settings.batch_size]
            chunk_ids, _ = tokenize(backbone.tokenizer, chunk)
            with torch.inference_mode(), backbone.autocast():
                features = backbone.model.encode_text(chunk_ids.to(backbone.device))
            for text, row in zip(chunk, F.normalize(features.float(), dim=-1).cpu()):
                cache[text] = row
        if not texts:
            return torch.zeros(0, 0), lengths
        return torch.stack([cache[text] for text in texts]), lengths

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        check_inputs(inputs, texts=True)
        if inputs.images.shape[0] == 0:
            self.notes = []
            return np.zeros(0)
        text_rows, lengths = self.text_embeddings(inputs.texts)
        self.notes = [truncation_note(length) for length in lengths]
        for text, note in zip(inputs.texts, self.notes):
            if note:
                log.warning("clip_t: %s: %r", note, text[:80])
        image_rows = self._image_embeddings(inputs)
        return (image_rows * text_rows).sum(dim=-1).double().numpy()


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
