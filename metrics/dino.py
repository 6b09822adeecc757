"""DINO (generated vs real subject images) and PRES (class-prior images vs real subject images).

Both are the mean cosine between DINO ViT-S/16 CLS embeddings of an image and of every real
reference of the subject; they differ in which images are scored. DINO scores the method's
evaluation images (higher: subject better preserved). PRES scores class-prior images generated
from "a {class}" (role "prior"): a high value means the subject's look leaks into its whole
class, i.e. the prior drifted (lower is better, as in the DreamBooth paper).

Convention variants (issue 15: the DINO models and inputs papers use) share this code and differ
only in model and input pipeline: ``dino_s16_squash``, ``dino_s8_crop``, ``dino_s8_squash``,
``dinov2_s14_crop``, ``dinov2_s14_squash`` (``dino`` itself is ViT-S/16 with timm's crop).
``metrics.conventions.VARIANTS`` says which paper uses which.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from metrics.backbones import DINO_MODELS, dino_backbone, get_dino
from metrics.base import BackboneMetric, ScoringInputs
from metrics.embeddings import image_embeddings, reference_embeddings
from metrics.inputs import check_inputs

DINO_METRIC_VERSION = 1


class Dino(BackboneMetric):
    name = "dino"
    higher_is_better = True
    description = "DINO ViT-S/16 CLS cosine to the real subject images, mean over references"
    version = DINO_METRIC_VERSION
    convention = (
        "mean over the subject's real references of cosine(DINO CLS(image), DINO CLS(reference)) "
        "(mean over images = mean over all generated x reference pairs); stored raw"
    )

    load_backbone = staticmethod(get_dino)

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        check_inputs(inputs, references=True)
        self.notes = [""] * inputs.images.shape[0]
        if inputs.images.shape[0] == 0:
            return np.zeros(0)
        references = reference_embeddings(self.backbone, inputs.references, inputs.reference_key)
        image_rows = image_embeddings(
            self.backbone, inputs.images, inputs.image_keys, self.settings.batch_size, self.settings.cache_dir
        )
        return (image_rows @ references.T).mean(dim=1).double().numpy()


class Pres(Dino):
    name = "pres"
    higher_is_better = False
    role = "prior"
    description = "prior preservation: DINO of class-prior images ('a {class}') to the real subject images"
    convention = (
        "mean over the subject's real references of DINO cosine to a class-prior image generated "
        "from 'a {class}' by the personalized model; higher = subject leaks into the class prior"
    )


class DinoVariant(Dino):
    """DINO on another self-supervised ViT and/or input: the same mean cosine to the references."""

    model: ClassVar[str]
    image_input: ClassVar[str]  # "crop" (the model's resize-and-crop) or "squash" (224 x 224, ratio not kept)

    @property
    def backbone(self):
        return dino_backbone(self.settings, self.model, self.image_input)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "model": DINO_MODELS[self.model].what, "image_input": self.image_input}


def _variant_convention(what: str, image_input: str) -> str:
    shown = "whole image squashed to 224x224" if image_input == "squash" else "resize shortest side, center crop 224"
    return (f"mean over the subject's real references of cosine({what} CLS(image), {what} CLS(reference)); "
            f"input: {shown}; stored raw")


class DinoS16Squash(DinoVariant):
    name = "dino_s16_squash"
    model, image_input = "s16", "squash"
    description = "DINO ViT-S/16 as `dino`, but on the image squashed to 224x224 instead of timm's crop"
    convention = _variant_convention("DINO ViT-S/16", image_input)


class DinoS8Crop(DinoVariant):
    name = "dino_s8_crop"
    model, image_input = "s8", "crop"
    description = "DINO ViT-S/8 (DreamBench++), shortest side to 256 then center crop 224"
    convention = _variant_convention("DINO ViT-S/8", image_input)


class DinoS8Squash(DinoVariant):
    name = "dino_s8_squash"
    model, image_input = "s8", "squash"
    description = "DINO ViT-S/8, image squashed to 224x224"
    convention = _variant_convention("DINO ViT-S/8", image_input)


class Dinov2S14Crop(DinoVariant):
    name = "dinov2_s14_crop"
    model, image_input = "v2_s14", "crop"
    description = "DINOv2 ViT-S/14 (DreamBench++), shortest side to 256 then center crop 224"
    convention = _variant_convention("DINOv2 ViT-S/14", image_input)


class Dinov2S14Squash(DinoVariant):
    name = "dinov2_s14_squash"
    model, image_input = "v2_s14", "squash"
    description = "DINOv2 ViT-S/14, image squashed to 224x224"
    convention = _variant_convention("DINOv2 ViT-S/14", image_input)
