"""Scene preservation for the scene + instance task: LPIPS of each generated image to its scene.

The scene image (``ScoringInputs.scene_images``, from the pair file of ``data/scene_pairs.py``)
is resized to the generated image's size (bilinear, antialiased) and compared with LPIPS (the
``lpips`` package's network, ``metrics.lpips_net``); with several scene images the value is the
mean over them. Lower = the scene is better preserved. Images of subjects without a scene get
NaN with a note. No published protocol fixes these details; the seed write-up reports LPIPS
and CLIP-T on 8 (scene, instance) pairs without saying more.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from metrics.backbones import get_lpips
from metrics.base import BackboneMetric, ScoringInputs
from metrics.inputs import check_inputs
from metrics.lpips_metrics import check_lpips_size, lpips_features, lpips_from_features
from metrics.preprocess import LPIPS_PREPROCESS

NO_SCENE_NOTE = "no scene image: not a scene + instance pair"


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """3×h×w in [0, 1] -> 1×3×H×W (bilinear, antialiased), clamped back to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.unsqueeze(0)
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


class LpipsScene(BackboneMetric):
    name = "lpips_scene"
    higher_is_better = False
    description = "scene preservation: LPIPS of the generated image to its scene image (lower is better)"
    version = 1
    load_backbone = staticmethod(get_lpips)
    convention = "mean over the pair's scene images of LPIPS(image, scene resized bilinearly to the image size)"

    def preprocessing(self) -> dict:
        return {**LPIPS_PREPROCESS, "scene_resize": "bilinear, antialias, to the generated size"}

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        check_inputs(inputs)
        count = inputs.images.shape[0]
        self.notes = [""] * count
        if count == 0:
            return np.zeros(0)
        if not inputs.scene_images:
            self.notes = [NO_SCENE_NOTE] * count
            return np.full(count, np.nan)
        check_lpips_size(inputs.images, "inputs.images")
        backbone = self.backbone
        size = tuple(inputs.images.shape[-2:])
        total = np.zeros(count)
        for scene in inputs.scene_images:
            reference = lpips_features(backbone, resize_to(scene, size))
            for start in range(0, count, self.settings.batch_size):
                chunk = inputs.images[start : start + self.settings.batch_size]
                features = lpips_features(backbone, chunk)
                repeated = [layer.expand(chunk.shape[0], *layer.shape[1:]) for layer in reference]
                total[start : start + chunk.shape[0]] += lpips_from_features(backbone, features, repeated).cpu().double().numpy()
        return total / len(inputs.scene_images)
