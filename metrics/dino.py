"""DINO (generated vs real subject images) and PRES (class-prior images vs real subject images).

Both are the mean cosine between DINO ViT-S/16 CLS embeddings of an image and of every real
reference of the subject; they differ in which images are scored. DINO scores the method's
evaluation images (higher: subject better preserved). PRES scores class-prior images generated
from "a {class}" (role "prior"): a high value means the subject's look leaks into its whole
class, i.e. the prior drifted (lower is better, as in the DreamBooth paper).
"""

from __future__ import annotations

import numpy as np

from metrics.backbones import get_dino
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
