"""The single-image track: which photo of a subject a method trains on, and which it is scored against.

``protocol.single_image`` picks, per run, the *training view* of every subject:

- ``"all"`` (the default track): training sees every image; DINO / CLIP-I / PRES compare with
  every image (the DreamBooth protocol);
- an index ``i``: training sees exactly image ``i`` (in the subject's sorted image order), and
  the fidelity metrics compare only with the subject's *other* images — never with the one the
  method saw, which it could simply reproduce.

A view is a ``Subject`` with the training images alone (its ``data_sha`` hashes only them, so
states and image keys change with the choice) plus the reference images the metrics use.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from data.errors import DatasetError
from data.subjects import Subject, subject_data_sha

ALL_IMAGES = "all"
GRID_NAME = "train_image"  # the grid column of the choice in plans and reports


@dataclass(frozen=True)
class TrainingView:
    """One subject as one track sees it."""

    choice: str | int  # "all" or the index of the one training image
    subject: Subject  # what the method's ``prepare`` receives (its images: the training images)
    references: tuple[Path, ...]  # what DINO / CLIP-I / PRES compare with
    reference_sha: str  # identifies ``references`` (scores are cached per reference set)

    @property
    def training_images(self) -> tuple[Path, ...]:
        return self.subject.images


def reference_set_sha(paths: tuple[Path, ...], subject: Subject) -> str:
    """The reference set's identity; the full set keeps the subject's own ``data_sha``."""
    if tuple(paths) == tuple(subject.images):
        return subject.data_sha
    digest = hashlib.sha256(f"references\0{subject.data_sha}\0".encode())
    for path in paths:
        digest.update(f"{Path(path).name}\n".encode())
    return digest.hexdigest()[:16]


def training_view(subject: Subject, choice: str | int) -> TrainingView:
    """The view of ``subject`` for ``choice`` ("all" or an image index), or a clear error."""
    if choice == ALL_IMAGES:
        return TrainingView(ALL_IMAGES, subject, tuple(subject.images), subject.data_sha)
    if isinstance(choice, bool) or not isinstance(choice, int) or choice < 0:
        raise DatasetError(f"protocol.single_image: {choice!r} is not 'all' or an image index >= 0")
    images = tuple(subject.images)
    if len(images) < 2:
        raise DatasetError(
            f"subject {subject.id!r} has only {len(images)} image(s); the single-image track trains "
            "on one and scores against the others, so it needs at least 2. Add photos of it or "
            "leave it out (subjects=...)"
        )
    if choice >= len(images):
        raise DatasetError(
            f"protocol.single_image={choice}: subject {subject.id!r} has {len(images)} images "
            f"(indices 0-{len(images) - 1}); choose an index below {len(images)}"
        )
    trained = (images[choice],)
    masks = (subject.masks[choice],) if subject.masks and len(subject.masks) == len(images) else None
    # The view's own hash: its training photo within this subject (a scene pair's scene included).
    view_sha = hashlib.sha256(f"view\0{subject.data_sha}\0{subject_data_sha(trained)}".encode()).hexdigest()[:16]
    view = dataclasses.replace(subject, images=trained, data_sha=view_sha, masks=masks)
    references = images[:choice] + images[choice + 1 :]
    return TrainingView(choice, view, references, reference_set_sha(references, subject))


def training_views(subject: Subject, choices: tuple[str | int, ...]) -> list[TrainingView]:
    return [training_view(subject, choice) for choice in choices]


def view_table(subject: Subject, choices: tuple[str | int, ...]) -> dict[str, dict]:
    """JSON-ready ``{choice: {"train": [...], "references": [...], "reference_sha": ...}}``."""
    out = {}
    for view in training_views(subject, choices):
        out[str(view.choice)] = {
            "train": [str(p) for p in view.training_images],
            "references": [str(p) for p in view.references],
            "reference_sha": view.reference_sha,
        }
    return out
