"""Subjects and the datasets that hold them: DreamBooth, the bundled mini set, custom folders.

A dataset is a folder with one sub-folder of images per subject. DreamBooth's classes come from
its ``prompts_and_classes.txt``; the mini set and custom datasets list theirs in a
``subjects.yaml`` (or ``subjects.csv``: ``subject_name,class,kind``) at the folder's root.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from data.images import IMAGE_SUFFIXES, ImageLoadError, open_image
from data.protocol import KINDS, Prompt, dreambooth_classes, prompt_templates

DATASET_SOURCES = ("mini", "dreambooth", "custom")
LIVE_CLASSES = frozenset({"cat", "dog"})  # the paper's 9 live subjects are its cats and dogs
DATASET_ENV = "SUBJECTBENCH_DATASET_DIR"
CACHE_ENV = "SUBJECTBENCH_CACHE"


class DatasetError(ValueError):
    """A dataset or subject that cannot be used, naming the file or subject and the fix."""


@dataclass(frozen=True)
class Subject:
    """One subject: its images, class noun and kind; ``data_sha`` hashes the image bytes."""

    id: str
    class_noun: str
    kind: str
    images: tuple[Path, ...]
    data_sha: str
    masks: tuple[Path, ...] | None = field(default=None, compare=False)

    def prompts(self) -> tuple[Prompt, ...]:
        return prompt_templates(self.kind)


def cache_root() -> Path:
    """Where downloads, class-prior images and masks are cached (``$SUBJECTBENCH_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "subjectbench")


def mini_dataset_dir() -> Path:
    return Path(str(resources.files("data").joinpath("mini")))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def subject_data_sha(images: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in images:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()[:16]


def subject_images(folder: Path, subject_id: str) -> tuple[Path, ...]:
    if not folder.is_dir():
        raise DatasetError(
            f"subject {subject_id!r}: folder {folder} does not exist; add its images there or "
            "remove the subject from the subject list"
        )
    images = tuple(
        sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    )
    if not images:
        raise DatasetError(
            f"subject {subject_id!r}: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); "
            "add at least one image of the subject"
        )
    return images


def make_subject(folder: Path, subject_id: str, class_noun: str, kind: str) -> Subject:
    if not class_noun or not str(class_noun).strip():
        raise DatasetError(f"subject {subject_id!r}: missing class noun; give it a 'class' (e.g. dog)")
    if kind not in KINDS:
        raise DatasetError(
            f"subject {subject_id!r}: kind {kind!r} is not one of {KINDS} "
            "(live for animals/people, object otherwise)"
        )
    images = subject_images(folder, subject_id)
    return Subject(
        id=subject_id,
        class_noun=str(class_noun).strip(),
        kind=kind,
        images=images,
        data_sha=subject_data_sha(images),
    )


def read_subject_table(root: Path) -> list[dict]:
    """Rows of ``subjects.yaml`` / ``subjects.csv``: id, class, kind."""
    yaml_path, csv_path = root / "subjects.yaml", root / "subjects.csv"
    if yaml_path.is_file():
        try:
            document = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise DatasetError(f"{yaml_path}: not valid YAML ({error})") from None
        rows = document.get("subjects") if isinstance(document, dict) else None
        if not isinstance(rows, list):
            raise DatasetError(
                f"{yaml_path}: expected a top-level 'subjects:' list of "
                "{id: ..., class: ..., kind: object|live}"
            )
        source = yaml_path
    elif csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            row.setdefault("id", row.pop("subject_name", None))
        source = csv_path
    else:
        raise DatasetError(
            f"{root}: no subjects.yaml or subjects.csv; a custom dataset lists its subjects there "
            "(see README, 'Your own subjects')"
        )
    out = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("id"):
            raise DatasetError(f"{source}: entry {number} has no 'id' (the subject's folder name)")
        class_noun = row.get("class") or row.get("class_noun")
        kind = row.get("kind") or ("live" if str(class_noun).strip() in LIVE_CLASSES else "object")
        out.append({"id": str(row["id"]), "class": class_noun, "kind": str(kind).strip()})
    return out


def dreambooth_dataset_dir(explicit: str | Path | None = None) -> Path:
    """The DreamBooth copy to use: explicit path, ``$SUBJECTBENCH_DATASET_DIR``, or the cache."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATASET_ENV):
        return Path(os.environ[DATASET_ENV]).expanduser()
    return cache_root() / "datasets" / "dreambooth"


def load_subjects(
    source: str = "mini",
    path: str | Path | None = None,
    subjects: list[str] | tuple[str, ...] | None = None,
) -> list[Subject]:
    """Load the subjects of a dataset, optionally only those named, in the dataset's order."""
    if source not in DATASET_SOURCES:
        raise DatasetError(f"unknown dataset source {source!r}; expected one of {DATASET_SOURCES}")
    if source == "dreambooth":
        root = dreambooth_dataset_dir(path)
        if not root.is_dir():
            raise DatasetError(
                f"DreamBooth dataset not found at {root}; run `subjectbench data download` or "
                f"pass --dataset-dir / set ${DATASET_ENV} to a local copy"
            )
        table = [
            {"id": s, "class": c, "kind": "live" if c in LIVE_CLASSES else "object"}
            for s, c in dreambooth_classes().items()
        ]
    else:
        root = mini_dataset_dir() if source == "mini" else Path(path or "").expanduser()
        if source == "custom" and (not path or not root.is_dir()):
            raise DatasetError(
                f"custom dataset folder {str(path)!r} does not exist; set dataset.path to a folder "
                "holding subjects.yaml and one image folder per subject"
            )
        table = read_subject_table(root)
    known = [row["id"] for row in table]
    if subjects:
        unknown = [s for s in subjects if s not in known]
        if unknown:
            raise DatasetError(
                f"unknown subject(s) {unknown} in {source} dataset at {root}; valid: {known}"
            )
        table = [row for row in table if row["id"] in set(subjects)]
    return [make_subject(root / row["id"], row["id"], row["class"], row["kind"]) for row in table]


def check_subject_images(subject: Subject) -> None:
    """Decode every image of a subject; raise on the first unusable file."""
    for path in subject.images:
        try:
            open_image(path)
        except ImageLoadError as error:
            raise DatasetError(f"subject {subject.id!r}: {error}") from None
