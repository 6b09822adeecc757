"""Subject loading: custom datasets (YAML and CSV), the DreamBooth copy, and every bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from data.errors import DatasetError
from data.subjects import (
    DATASET_ENV,
    Subject,
    check_subject_images,
    dreambooth_dataset_dir,
    load_subjects,
    read_subject_table,
)


def write_image(path: Path, colour=(200, 10, 10), size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def custom(tmp_path) -> Path:
    root = tmp_path / "mine"
    write_image(root / "rex" / "a.jpg")
    write_image(root / "rex" / "b.png", (0, 0, 200))
    write_image(root / "mug" / "1.jpg", (0, 200, 0))
    (root / "subjects.yaml").write_text(
        "subjects:\n  - {id: rex, class: dog, kind: live}\n  - {id: mug, class: cup, kind: object}\n"
    )
    return root


def writable_copy(source: Path, target: Path) -> Path:
    """Copy of a (read-only) folder that the test may change, whoever runs it."""
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def set_table(root: Path, yaml_text: str) -> None:
    (root / "subjects.yaml").write_text(yaml_text)


# ----------------------------------------------------------------------------- custom: good


def test_custom_yaml_dataset_loads(custom):
    subjects = load_subjects("custom", custom)
    assert [s.id for s in subjects] == ["rex", "mug"]
    rex = subjects[0]
    assert isinstance(rex, Subject)
    assert (rex.class_noun, rex.kind) == ("dog", "live")
    assert [p.name for p in rex.images] == ["a.jpg", "b.png"]
    assert len(rex.prompts()) == 25 and rex.prompts()[10].category == "accessorization"
    assert load_subjects("custom", custom, subjects=["mug"])[0].id == "mug"


def test_data_sha_follows_image_bytes(custom):
    before = load_subjects("custom", custom)[0].data_sha
    assert load_subjects("custom", custom)[0].data_sha == before
    write_image(custom / "rex" / "a.jpg", (1, 2, 3))
    assert load_subjects("custom", custom)[0].data_sha != before


def test_custom_csv_with_bom_spaces_and_subject_name(custom):
    (custom / "subjects.yaml").unlink()
    (custom / "subjects.csv").write_text(
        "\ufeffsubject_name, class, kind\nrex, dog, Live\n\nmug, cup,\n", encoding="utf-8"
    )
    table = read_subject_table(custom)
    assert [(r["id"], r["class"], r["kind"], r["kind_inferred"]) for r in table] == [
        ("rex", "dog", "Live", False),
        ("mug", "cup", "object", True),
    ]
    subjects = load_subjects("custom", custom)
    assert [(s.id, s.kind) for s in subjects] == [("rex", "live"), ("mug", "object")]


def test_missing_kind_is_inferred_like_dreambooth(custom):
    set_table(custom, "subjects:\n  - {id: rex, class: dog}\n  - {id: mug, class: cup}\n")
    assert [s.kind for s in load_subjects("custom", custom)] == ["live", "object"]


# ----------------------------------------------------------------------------- custom: bad


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("subjects:\n  - {id: rex, kind: live}\n", r"subject 'rex': missing class noun"),
        ("subjects:\n  - {id: rex, class: '  ', kind: live}\n", r"subject 'rex': missing class noun"),
        ("subjects:\n  - {id: rex, class: dog, kind: animal}\n",
         r"subject 'rex': kind 'animal' is not one of \('object', 'live'\)"),
        ("subjects:\n  - {id: ghost, class: toy, kind: object}\n",
         r"subject 'ghost': folder .*ghost does not exist"),
        ("subjects:\n  - {class: dog}\n", r"subjects.yaml: entry 1 has no 'id'"),
        ("subjects:\n  - {id: rex, class: dog}\n  - {id: rex, class: dog}\n",
         r"subject 'rex' is listed twice"),
        ("subjects:\n  - {id: ../rex, class: dog}\n", r"subject id '../rex' must be a plain folder"),
        ("subjects:\n  - {id: rex, class: dog\n", r"subjects.yaml: not valid YAML"),
        ("subjects: rex\n", r"expected a top-level 'subjects:' list"),
        ("subjects: []\n", r"lists no subjects"),
    ],
    ids=["no-class", "blank-class", "bad-kind", "no-folder", "no-id", "duplicate", "escape",
         "bad-yaml", "not-a-list", "empty"],
)
def test_bad_subject_tables_name_the_culprit(custom, table, message):
    set_table(custom, table)
    with pytest.raises(DatasetError, match=message):
        load_subjects("custom", custom)


def test_empty_subject_folder(custom):
    for path in (custom / "mug").iterdir():
        path.unlink()
    (custom / "mug" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"subject 'mug': no images in .*mug .*add at least one"):
        load_subjects("custom", custom)


def test_csv_without_id_column(custom):
    (custom / "subjects.yaml").unlink()
    (custom / "subjects.csv").write_text("name,class\nrex,dog\n")
    with pytest.raises(DatasetError, match=r"subjects.csv: the header must name an 'id'"):
        load_subjects("custom", custom)


def test_no_subject_table_and_no_folder(custom, tmp_path):
    (custom / "subjects.yaml").unlink()
    with pytest.raises(DatasetError, match=r"no subjects.yaml or subjects.csv"):
        load_subjects("custom", custom)
    with pytest.raises(DatasetError, match=r"custom dataset folder .*nowhere.* does not exist"):
        load_subjects("custom", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"custom dataset: no folder given"):
        load_subjects("custom", None)
    with pytest.raises(DatasetError, match=r"unknown dataset source 'laion'"):
        load_subjects("laion")


def test_corrupt_image_is_named_with_its_subject(custom):
    (custom / "rex" / "c.jpg").write_text("not a jpeg")
    rex = load_subjects("custom", custom)[0]  # loading is lazy about pixels
    with pytest.raises(DatasetError, match=r"subject 'rex': .*c.jpg: not an image PIL can read"):
        check_subject_images(rex)


def test_unknown_subject_lists_valid_ones(custom):
    with pytest.raises(DatasetError, match=r"unknown subject\(s\) \['cat'\].*valid: \['rex', 'mug'\]"):
        load_subjects("custom", custom, subjects=["cat"])


# ----------------------------------------------------------------------------- DreamBooth


def test_dreambooth_copy_loads_30_subjects(dreambooth_dir):
    subjects = load_subjects("dreambooth", dreambooth_dir)
    assert len(subjects) == 30
    assert sum(len(s.images) for s in subjects) == 158
    live = sorted(s.id for s in subjects if s.kind == "live")
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    backpack = subjects[0]
    assert (backpack.id, backpack.class_noun, backpack.kind) == ("backpack", "backpack", "object")
    assert [p.name for p in backpack.images] == [f"{i:02d}.jpg" for i in range(6)]


def test_dreambooth_dir_from_env(dreambooth_dir, monkeypatch):
    monkeypatch.setenv(DATASET_ENV, str(dreambooth_dir))
    assert dreambooth_dataset_dir() == dreambooth_dir
    assert [s.id for s in load_subjects("dreambooth", subjects=["teapot"])] == ["teapot"]


def test_dreambooth_changed_file_is_refused(dreambooth_dir, tmp_path):
    copy = tmp_path / "db"
    writable_copy(dreambooth_dir / "teapot", copy / "teapot")
    (copy / "teapot" / "02.jpg").write_bytes(b"changed")
    (copy / "teapot" / "04.jpg").unlink()
    with pytest.raises(
        DatasetError,
        match=r"subject 'teapot': .*02.jpg does not match its checksum; .*04.jpg is missing.*data verify",
    ):
        load_subjects("dreambooth", copy, subjects=["teapot"])


def test_dreambooth_extra_image_is_not_loaded(dreambooth_dir, tmp_path):
    copy = tmp_path / "db"
    writable_copy(dreambooth_dir / "vase", copy / "vase")
    write_image(copy / "vase" / "99.jpg")
    assert len(load_subjects("dreambooth", copy, subjects=["vase"])[0].images) == 6


def test_dreambooth_missing_copy(tmp_path):
    with pytest.raises(DatasetError, match=r"DreamBooth dataset not found at .*subjectbench data download"):
        load_subjects("dreambooth", tmp_path / "absent")
