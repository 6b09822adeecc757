"""Mask corruption operators: determinism, exact IoU on synthetic masks, monotonicity, parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics.mask_noise import (
    Corruption,
    MaskInputError,
    MaskSpecError,
    _signed_distance,
    check_mask,
    corrupt,
    format_sweep,
    mask_iou,
    masked_images,
    parse_sweep,
    sweep,
)


def square(size: int = 64, side: int = 20, top: int = 22, left: int = 22) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def disk(size: int = 96, radius: int = 30) -> np.ndarray:
    ys, xs = np.mgrid[:size, :size]
    return (ys - size / 2) ** 2 + (xs - size / 2) ** 2 <= radius**2


def test_exact_iou_on_simple_masks():
    clean = square()  # 20x20 = 400 px
    assert corrupt(clean, Corruption("empty")).iou == 0.0
    full = corrupt(clean, Corruption("full"))
    assert full.mask.all() and full.iou == pytest.approx(400 / 64**2)
    assert corrupt(clean, Corruption("bbox")).iou == 1.0  # a square is its own bounding box
    # The radius-1 disk is OpenCV's 3x3 ellipse, a plus sign: eroding a square by it removes
    # the one-pixel rim, 18x18 remain.
    assert corrupt(clean, Corruption("erode", 1)).iou == pytest.approx(18**2 / 20**2)
    assert corrupt(clean, Corruption("erode", 0)).iou == 1.0
    diagonal = np.zeros((10, 10), dtype=bool)
    diagonal[[2, 7], [2, 7]] = True  # two pixels: bbox is the 6x6 square between them
    assert corrupt(diagonal, Corruption("bbox")).iou == pytest.approx(2 / 36)
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_flip_rate_and_dilate_area():
    clean = square(size=200, side=100, top=50, left=50)
    flipped = corrupt(clean, Corruption("flip", 0.1), seed=0)
    rate = (flipped.mask ^ clean).mean()
    assert rate == pytest.approx(0.1, abs=0.005)
    dilated = corrupt(clean, Corruption("dilate", 3)).mask
    assert dilated[clean].all() and dilated.sum() > clean.sum()
    # A disk of radius 3 grows a square's side by 3 px each way; corners are rounded.
    assert 105**2 < dilated.sum() <= 106**2


@pytest.mark.parametrize("spec", ["erode:4", "dilate:4", "jitter:3", "flip:0.1", "bbox", "empty", "full"])
def test_deterministic_under_seed(spec):
    clean = disk()
    corruption = parse_sweep(spec)[0]
    first, again = corrupt(clean, corruption, seed=7), corrupt(clean, corruption, seed=7)
    assert np.array_equal(first.mask, again.mask) and first.iou == again.iou
    assert first.mask.dtype == bool and first.mask.shape == clean.shape
    if corruption.operator in ("jitter", "flip"):
        assert not np.array_equal(first.mask, corrupt(clean, corruption, seed=8).mask)


@pytest.mark.parametrize("operator,levels", [
    ("erode", [0, 1, 2, 4, 8, 16]),
    ("dilate", [0, 1, 2, 4, 8, 16]),
    ("jitter", [0, 1, 2, 4, 8]),
    ("flip", [0, 0.01, 0.05, 0.1, 0.3]),
])
def test_iou_falls_monotonically_with_the_level(operator, levels):
    clean = disk()
    ious = [corrupt(clean, Corruption(operator, level), seed=3).iou for level in levels]
    assert ious[0] == 1.0
    assert all(later < earlier for earlier, later in zip(ious, ious[1:])), ious


def test_jitter_moves_the_boundary_by_about_the_level():
    clean = disk(size=256, radius=80)
    jittered = corrupt(clean, Corruption("jitter", 4), seed=0).mask
    changed = jittered ^ clean
    distance_to_boundary = np.abs(_signed_distance(clean))
    assert changed.any() and distance_to_boundary[changed].max() <= 4 * 5  # within 5 standard deviations


def test_parse_sweep_and_round_trip():
    specs = parse_sweep(" erode:2,4,8 ; flip:0.05,0.1;bbox;empty;full;jitter:1.5")
    assert [str(s) for s in specs] == [
        "erode:2", "erode:4", "erode:8", "flip:0.05", "flip:0.1", "bbox", "empty", "full", "jitter:1.5"
    ]
    assert parse_sweep(format_sweep(specs)) == specs
    results = sweep(disk(), "erode:2;flip:0.05")
    assert [str(r.corruption) for r in results] == ["erode:2", "flip:0.05"]


@pytest.mark.parametrize("text,token,message", [
    ("erode:2,4;erod:8", "erod:8", "unknown mask operator 'erod'.*did you mean 'erode'"),
    ("erode:2,x", "erode:2,x", "level 'x' is not a number"),
    ("erode:2.5", "erode:2.5", "whole number of pixels"),
    ("flip:1.5", "flip:1.5", r"must lie in \[0, 1\]"),
    ("dilate:-1", "dilate:-1", ">= 0"),
    ("bbox:3", "bbox:3", "takes no level"),
    ("erode", "erode", "needs a radius level"),
    ("erode:", "erode:", "no level after ':'"),
    ("jitter:nan", "jitter:nan", "finite"),
])
def test_parse_errors_name_the_bad_token(text, token, message):
    with pytest.raises(MaskSpecError, match=message) as caught:
        parse_sweep(text)
    assert f"'{token}'" in str(caught.value)


def test_parse_rejects_empty_tokens():
    with pytest.raises(MaskSpecError, match="empty token"):
        parse_sweep("erode:2;;flip:0.1")
    with pytest.raises(MaskSpecError, match="empty mask-noise sweep"):
        parse_sweep("  ")


def test_bad_masks_are_refused():
    with pytest.raises(MaskInputError, match="mask: expected a 2-D H×W mask"):
        check_mask(np.zeros((2, 3, 4)))
    with pytest.raises(MaskInputError, match="binary mask"):
        check_mask(np.full((4, 4), 0.5))
    with pytest.raises(MaskInputError, match="masks\\[1\\]: size 32x16 \\(HxW\\) differs from its image 32x32"):
        masked_images(torch.rand(2, 3, 32, 32), [np.ones((32, 32), bool), np.ones((32, 16), bool)])
    with pytest.raises(MaskInputError, match="masks: expected one mask per image"):
        masked_images(torch.rand(2, 3, 32, 32), [np.ones((32, 32), bool)])
    assert issubclass(MaskInputError, ValueError)


def test_masked_images_fill_outside():
    images = torch.rand(1, 3, 8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:4] = True
    out = masked_images(images, [mask])
    assert torch.equal(out[0, :, 2:4, 2:4], images[0, :, 2:4, 2:4]) and out[0, :, 0, 0].eq(0).all()
