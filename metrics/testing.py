"""Fixed scoring inputs from the bundled mini set, shared by tests, golden values and benchmarks."""

from __future__ import annotations

import torch

from data.images import load_image, to_tensor
from data.subjects import load_subjects
from metrics.base import ScoringInputs

MINI_TEXTS = {"dog": "a dog on the beach", "duck_toy": "a toy in the jungle", "teapot": "a teapot on a table"}
# The same prompts as a method is given them, identifier included (clip_t_identifier).
MINI_PROMPTS = {"dog": "a sks dog on the beach", "duck_toy": "a sks toy in the jungle", "teapot": "a sks teapot on a table"}


def mini_images(per_subject: int = 4) -> tuple[torch.Tensor, list[str], list[str]]:
    """The mini images (3 subjects × ``per_subject`` ≤ 4, 128 px) as N×3×H×W in [0, 1], keys, subjects."""
    subjects = load_subjects("mini")
    paths = [(subject.id, path) for subject in subjects for path in subject.images[:per_subject]]
    images = to_tensor([load_image(path) for _, path in paths])
    keys = [f"mini/{subject}/{path.stem}" for subject, path in paths]
    return images, keys, [subject for subject, _ in paths]


def mini_scoring_inputs(reference_subject: str = "dog", per_subject: int = 4) -> ScoringInputs:
    """Mini images scored against the 4 real images of ``reference_subject``.

    Texts are per subject; each subject's images form one DIV group. The copy check sees the
    reference subject's photos as both its training and its own photos (the all-photos track);
    the scene of the scene + instance task is the first mini image.
    """
    images, keys, subjects = mini_images(per_subject)
    all_images, _, all_subjects = mini_images()
    references = [all_images[i] for i, subject in enumerate(all_subjects) if subject == reference_subject]
    return ScoringInputs(
        images=images,
        image_keys=keys,
        texts=[MINI_TEXTS[subject] for subject in subjects],
        prompt_texts=[MINI_PROMPTS[subject] for subject in subjects],
        references=references,
        reference_key=f"mini/{reference_subject}",
        groups=list(subjects),
        training_images=references,
        training_key=f"mini/{reference_subject}",
        subject_images=references,
        subject_key=f"mini/{reference_subject}",
        scene_images=[all_images[0]],
    )
