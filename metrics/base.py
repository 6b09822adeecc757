"""The metric contract the harness scores through.

A metric is pure scoring over generated images (float NCHW in [0, 1]) plus context. It returns
one value per image; aggregation happens only in ``reports/``. Group metrics are expressed per
image so that the long format stays one row per (image, metric):
- CLIP-I / DINO: an image's value is its mean cosine to every real reference image, so the mean
  over images is the mean over all generated × reference pairs;
- DIV: an image's value is its mean LPIPS to the other images of its group (same method cell,
  subject, checkpoint and prompt), so the mean over images is the mean pairwise LPIPS;
- PRES: DINO of class-prior images ("a {class}") to the real references.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch


@dataclass
class ScoringInputs:
    """Images of one subject to score, with everything a metric may need."""

    images: torch.Tensor  # N×3×H×W float in [0, 1]
    image_keys: list[str]  # stable key per image (embedding caches)
    texts: list[str]  # CLIP-T text per image: the prompt with the identifier removed
    references: list[torch.Tensor]  # real subject images, each 3×h×w float in [0, 1]
    reference_key: str  # identifies the reference set (the subject's data_sha)
    groups: list[str] = field(default_factory=list)  # sibling group per image (DIV)


class Metric(ABC):
    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    role: ClassVar[str] = "eval"  # which generated images it scores: "eval" or "prior"
    # True when an image's value depends on its group's other images (DIV): the harness then
    # always passes whole groups.
    needs_complete_groups: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Everything that changes the values: version, backbone + weights, preprocessing, convention."""

    @abstractmethod
    def score(self, inputs: ScoringInputs) -> np.ndarray:
        """One float per image of ``inputs``."""


@dataclass(frozen=True)
class MetricSettings:
    """How metric backbones are built: real weights or random init of the same architectures."""

    weights: str = "pretrained"  # "pretrained" | "random"
    clip: str = "ViT-B-32"
    lpips_net: str = "alex"
    batch_size: int = 32
    device: str = "cpu"
    cache_dir: Path | None = None
