"""Subjects and the datasets that hold them: DreamBooth, the bundled mini set, custom folders.

A dataset is a folder with one sub-folder of images per subject. DreamBooth's classes come from
its ``prompts_and_classes.txt`` and its files from the shipped sha256 manifest; the mini set and
custom datasets list their subjects in a ``subjects.yaml`` (or ``subjects.csv``:
``id,class,kind``; ``subject_name`` is accepted for ``id``) at the folder's root.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from data.errors import DatasetError
from data.images import IMAGE_SUFFIXES, ImageLoadError, open_image
from data.manifest import file_sha256, manifest_subjects, safe_relative_path, shipped_manifest
from data.protocol import KINDS, Prompt, dreambooth_classes, prompt_templates

__all__ = [
    "DATASET_SOURCES",
    "DatasetError",
    "Subject",
    "cache_root",
    "check_subject_images",
    "dreambooth_dataset_dir",
    "file_sha256",
    "load_subjects",
    "make_subject",
    "mini_dataset_dir",
    "read_subject_table",
]

DATASET_SOURCES = ("mini", "dreambooth", "custom", "pairs")  # pairs: data/scene_pairs.py
LIVE_CLASSES = frozenset({"cat", "dog"})  # the paper's 9 live subjects are its cats and dogs
DATASET_ENV = "SUBJECTBENCH_DATASET_DIR"
CACHE_ENV = "SUBJECTBENCH_CACHE"
SUBJECT_TABLES = ("subjects.yaml", "subjects.yml", "subjects.csv")


@dataclass(frozen=True)
class Subject:
    """One subject: its images, class noun and kind; ``data_sha`` hashes the image bytes."""

    id: str
    class_noun: str
    kind: str
    images: tuple[Path, ...]
    data_sha: str
    masks: tuple[Path, ...] | None = field(default=None, compare=False)
    # The scene + instance task (data/scene_pairs.py): the scene image(s) and the one prompt
    # placing the instance in it; both are covered by data_sha.
    scene: tuple[Path, ...] | None = None
    scene_prompt: str | None = None

    def prompts(self) -> tuple[Prompt, ...]:
        if self.scene:
            return (Prompt(template=self.scene_prompt or "a {0} {1} in the {scene}", category="scene", index=0),)
        return prompt_templates(self.kind)


def cache_root() -> Path:
    """Where downloads, class-prior images and masks are cached (``$SUBJECTBENCH_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "subjectbench")


def mini_dataset_dir() -> Path:
    """The bundled mini set (3 DreamBooth subjects, 4 images each, 128 px)."""
    return Path(str(resources.files("data").joinpath("mini")))


def dreambooth_dataset_dir(explicit: str | Path | None = None) -> Path:
    """The DreamBooth copy to use: explicit path, ``$SUBJECTBENCH_DATASET_DIR``, or the cache."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATASET_ENV):
        return Path(os.environ[DATASET_ENV]).expanduser()
    return cache_root() / "datasets" / "dreambooth"


def subject_data_sha(images: tuple[Path, ...], digests: dict[Path, str] | None = None) -> str:
    digest = hashlib.sha256()
    for path in images:
        file_digest = (digests or {}).get(path) or file_sha256(path)
        digest.update(f"{path.name}\0{file_digest}\n".encode())
    return digest.hexdigest()[:16]


def subject_images(folder: Path, subject_id: str) -> tuple[Path, ...]:
    """The image files of a custom/mini subject folder, sorted by name."""
    if not folder.is_dir():
        raise DatasetError(
            f"subject {subject_id!r}: folder {folder} does not exist; add its images there or "
            "remove the subject from the subject list"
        )
    images = tuple(
        sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
    )
    if not images:
        raise DatasetError(
            f"subject {subject_id!r}: no images in {folder} (looked for "
            f"{', '.join(IMAGE_SUFFIXES)}); add at least one image of the subject"
        )
    return images


def validate_subject_row(subject_id: str, class_noun: object, kind: object) -> tuple[str, str]:
    """The cleaned (class noun, kind) of a subject, or an error naming the subject and the fix."""
    if class_noun is None or not str(class_noun).strip():
        raise DatasetError(
            f"subject {subject_id!r}: missing class noun; give it a 'class' (e.g. dog, backpack)"
        )
    kind_text = str(kind).strip().lower()
    if kind_text not in KINDS:
        raise DatasetError(
            f"subject {subject_id!r}: kind {kind!r} is not one of {KINDS} "
            "(live for animals/people, object otherwise)"
        )
    return str(class_noun).strip(), kind_text


def make_subject(folder: Path, subject_id: str, class_noun: str, kind: str) -> Subject:
    """A custom/mini subject from its folder (every image file in it, sorted by name)."""
    class_noun, kind = validate_subject_row(subject_id, class_noun, kind)
    images = subject_images(folder, subject_id)
    return Subject(
        id=subject_id,
        class_noun=class_noun,
        kind=kind,
        images=images,
        data_sha=subject_data_sha(images),
    )


def _find_subject_table(root: Path) -> Path:
    for name in SUBJECT_TABLES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(
        f"{root}: no subjects.yaml or subjects.csv; a custom dataset lists its subjects there, "
        "one entry per subject folder: id, class, kind (object|live)"
    )


def _yaml_rows(path: Path) -> list:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid YAML ({error}); fix the syntax") from None
    rows = document.get("subjects") if isinstance(document, dict) else document
    if not isinstance(rows, list):
        raise DatasetError(
            f"{path}: expected a top-level 'subjects:' list of {{id: ..., class: ..., kind: object|live}}"
        )
    return rows


def _csv_rows(path: Path) -> list:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            header = [str(h).strip().lower() for h in reader.fieldnames or []]
            if "id" not in header and "subject_name" not in header:
                raise DatasetError(
                    f"{path}: the header must name an 'id' (or 'subject_name') column, then "
                    f"'class' and 'kind'; found {reader.fieldnames}"
                )
            rows = []
            for row in reader:
                clean = {str(k).strip().lower(): (v.strip() if isinstance(v, str) else v)
                         for k, v in row.items() if k is not None}
                if not any(clean.values()):
                    continue  # blank line
                clean.setdefault("id", clean.pop("subject_name", None))
                rows.append(clean)
            return rows
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error}); save it as UTF-8 CSV") from None
    except csv.Error as error:
        raise DatasetError(f"{path}: not valid CSV ({error})") from None


def read_subject_table(root: Path) -> list[dict]:
    """Rows of ``subjects.yaml`` / ``subjects.csv``: ``{"id", "class", "kind", "kind_inferred"}``.

    A missing kind is inferred with DreamBooth's rule (cat/dog are live, the rest objects) and
    flagged, so that ``data verify`` can show it.
    """
    root = Path(root)
    source = _find_subject_table(root)
    rows = _csv_rows(source) if source.suffix == ".csv" else _yaml_rows(source)
    out: list[dict] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not str(row.get("id") or "").strip():
            raise DatasetError(f"{source}: entry {number} has no 'id' (the subject's folder name)")
        subject_id = str(row["id"]).strip()
        if not safe_relative_path(subject_id) or "/" in subject_id:
            raise DatasetError(
                f"{source}: entry {number}: subject id {subject_id!r} must be a plain folder name "
                "inside the dataset (no '/', '..' or absolute paths)"
            )
        if subject_id in seen:
            raise DatasetError(f"{source}: subject {subject_id!r} is listed twice; keep one entry")
        seen.add(subject_id)
        class_noun = row.get("class", row.get("class_noun"))
        kind = row.get("kind")
        inferred = kind is None or not str(kind).strip()
        if inferred:
            kind = "live" if str(class_noun).strip().lower() in LIVE_CLASSES else "object"
        out.append({"id": subject_id, "class": class_noun, "kind": str(kind).strip(),
                    "kind_inferred": inferred})
    if not out:
        raise DatasetError(f"{source}: lists no subjects; add one entry per subject folder")
    return out


def _dreambooth_subject(root: Path, subject_id: str, class_noun: str) -> Subject:
    """A DreamBooth subject: exactly the manifest's files, each checked against its sha256."""
    manifest = shipped_manifest()
    names = manifest_subjects(manifest).get(subject_id)
    if not names:
        raise DatasetError(f"subject {subject_id!r} is not in the shipped DreamBooth manifest")
    images, digests, problems = [], {}, []
    for name in names:
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        digest = file_sha256(path)
        if digest != manifest[name]:
            problems.append(f"{path} does not match its checksum")
        images.append(path)
        digests[path] = digest
    if problems:
        raise DatasetError(
            f"subject {subject_id!r}: {'; '.join(problems)}; run `subjectbench data verify "
            f"--dataset-dir {root}` for the full report and `subjectbench data download` to repair"
        )
    kind = "live" if class_noun in LIVE_CLASSES else "object"
    return Subject(
        id=subject_id,
        class_noun=class_noun,
        kind=kind,
        images=tuple(images),
        data_sha=subject_data_sha(tuple(images), digests),
    )


def load_subjects(
    source: str = "mini",
    path: str | Path | None = None,
    subjects: list[str] | tuple[str, ...] | None = None,
) -> list[Subject]:
    """Load the subjects of a dataset, optionally only those named, in the dataset's order."""
    if source not in DATASET_SOURCES:
        raise DatasetError(f"unknown dataset source {source!r}; expected one of {DATASET_SOURCES}")
    if source == "pairs":
        from data.scene_pairs import load_pairs

        return load_pairs(path, subjects)
    if source == "dreambooth":
        root = dreambooth_dataset_dir(path)
        if not root.is_dir():
            raise DatasetError(
                f"DreamBooth dataset not found at {root}; run `subjectbench data download` or "
                f"pass --dataset-dir / set ${DATASET_ENV} to a local copy"
            )
        table = [{"id": s, "class": c} for s, c in dreambooth_classes().items()]
    else:
        if source == "custom" and not path:
            raise DatasetError(
                "custom dataset: no folder given; set dataset.path to a folder holding "
                "subjects.yaml (or subjects.csv) and one image folder per subject"
            )
        root = mini_dataset_dir() if source == "mini" else Path(path).expanduser()
        if not root.is_dir():
            raise DatasetError(
                f"custom dataset folder {str(root)!r} does not exist; set dataset.path to a folder "
                "holding subjects.yaml (or subjects.csv) and one image folder per subject"
            )
        table = read_subject_table(root)
    known = [row["id"] for row in table]
    if subjects:
        unknown = [s for s in subjects if s not in known]
        if unknown:
            raise DatasetError(
                f"unknown subject(s) {unknown} in {source} dataset at {root}; valid: {known}"
            )
        wanted = set(subjects)
        table = [row for row in table if row["id"] in wanted]
    if source == "dreambooth":
        return [_dreambooth_subject(root, row["id"], row["class"]) for row in table]
    return [make_subject(root / row["id"], row["id"], row["class"], row["kind"]) for row in table]


def check_subject_images(subject: Subject) -> None:
    """Decode every image of a subject; raise on the first unusable file."""
    for path in subject.images:
        try:
            open_image(path)
        except ImageLoadError as error:
            raise DatasetError(f"subject {subject.id!r}: {error}") from None
