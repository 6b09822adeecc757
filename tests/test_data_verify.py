"""``data verify``: the real copy is clean; every kind of damage is reported with its file."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from data.errors import DatasetError
from data.manifest import manifest_subjects, parse_manifest, shipped_manifest
from data.verify import verify_custom, verify_dataset


def linked_copy(source: Path, target: Path) -> Path:
    """The dataset as symlinks (fast, read-only originals untouched); tests replace some files."""
    for path in source.rglob("*"):
        if path.is_file():
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, link)
    return target


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


@pytest.fixture
def damaged(dreambooth_dir, tmp_path) -> Path:
    root = linked_copy(dreambooth_dir, tmp_path / "db")
    (root / "dog" / "03.jpg").unlink()  # missing
    original = (dreambooth_dir / "teapot" / "01.jpg").read_bytes()
    replace(root / "teapot" / "01.jpg", original[: len(original) // 3])  # corrupt
    buffer = io.BytesIO()
    Image.open(dreambooth_dir / "vase" / "02.jpg").save(buffer, "JPEG", quality=70)
    replace(root / "vase" / "02.jpg", buffer.getvalue())  # decodes, but not the original
    Image.new("RGB", (8, 8)).save(root / "vase" / "07.jpg")  # extra image in a subject
    (root / "notes.txt").write_text("mine")  # extra file at the root
    replace(root / "prompts_and_classes.txt", b"edited")
    return root


def by_id(report):
    return {s.id: s for s in [*report.subjects, *report.other]}


# ----------------------------------------------------------------------------- the real copy


def test_real_copy_is_complete_and_clean(dreambooth_dir):
    report = verify_dataset(dreambooth_dir)
    assert report.ok
    totals = report.totals()
    assert (totals["subjects"], totals["images_expected"], totals["images_found"]) == (30, 158, 158)
    assert totals["checksum_mismatches"] == totals["missing"] == totals["extra_files"] == 0


def test_cli_verify_real_copy(dreambooth_dir, capsys):
    assert main(["data", "verify", "--dataset-dir", str(dreambooth_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("total: 30 subjects, 158/158 images, 0 missing, 0 corrupt, all checksums OK")
    assert out[-1].endswith(": OK")
    assert any(line.split()[:2] == ["backpack", "6/6"] for line in out)


def test_cli_verify_json_via_env(dreambooth_dir, capsys, monkeypatch):
    monkeypatch.setenv("SUBJECTBENCH_DATASET_DIR", str(dreambooth_dir))
    assert main(["data", "verify", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True and document["totals"]["images_found"] == 158
    assert len(document["subjects"]) == 30


def test_shipped_manifest_is_the_shared_sha256sums(dreambooth_dir):
    shared = parse_manifest((dreambooth_dir / "SHA256SUMS").read_text())
    assert shipped_manifest() == shared
    assert len(manifest_subjects(shared)) == 30


# ----------------------------------------------------------------------------- damage


def test_every_problem_is_reported_with_its_file(damaged):
    report = verify_dataset(damaged)
    assert not report.ok
    groups = by_id(report)
    assert groups["dog"].missing == ["dog/03.jpg"] and groups["dog"].found == 4
    assert [c["file"] for c in groups["teapot"].corrupt] == ["teapot/01.jpg"]
    assert "truncated" in groups["teapot"].corrupt[0]["reason"]
    assert groups["vase"].mismatched == ["vase/02.jpg"]
    assert groups["vase"].extra == ["vase/07.jpg"]
    assert groups["prompts_and_classes.txt"].mismatched == ["prompts_and_classes.txt"]
    assert report.extra == ["notes.txt"]
    assert all(groups[s].ok for s in ("backpack", "cat", "wolf_plushie"))
    totals = report.totals()
    assert (totals["missing"], totals["corrupt"], totals["checksum_mismatches"], totals["extra_files"]) == (
        1, 1, 2, 2)


def test_cli_verify_damaged_exits_1_and_names_files(damaged, capsys):
    assert main(["data", "verify", "--dataset-dir", str(damaged)]) == 1
    out = capsys.readouterr().out
    for expected in ("missing: dog/03.jpg", "corrupt: teapot/01.jpg", "checksum mismatch: vase/02.jpg",
                     "extra: vase/07.jpg", "extra: notes.txt"):
        assert expected in out
    assert out.strip().splitlines()[-1].endswith("FAILED")


def test_masks_folder_is_noted_not_failed(dreambooth_dir, tmp_path):
    root = linked_copy(dreambooth_dir, tmp_path / "db")
    (root / "masks" / "grabcut" / "dog").mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4)).save(root / "masks" / "grabcut" / "dog" / "00.png")
    (root / "maskz").mkdir()
    (root / "maskz" / "00.png").write_bytes(b"x")
    report = verify_dataset(root)
    assert report.extra == ["maskz/00.png"]
    assert any(note.startswith("masks/ holds") for note in report.notes)


def test_decode_all_catches_what_checksums_would(dreambooth_dir, tmp_path):
    # A manifest made from a broken file: the checksum agrees, only decoding can tell.
    root = tmp_path / "db"
    (root / "x").mkdir(parents=True)
    (root / "x" / "00.jpg").write_bytes(b"\xff\xd8 broken")
    manifest = {"x/00.jpg": hashlib.sha256(b"\xff\xd8 broken").hexdigest()}
    assert verify_dataset(root, manifest).ok
    assert not verify_dataset(root, manifest, decode_all=True).ok


def test_verify_missing_folder_is_an_error(tmp_path, capsys):
    with pytest.raises(DatasetError, match="does not exist; run `subjectbench data download`"):
        verify_dataset(tmp_path / "none")
    assert main(["data", "verify", "--dataset-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset folder") and "Traceback" not in err


# ----------------------------------------------------------------------------- custom datasets


@pytest.fixture
def custom(tmp_path) -> Path:
    root = tmp_path / "mine"
    for subject, colour in (("rex", (200, 0, 0)), ("mug", (0, 200, 0)), ("box", (0, 0, 200))):
        (root / subject).mkdir(parents=True)
        Image.new("RGB", (10, 10), colour).save(root / subject / "0.jpg")
    (root / "subjects.yaml").write_text(
        "subjects:\n"
        "  - {id: rex, class: dog}\n"
        "  - {id: mug, class: cup, kind: object}\n"
        "  - {id: box, class: box, kind: object}\n"
    )
    return root


def test_custom_clean(custom, capsys):
    report = verify_custom(custom)
    assert report.ok
    assert any("kind live (inferred" in note for note in by_id(report)["rex"].notes)
    assert main(["data", "verify", "--custom", str(custom)]) == 0
    assert capsys.readouterr().out.strip().endswith("no checksums (custom dataset), 0 unexpected "
                                                    "files, 0 other problems: OK")


def test_custom_problems_are_all_reported(custom, capsys):
    (custom / "rex" / "1.jpg").write_text("text, not a photo")
    good = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(good).save(buffer, "JPEG")
    (custom / "mug" / "0.jpg").write_bytes(buffer.getvalue()[:400])
    for path in (custom / "box").iterdir():
        path.unlink()
    (custom / "stray").mkdir()
    Image.new("RGB", (4, 4)).save(custom / "stray" / "a.png")
    (custom / "subjects.yaml").write_text(
        "subjects:\n"
        "  - {id: rex, class: dog, kind: pet}\n"
        "  - {id: mug, class: cup, kind: object}\n"
        "  - {id: box, class: box, kind: object}\n"
        "  - {id: gone, class: hat, kind: object}\n"
    )
    report = verify_custom(custom)
    groups = by_id(report)
    assert [c["file"] for c in groups["rex"].corrupt] == ["rex/1.jpg"]
    assert any("kind 'pet' is not one of" in p for p in groups["rex"].problems)
    assert [c["file"] for c in groups["mug"].corrupt] == ["mug/0.jpg"]
    assert any("no images in" in p for p in groups["box"].problems)
    assert any("does not exist" in p for p in groups["gone"].problems)
    assert any("stray/" in p for p in report.problems)
    assert main(["data", "verify", "--custom", str(custom), "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and document["totals"]["corrupt"] == 2


def test_custom_without_table_exits_2(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["data", "verify", "--custom", str(tmp_path)]) == 2
    assert "no subjects.yaml or subjects.csv" in capsys.readouterr().err


def test_damaging_the_linked_copy_left_the_originals_intact(dreambooth_dir, damaged):
    assert not verify_dataset(damaged).ok
    assert verify_dataset(dreambooth_dir).ok
