"""The metric contract the harness scores through.

A metric is pure scoring over generated images (float NCHW in [0, 1]) plus context. It returns
one value per image; aggregation happens only in ``reports/``. Group metrics are expressed per
image so that the long format stays one row per (image, metric):
- CLIP-I / DINO: an image's value is its mean cosine to every real reference image, so the mean
  over images is the mean over all generated × reference pairs;
- DIV: an image's value is its mean LPIPS to the other images of its group (same method cell,
  subject, checkpoint and prompt), so the mean over images is the mean pairwise LPIPS; an image
  alone in its group has no DIV: NaN, with the reason in ``Metric.notes``;
- PRES: DINO of class-prior images ("a {class}") to the real references.

Besides the values, ``score`` leaves one note per image in ``Metric.notes`` ("" when there is
nothing to say): why a value is NaN, or that a CLIP-T text was truncated to 77 tokens. The
harness stores the notes next to the values so that nothing a metric did is silent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from data.common import UserError

WEIGHTS_CHOICES = ("pretrained", "random")
CLIP_ARCHS = ("ViT-B-32", "ViT-L-14")
LPIPS_NETS = ("alex", "vgg")
PRECISIONS = ("auto", "fp32", "bf16")
CUDA_GRAPH_MODES = ("auto", "true", "false")  # metrics.cuda_graphs (metrics/replay.py)
# The local VLM judge (metrics/vlm_judge.py): hub id @ commit. The commit was read from public
# repositories that pin this model (not checked against the hub from here: no network).
VLM_JUDGE_MODEL = "Qwen/Qwen3-VL-8B-Instruct@0c351dd01ed87e9c1b53cbc748cba10e6187ff3b"


class MetricInputError(UserError, ValueError):
    """Inputs a metric cannot score: the message names the argument and what was expected."""


@dataclass
class ScoringInputs:
    """Images of one subject to score, with everything a metric may need."""

    # N×3×H×W float in [0, 1], on the scoring device; the harness hands the same tensor to every
    # metric of a pass, so a metric must never modify it in place (tests/test_metrics_inputs.py)
    images: torch.Tensor
    image_keys: list[str]  # stable key per image (embedding caches): must change when pixels do
    texts: list[str]  # CLIP-T text per image: the prompt with the identifier removed
    references: list[torch.Tensor]  # real subject images, each 3×h×w float in [0, 1]
    reference_key: str  # identifies the reference set (the subject's data_sha)
    groups: list[str] = field(default_factory=list)  # sibling group per image (DIV)
    # What the method trained on (the copy check): every photo, or the single-image track's one.
    training_images: list[torch.Tensor] | None = None
    training_key: str = ""  # identifies ``training_images``
    subject_images: list[torch.Tensor] | None = None  # all of the subject's own photos
    subject_key: str = ""  # identifies ``subject_images`` (the subject's data_sha)
    scene_images: list[torch.Tensor] | None = None  # the scene + instance task's scene image(s)
    # The text each image was generated from, identifier included (clip_t_identifier); part of
    # the image key, so a changed prompt is a new image to every cache.
    prompt_texts: list[str] = field(default_factory=list)


class Metric(ABC):
    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    role: ClassVar[str] = "eval"  # which generated images it scores: "eval" or "prior"
    # True when an image's value depends on its group's other images (DIV): the harness then
    # always passes whole groups.
    needs_complete_groups: ClassVar[bool] = False
    description: ClassVar[str] = ""
    input_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    # One note per image of the last ``score`` call ("" when there is nothing to say).
    notes: list[str]

    @abstractmethod
    def fingerprint(self) -> dict:
        """Everything that changes the values: version, backbone + weights, preprocessing, convention."""

    @abstractmethod
    def score(self, inputs: ScoringInputs) -> np.ndarray:
        """One float per image of ``inputs``."""


class BackboneMetric(Metric):
    """A metric computed with one shared, process-cached backbone.

    Construction, backbone access and the fingerprint fields every metric records live here;
    subclasses name their backbone loader (``load_backbone = staticmethod(get_clip)``), their
    ``convention`` text, and extend ``fingerprint`` with anything specific to them.
    """

    version: ClassVar[int] = 1
    convention: ClassVar[str] = ""

    def __init__(self, settings: MetricSettings) -> None:
        self.settings = settings
        self.notes: list[str] = []

    @staticmethod
    @abstractmethod
    def load_backbone(settings: MetricSettings):
        """The process-cached backbone for ``settings``."""

    @property
    def backbone(self):
        return self.load_backbone(self.settings)

    def preprocessing(self) -> dict:
        return self.backbone.pipeline.describe()

    def fingerprint(self) -> dict:
        backbone = self.backbone
        return {
            "metric": self.name,
            "version": self.version,
            "role": self.role,
            "higher_is_better": self.higher_is_better,
            "weights": backbone.weights,
            "backbone": backbone.fingerprint(),
            "preprocessing": self.preprocessing(),
            "convention": self.convention,
        }


def parse_model_ref(value: object, where: str = "metrics.vlm_judge_model") -> tuple[str, str | None]:
    """``"owner/name@revision"`` -> (hub id, revision); without ``@`` the unpinned main branch (None)."""
    repo, at, revision = value.strip().partition("@") if isinstance(value, str) else ("", "", "")
    if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision) or " " in value:
        raise MetricInputError(
            f"{where}={value!r}: expected a hub id with a pinned revision, e.g. {VLM_JUDGE_MODEL!r}"
        )
    return repo, revision or None


@dataclass(frozen=True)
class MetricSettings:
    """How metric backbones are built: real weights or random init of the same architectures.

    ``precision``: "auto" runs the backbones under bf16 autocast on CUDA and in fp32 elsewhere;
    "fp32" forces fp32 everywhere (bit-for-bit comparable with CPU up to kernel rounding). The
    precision used is part of every fingerprint.

    ``cuda_graphs``: "auto" replays the backbones' forwards as CUDA graphs on CUDA devices
    (``metrics/replay.py``; the same kernels, so the same values: not in any fingerprint), "true"
    also runs its plumbing on a CPU (tests), "false" never.
    """

    weights: str = "pretrained"  # "pretrained" | "random"
    clip: str = "ViT-B-32"
    lpips_net: str = "alex"
    batch_size: int = 32
    device: str = "cpu"
    cache_dir: Path | None = None
    precision: str = "auto"
    vlm_judge_model: str = VLM_JUDGE_MODEL  # "hub/id@revision" of the vlm_judge metrics' VLM
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("weights", self.weights, WEIGHTS_CHOICES),
            ("clip", self.clip, CLIP_ARCHS),
            ("lpips_net", self.lpips_net, LPIPS_NETS),
            ("precision", self.precision, PRECISIONS),
            ("cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES),
        ):
            if value not in choices:
                raise MetricInputError(
                    f"MetricSettings.{name}={value!r} is not one of {', '.join(choices)}"
                )
        parse_model_ref(self.vlm_judge_model, "MetricSettings.vlm_judge_model")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise MetricInputError(
                f"MetricSettings.batch_size={self.batch_size!r}: expected a positive integer"
            )
