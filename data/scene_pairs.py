"""The scene + instance task: (scene image, instance images) pairs read from a small YAML or CSV.

Each pair becomes a ``Subject`` whose images are the instance photos and whose ``scene`` is the
scene image(s); its ``data_sha`` covers both, so keys change when either does. Its one prompt
places the instance in the scene: ``"a {0} {1} in the {scene}"`` by default, or the pair's own
``prompt`` (``{0}`` identifier, ``{1}`` class, ``{scene}`` the scene's words: "zwx scene" for
``two_stage``, which binds them in stage I, "scene" for methods that never saw it and for CLIP-T).

File format (paths relative to the file; ``dataset.source=pairs dataset.path=FILE``)::

    pairs:
      - id: dog_in_teapot_scene      # a plain name: it names folders
        scene: scenes/kitchen.png    # one image, or a list of images of the same scene
        instance: photos/rex         # a folder of photos of the instance (or a list of files)
        class: dog
        kind: live                   # optional: object | live (cat/dog are live otherwise)
        prompt: "a {0} {1} sitting in the {scene}"   # optional

or a CSV with the header ``id,scene,instance,class,kind,prompt`` (one scene file and one instance
folder per row). ``data/scene_pairs/pairs.yaml`` ships three pairs built from the mini subjects.
"""

from __future__ import annotations

import csv
import hashlib
import os
from importlib import resources
from pathlib import Path

import yaml

from data.errors import DatasetError
from data.images import IMAGE_SUFFIXES, ImageLoadError, open_image
from data.manifest import file_sha256
from data.protocol import Prompt
from data.subjects import LIVE_CLASSES, Subject, subject_images, validate_subject_row

DEFAULT_SCENE_PROMPT = "a {0} {1} in the {scene}"
FIELDS = ("id", "scene", "instance", "class", "kind", "prompt")


def bundled_pairs_file() -> Path:
    return Path(str(resources.files("data").joinpath("scene_pairs", "pairs.yaml")))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(
            f"scene pairs file {path} does not exist; set dataset.path to a pairs YAML/CSV "
            f"(format: data/scene_pairs.py; example: {bundled_pairs_file()})"
        )
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, skipinitialspace=True)
                missing = [f for f in ("id", "scene", "instance", "class") if f not in (reader.fieldnames or [])]
                if missing:
                    raise DatasetError(f"{path}: the CSV header lacks {missing}; expected {','.join(FIELDS)}")
                return [{k: v for k, v in row.items() if k and v not in (None, "")} for row in reader]
        document = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{path}: cannot be parsed ({error}); fix the syntax") from None
    rows = document.get("pairs") if isinstance(document, dict) else None
    if not isinstance(rows, list) or not rows:
        raise DatasetError(f"{path}: expected a top-level 'pairs:' list of {{id, scene, instance, class}} entries")
    return rows


def _files(value, base: Path, where: str, what: str) -> tuple[Path, ...]:
    items = value if isinstance(value, list) else [value]
    paths: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        path = Path(os.path.normpath(path if path.is_absolute() else base / path))
        if path.is_dir():
            paths.extend(subject_images(path, where))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DatasetError(f"{where}: {what} {path} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            paths.append(path)
        else:
            raise DatasetError(f"{where}: {what} {path} does not exist; give a path relative to the pairs file")
    for path in paths:
        try:
            open_image(path)
        except ImageLoadError as error:
            raise DatasetError(f"{where}: {what} cannot be read: {error}") from None
    return tuple(paths)


def pair_prompt(template: str) -> Prompt:
    return Prompt(template=template, category="scene", index=0)


def load_pairs(path: str | Path | None = None, wanted: list[str] | tuple[str, ...] | None = None) -> list[Subject]:
    """The pairs of ``path`` (default: the bundled ones) as subjects with a scene."""
    path = Path(path).expanduser() if path else bundled_pairs_file()
    subjects, seen = [], set()
    for number, row in enumerate(_rows(path), 1):
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: pair {number} is not a mapping of {', '.join(FIELDS)}")
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise DatasetError(f"{path}: pair {number} has unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
        pair_id = str(row.get("id") or "").strip()
        if not pair_id or "/" in pair_id or pair_id.startswith("."):
            raise DatasetError(f"{path}: pair {number} needs an 'id' that is a plain name (no '/'), got {pair_id!r}")
        if pair_id in seen:
            raise DatasetError(f"{path}: pair id {pair_id!r} is used twice; give each pair its own id")
        seen.add(pair_id)
        where = f"{path}: pair {pair_id!r}"
        for field in ("scene", "instance"):
            if not row.get(field):
                raise DatasetError(f"{where}: missing '{field}' (a path relative to the pairs file)")
        kind = row.get("kind") or ("live" if str(row.get("class", "")).strip().lower() in LIVE_CLASSES else "object")
        try:
            class_noun, kind = validate_subject_row(pair_id, row.get("class"), kind)
        except DatasetError as error:
            raise DatasetError(f"{path}: {error}") from None
        template = str(row.get("prompt") or DEFAULT_SCENE_PROMPT)
        if "{1}" not in template or "{0}" not in template:
            raise DatasetError(f"{where}: prompt {template!r} must contain {{0}} (identifier) and {{1}} (class)")
        scene = _files(row["scene"], path.parent, where, "scene")
        instance = _files(row["instance"], path.parent, where, "instance")
        digest = hashlib.sha256()
        for role, files in (("instance", instance), ("scene", scene)):
            for file in files:
                digest.update(f"{role}\0{file.name}\0{file_sha256(file)}\n".encode())
        digest.update(f"prompt\0{template}".encode())
        subjects.append(Subject(id=pair_id, class_noun=class_noun, kind=kind, images=instance,
                                data_sha=digest.hexdigest()[:16], scene=scene, scene_prompt=template))
    if wanted:
        missing = [w for w in wanted if w not in seen]
        if missing:
            raise DatasetError(f"unknown pair(s) {missing} in {path}; valid: {sorted(seen)}")
        subjects = [s for s in subjects if s.id in set(wanted)]
    return subjects
