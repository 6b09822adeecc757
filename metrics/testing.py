"""Fixed scoring inputs from the bundled mini set, shared by tests, golden values and benchmarks."""

from __future__ import annotations

import torch

from data.images import load_image, to_tensor
from data.subjects import load_subjects
from metrics.base import ScoringInputs

MINI_TEXTS = {"dog": "a dog on the beach", "duck_toy": "a toy in the jungle", "teapot": "a teapot on a table"}


def mini_images() -> tuple[torch.Tensor, list[str], list[str]]:
    """The 12 mini images (3 subjects × 4, 128 px) as N×3×H×W in [0, 1], their keys and subjects."""
    subjects = load_subjects("mini")
    paths = [(subject.id, path) for subject in subjects for path in subject.images]
    images = to_tensor([load_image(path) for _, path in paths])
    keys = [f"mini/{subject}/{path.stem}" for subject, path in paths]
    return images, keys, [subject for subject, _ in paths]


def mini_scoring_inputs(reference_subject: str = "dog") -> ScoringInputs:
    """All 12 mini images scored against the real images of ``reference_subject``.

    Texts are per subject; each subject's 4 images form one DIV group.
    """
    images, keys, subjects = mini_images()
    references = [images[i] for i, subject in enumerate(subjects) if subject == reference_subject]
    return ScoringInputs(
        images=images,
        image_keys=keys,
        texts=[MINI_TEXTS[subject] for subject in subjects],
        references=references,
        reference_key=f"mini/{reference_subject}",
        groups=list(subjects),
    )
