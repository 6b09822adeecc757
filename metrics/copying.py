"""The copy check: is a generated image closer to a training photo than real photos are to each other?

Three per-image values, all from DINO ViT-S/16 CLS embeddings (the ``dino`` metric's backbone):

- ``copy_nn``: cosine of the generated image to its *nearest training image* (every photo in the
  default track; the one photo in the single-image track);
- ``copy_real``: the real-vs-real reference level of its subject: for each of the subject's own
  photos, the cosine to its nearest *other* photo (leave-one-out), averaged over photos — the
  same value for every image of a subject, stored per image so that it sits beside ``copy_nn``
  in every table;
- ``copy``: 1 when ``copy_nn`` exceeds the 95th percentile (``COPY_PERCENTILE``, linear
  interpolation) of that subject's leave-one-out distribution, else 0. Its mean over a method
  entry is the **copy rate**: the share of generated images closer to a training photo than
  95% of the subject's real photos are to their nearest sibling. A method that reproduces its
  training photo has copy rate 1.

A subject with a single photo has no real-vs-real distribution: its values are NaN, with the
reason in ``notes``. The threshold is ours (the issue's definition); no published protocol
exists.
"""

from __future__ import annotations

import numpy as np
import torch

from metrics.backbones import get_dino
from metrics.base import BackboneMetric, MetricInputError, ScoringInputs
from metrics.embeddings import image_embeddings, reference_embeddings
from metrics.inputs import check_inputs

COPY_PERCENTILE = 95.0


def leave_one_out_nearest(photos: torch.Tensor) -> np.ndarray:
    """Per photo (rows: normalized embeddings), the cosine to its nearest other photo."""
    similarity = (photos @ photos.T).double()
    similarity.fill_diagonal_(-np.inf)
    return similarity.max(dim=1).values.numpy()


def copy_threshold(real_nearest: np.ndarray, percentile: float = COPY_PERCENTILE) -> float:
    return float(np.percentile(real_nearest, percentile))


def _index_of(image: torch.Tensor, photos: list[torch.Tensor]) -> int | None:
    for index, photo in enumerate(photos):
        if photo.shape == image.shape and torch.equal(photo, image):
            return index
    return None


class _CopyMetric(BackboneMetric):
    higher_is_better = False
    load_backbone = staticmethod(get_dino)
    version = 1

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "percentile": COPY_PERCENTILE}

    def _embeddings(self, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_inputs(inputs)
        if not inputs.training_images or not inputs.subject_images:
            raise MetricInputError(
                f"{self.name}: inputs.training_images and inputs.subject_images are required (the images the "
                "method trained on and all of the subject's photos); the harness's score stage passes them"
            )
        photos = reference_embeddings(self.backbone, inputs.subject_images, "photos:" + inputs.subject_key)
        # Training images are the subject's photos (all of them, or the one of the single-image
        # track): their rows are reused rather than encoded again.
        rows = [_index_of(image, inputs.subject_images) for image in inputs.training_images]
        if all(row is not None for row in rows):
            training = photos[rows]
        else:
            training = reference_embeddings(self.backbone, inputs.training_images, "train:" + inputs.training_key)
        images = image_embeddings(
            self.backbone, inputs.images, inputs.image_keys, self.settings.batch_size, self.settings.cache_dir
        )
        return images, training, photos

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        count = inputs.images.shape[0]
        self.notes = [""] * count
        if count == 0:
            return np.zeros(0)
        images, training, photos = self._embeddings(inputs)
        nearest = (images @ training.T).max(dim=1).values.double().numpy()
        if photos.shape[0] < 2:
            self.notes = ["the subject has one photo: no real-vs-real distribution"] * count
            real = None
        else:
            real = leave_one_out_nearest(photos)
        return self.values(nearest, real)

    def values(self, nearest: np.ndarray, real: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


class CopyNearest(_CopyMetric):
    name = "copy_nn"
    description = "DINO cosine of a generated image to its nearest training image (copy check)"
    convention = "max over the method's training images of cosine(DINO CLS(image), DINO CLS(training image))"

    def values(self, nearest: np.ndarray, real: np.ndarray | None) -> np.ndarray:
        return nearest


class CopyReal(_CopyMetric):
    name = "copy_real"
    description = "real-vs-real level: mean over the subject's photos of the DINO cosine to its nearest other photo"
    convention = "mean over the subject's photos of max over its other photos of DINO cosine (leave-one-out)"

    def values(self, nearest: np.ndarray, real: np.ndarray | None) -> np.ndarray:
        return np.full(nearest.shape, np.nan if real is None else float(real.mean()))


class CopyRate(_CopyMetric):
    name = "copy"
    description = (
        "copy rate: 1 when the image's nearest-training-image DINO cosine exceeds the 95th percentile "
        "of the subject's real-vs-real leave-one-out cosines, else 0 (mean = share of copies)"
    )
    convention = "1[copy_nn > percentile_95(leave-one-out nearest cosines among the subject's photos)]"

    def values(self, nearest: np.ndarray, real: np.ndarray | None) -> np.ndarray:
        if real is None:
            return np.full(nearest.shape, np.nan)
        return (nearest > copy_threshold(real)).astype(np.float64)
