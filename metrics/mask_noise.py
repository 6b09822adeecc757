"""Mask corruption operators for mask-noise sensitivity sweeps (DESIGN: "Mask-noise sensitivity").

A sweep is a list of ``Corruption(operator, level)`` specs, written in configs as a string:
``"erode:2,4,8;dilate:4;jitter:2,4;flip:0.05,0.1;bbox;empty;full"``. Methods with mask-guided
training consume the corrupted masks; the metric drop against the clean-mask run is the
sensitivity. Every corruption reports its IoU with the clean mask, the x-axis of that curve.

Operators (on boolean H×W masks):
- ``erode:r`` / ``dilate:r`` — morphological erosion / dilation by a disk of radius r px
  (OpenCV, elliptic structuring element 2r+1; pixels beyond the image border count as
  foreground for erosion, so a subject cut by the frame is not eaten from the frame side).
- ``jitter:a`` — the boundary moves along its normal by a smooth random field of standard
  deviation a px (Gaussian-smoothed noise, correlation length ``JITTER_SIGMA`` px) added to the
  signed distance to the boundary.
- ``flip:p`` — every pixel flipped independently with probability p.
- ``bbox`` — the filled bounding box of the mask; ``empty`` — no pixel; ``full`` — every pixel.

Determinism: the random field of an operator depends only on (seed, operator), never on the
level, so the corrupted sets are nested as the level grows and IoU falls monotonically.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from data.common import UserError, did_you_mean

JITTER_SIGMA = 8.0
LEVELLED = {"erode": "radius", "dilate": "radius", "jitter": "pixels", "flip": "probability"}
UNLEVELLED = ("bbox", "empty", "full")
OPERATORS = (*LEVELLED, *UNLEVELLED)
EXAMPLE = "erode:2,4,8;flip:0.05,0.1;bbox"


class MaskInputError(ValueError):
    """A mask that cannot be used (wrong type, shape, or size for its image)."""


class MaskSpecError(UserError, ValueError):
    """A sweep string that cannot be parsed; the message names the bad token."""


@dataclass(frozen=True)
class Corruption:
    operator: str
    level: float | None = None

    def __post_init__(self) -> None:
        _check_level(self.operator, self.level, str(self))

    def __str__(self) -> str:
        if self.level is None:
            return self.operator
        level = int(self.level) if float(self.level).is_integer() else self.level
        return f"{self.operator}:{level}"


@dataclass(frozen=True)
class CorruptedMask:
    corruption: Corruption
    mask: np.ndarray
    iou: float


def _check_level(operator: str, level: float | None, token: str) -> None:
    if operator not in OPERATORS:
        raise MaskSpecError(
            f"unknown mask operator {operator!r} in {token!r}{did_you_mean(operator, OPERATORS)}; "
            f"valid: {', '.join(OPERATORS)}"
        )
    if operator in UNLEVELLED:
        if level is not None:
            raise MaskSpecError(f"{token!r}: operator {operator!r} takes no level (write just {operator!r})")
        return
    if level is None:
        raise MaskSpecError(f"{token!r}: operator {operator!r} needs a {LEVELLED[operator]} level, e.g. {operator}:4")
    if not np.isfinite(level) or level < 0:
        raise MaskSpecError(f"{token!r}: level {level!r} must be a finite number >= 0")
    if operator in ("erode", "dilate") and not float(level).is_integer():
        raise MaskSpecError(f"{token!r}: {operator} radius {level!r} must be a whole number of pixels")
    if operator == "flip" and level > 1:
        raise MaskSpecError(f"{token!r}: flip probability {level!r} must lie in [0, 1]")


def parse_sweep(text: str) -> tuple[Corruption, ...]:
    """``"erode:2,4;flip:0.1;bbox"`` -> (erode:2, erode:4, flip:0.1, bbox), in order."""
    if not isinstance(text, str) or not text.strip():
        raise MaskSpecError(f"empty mask-noise sweep {text!r}; expected e.g. {EXAMPLE!r}")
    specs: list[Corruption] = []
    for token in text.split(";"):
        token = token.strip()
        if not token:
            raise MaskSpecError(f"empty token in mask-noise sweep {text!r} (doubled or trailing ';')")
        operator, has_levels, levels = (part.strip() for part in token.partition(":"))
        if not has_levels:
            _check_level(operator, None, token)
            specs.append(Corruption(operator, None))
            continue
        if operator in UNLEVELLED:
            _check_level(operator, 0.0, token)
        if not levels:
            raise MaskSpecError(f"{token!r}: no level after ':'; e.g. {operator}:4")
        for raw in levels.split(","):
            raw = raw.strip()
            try:
                level = float(raw)
            except ValueError:
                raise MaskSpecError(f"{token!r}: level {raw!r} is not a number") from None
            _check_level(operator, level, token)
            specs.append(Corruption(operator, level))
    return tuple(specs)


def format_sweep(specs: tuple[Corruption, ...] | list[Corruption]) -> str:
    return ";".join(str(spec) for spec in specs)


def check_mask(mask: object, name: str = "mask", image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A boolean H×W array; ``image_size`` = (height, width) of the image it belongs to."""
    if hasattr(mask, "detach"):  # a torch tensor
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise MaskInputError(f"{name}: expected a 2-D numpy array or tensor, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise MaskInputError(f"{name}: expected a 2-D H×W mask, got shape {mask.shape}")
    if mask.dtype != bool:
        values = np.unique(mask)
        if not np.isin(values, (0, 1)).all():
            raise MaskInputError(f"{name}: expected a binary mask (bool or 0/1), got values {values[:5]}")
        mask = mask.astype(bool)
    if image_size is not None and tuple(mask.shape) != tuple(image_size):
        raise MaskInputError(
            f"{name}: size {mask.shape[0]}x{mask.shape[1]} (HxW) differs from its image "
            f"{image_size[0]}x{image_size[1]}; resize the mask with nearest-neighbour or remake it"
        )
    return mask


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union; two empty masks have IoU 1."""
    union = np.logical_or(first, second).sum()
    return 1.0 if union == 0 else float(np.logical_and(first, second).sum() / union)


def _rng(seed: int, operator: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(operator.encode())])


def _disk(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Positive inside (distance to the nearest background pixel), negative outside."""
    import cv2

    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return inside - outside


def corrupt(mask: np.ndarray, corruption: Corruption, seed: int = 0) -> CorruptedMask:
    """Apply one corruption to a clean mask; deterministic in (mask, corruption, seed)."""
    import cv2

    clean = check_mask(mask)
    operator, level = corruption.operator, corruption.level
    if operator in ("erode", "dilate"):
        radius = int(level)
        if radius == 0:
            out = clean.copy()
        else:
            morph = cv2.erode if operator == "erode" else cv2.dilate
            out = morph(clean.astype(np.uint8), _disk(radius)).astype(bool)
    elif operator == "jitter":
        if not clean.any() or clean.all():
            out = clean.copy()  # no boundary to move
        else:
            noise = _rng(seed, operator).standard_normal(clean.shape).astype(np.float32)
            field = cv2.GaussianBlur(noise, (0, 0), JITTER_SIGMA)
            field /= max(float(field.std()), 1e-12)
            out = (_signed_distance(clean) + float(level) * field) > 0
    elif operator == "flip":
        out = clean ^ (_rng(seed, operator).random(clean.shape) < float(level))
    elif operator == "bbox":
        out = np.zeros_like(clean)
        ys, xs = np.nonzero(clean)
        if ys.size:
            out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    elif operator == "empty":
        out = np.zeros_like(clean)
    else:
        out = np.ones_like(clean)
    return CorruptedMask(corruption, out, mask_iou(clean, out))


def sweep(mask: np.ndarray, specs: tuple[Corruption, ...] | list[Corruption] | str, seed: int = 0) -> list[CorruptedMask]:
    """Every corruption of a sweep (a spec list or its string form) applied to ``mask``."""
    if isinstance(specs, str):
        specs = parse_sweep(specs)
    return [corrupt(mask, spec, seed) for spec in specs]


def masked_images(images, masks, fill: float = 0.0):
    """Images (N×3×H×W tensor) with pixels outside their masks (N×H×W) set to ``fill``."""
    import torch

    if images.ndim != 4:
        raise MaskInputError(f"images: expected N×3×H×W, got shape {tuple(images.shape)}")
    if len(masks) != images.shape[0]:
        raise MaskInputError(f"masks: expected one mask per image ({images.shape[0]}), got {len(masks)}")
    checked = [check_mask(m, f"masks[{i}]", tuple(images.shape[-2:])) for i, m in enumerate(masks)]
    keep = torch.from_numpy(np.stack(checked)).to(images.device).unsqueeze(1)
    return torch.where(keep, images, torch.full_like(images, fill))
