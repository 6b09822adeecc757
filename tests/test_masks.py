"""Subject masks: GrabCut on synthetic and real images, provenance and reuse, the quality report,
SAM through transformers (tiny random model from a local folder) and its offline failure."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from data.masks import (
    MaskError,
    SamSegmenter,
    folder_writable,
    grabcut_mask,
    load_subject_masks,
    make_masks,
    mask_quality,
    masks_root,
    with_masks,
)
from data.subjects import DatasetError, cache_root, load_subjects
from metrics.mask_noise import mask_iou


def synthetic_scene(size: int = 200, radius: int = 50) -> tuple[Image.Image, np.ndarray]:
    """A saturated red disk on grey noise, centred: GrabCut's easy case."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(90, 160, (size, size, 1), dtype=np.uint8).repeat(3, axis=2)
    ys, xs = np.mgrid[:size, :size]
    disk = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 <= radius**2
    pixels[disk] = (220, 20, 30)
    return Image.fromarray(pixels), disk


def test_grabcut_finds_a_centred_object_at_full_and_reduced_size():
    image, disk = synthetic_scene()
    full = grabcut_mask(image, {"max_side": 400})
    assert full.shape == disk.shape and mask_iou(full, disk) > 0.95
    reduced = grabcut_mask(image, {"max_side": 64})  # downscaled, then upsampled back
    assert reduced.shape == disk.shape and mask_iou(reduced, disk) > 0.9
    assert np.array_equal(grabcut_mask(image), grabcut_mask(image))  # seeded


def test_mask_quality_flags():
    empty, full = np.zeros((50, 50), bool), np.ones((50, 50), bool)
    assert mask_quality(empty)[1] == ["empty"]
    assert mask_quality(full)[1] == ["full", "touches all borders"]
    frame = np.zeros((50, 50), bool)
    frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = True
    assert mask_quality(frame)[1] == ["touches all borders"]
    assert mask_quality(synthetic_scene()[1]) == (pytest.approx(np.pi * 50**2 / 200**2, rel=0.02), [])


def test_masks_command_on_the_mini_set_records_provenance_and_resumes(capsys, tmp_path, monkeypatch):
    # a cache of its own: other tests (HiFi Tuner's mask loss) make mini-set masks in the shared one
    monkeypatch.setenv("SUBJECTBENCH_CACHE", str(tmp_path / "cache"))
    assert main(["data", "masks", "--segmenter", "grabcut", "--dataset", "mini", "--workers", "2"]) == 0
    report = capsys.readouterr().out
    assert "12 masks" in report and "(12 made, 0 reused)" in report and "touches all borders" in report
    subjects = load_subjects("mini")
    root = masks_root(subjects[0].images[0].parent.parent, "mini")
    assert root.is_relative_to(cache_root())  # never inside the package's mini folder
    sidecar = json.loads((root / "grabcut" / "teapot" / "00.json").read_text())
    assert sidecar["producer"] == "grabcut" and sidecar["version"] == 1 and sidecar["params"]["max_side"] == 256
    assert sidecar["source_image"] == "00.png" and len(sidecar["source_sha256"]) == 64
    assert (root / "report-grabcut.json").is_file()
    masks = load_subject_masks(with_masks(subjects[2], "grabcut", source="mini"))
    assert len(masks) == 4 and all(m.shape == (128, 128) and m.dtype == bool for m in masks)

    assert main(["data", "masks", "--segmenter", "grabcut", "--dataset", "mini", "--workers", "1"]) == 0
    assert "(0 made, 12 reused)" in capsys.readouterr().out
    assert main(["data", "masks", "--segmenter", "grabcut", "--dataset", "mini", "--subjects", "dog",
                 "--force", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 masks" in out and "(4 made, 0 reused)" in out


def test_a_mask_of_the_wrong_size_is_refused(tmp_path):
    subject = load_subjects("mini", subjects=["dog"])[0]
    make_masks([subject], tmp_path, "grabcut")
    paths = sorted((tmp_path / "grabcut" / "dog").glob("*.png"))
    Image.fromarray(np.zeros((64, 128), np.uint8)).save(paths[1])
    with pytest.raises(MaskError, match=r"01.png: mask size 128x64 differs from its image .*128x128"):
        load_subject_masks(dataclasses.replace(subject, masks=tuple(paths)))
    assert issubclass(MaskError, ValueError) and issubclass(MaskError, DatasetError)


def test_missing_masks_name_the_command():
    subject = load_subjects("mini", subjects=["teapot"])[0]
    with pytest.raises(MaskError, match="subjectbench data masks --segmenter sam"):
        with_masks(subject, "sam", source="mini")


def test_grabcut_on_real_dreambooth_images(dreambooth_dir, tmp_path):
    # A read-only shared copy (r-x, even for root) gets its masks in the cache, not beside it.
    assert folder_writable(dreambooth_dir) or masks_root(dreambooth_dir).is_relative_to(cache_root())
    subject = load_subjects("dreambooth", dreambooth_dir, ["dog"])[0]
    records = make_masks([subject], tmp_path, "grabcut", workers=2)
    assert len(records) == len(subject.images)
    for record in records:
        assert 0.02 < record.foreground_fraction < 0.9 and not record.flags, record


def test_sam_offline_fails_fast_and_clearly(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.monotonic()
    assert main(["data", "masks", "--segmenter", "sam", "--dataset", "mini"]) == 2
    assert time.monotonic() - started < 30  # a hang guard: no download is attempted
    error = capsys.readouterr().err
    assert "facebook/sam-vit-base" in error and "--segmenter grabcut" in error and "HF_HUB_OFFLINE" in error


@pytest.fixture(scope="module")
def tiny_sam_folder(tmp_path_factory):
    """A random-init SAM with tiny dimensions, saved like a hub download."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    folder = tmp_path_factory.mktemp("sam") / "sam-tiny-random"
    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        SamModel(config).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)
    return folder


def test_sam_path_runs_through_transformers(tiny_sam_folder, tmp_path):
    segmenter = SamSegmenter(str(tiny_sam_folder))
    image, _ = synthetic_scene(size=96)
    mask = segmenter(image, (20, 20, 76, 76))
    assert mask.shape == (96, 96) and mask.dtype == bool
    subject = load_subjects("mini", subjects=["teapot"])[0]
    records = make_masks([subject], tmp_path, "sam", sam_model=str(tiny_sam_folder))
    assert len(records) == 4
    sidecar = json.loads((tmp_path / "sam-sam-tiny-random" / "teapot" / "00.json").read_text())
    assert sidecar["producer"] == "sam-sam-tiny-random" and sidecar["params"]["model"] == str(tiny_sam_folder)
