"""The bundled mini set: what it holds, its attribution, and that it rebuilds from the originals."""

from __future__ import annotations

import PIL
import pytest
from PIL import Image

from data.build_mini import MINI_SUBJECTS, build_mini, main
from data.errors import DatasetError
from data.subjects import load_subjects, mini_dataset_dir
from data.verify import verify_custom


def test_mini_set_loads():
    subjects = load_subjects("mini")
    assert [s.id for s in subjects] == list(MINI_SUBJECTS) == ["dog", "duck_toy", "teapot"]
    assert [(s.class_noun, s.kind) for s in subjects] == [("dog", "live"), ("toy", "object"),
                                                         ("teapot", "object")]
    for subject in subjects:
        assert [p.name for p in subject.images] == ["00.png", "01.png", "02.png", "03.png"]
        for path in subject.images:
            with Image.open(path) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (128, 128))
    assert verify_custom(mini_dataset_dir()).ok


def test_attribution_credits_every_subject():
    text = (mini_dataset_dir() / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "Creative Commons Attribution 4.0" in text
    for subject in MINI_SUBJECTS:
        assert f"| {subject} |" in text


def test_mini_set_rebuilds_byte_identically(dreambooth_dir, tmp_path):
    written = build_mini(dreambooth_dir, tmp_path)
    assert len(written) == 12
    for path in written:
        bundled = mini_dataset_dir() / path.relative_to(tmp_path)
        if path.read_bytes() != bundled.read_bytes():
            same_pixels = Image.open(path).tobytes() == Image.open(bundled).tobytes()
            pytest.fail(f"{bundled} differs from its rebuild (pixels equal: {same_pixels}; "
                        f"Pillow {PIL.__version__} may encode PNG differently)")


def test_build_mini_refuses_a_wrong_source(tmp_path, capsys):
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "00.jpg")
    with pytest.raises(DatasetError, match=r"dog/00.jpg: missing or not the pinned original"):
        build_mini(tmp_path, tmp_path / "out")
    assert main(["--source", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not the pinned original" in capsys.readouterr().err
