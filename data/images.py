"""Image loading for subjects: EXIF orientation, any mode to RGB, center crop, resize.

Every failure names the file and what to do about it; no PIL traceback reaches the user.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageLoadError(ValueError):
    """An image file that cannot be used, with the file named and the fix stated."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grey: scale by the bit depth, not by 255 (PIL would clip).
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and convert to RGB."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such image file; check the path or re-download the dataset")
    try:
        with Image.open(path) as handle:
            handle.load()
            image = ImageOps.exif_transpose(handle)
            image = to_rgb(image)
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{path}: not an image PIL can read; remove it from the subject folder or replace it"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(
            f"{path}: corrupt or truncated image ({error}); re-download or replace the file "
            "(`subjectbench data verify` lists every bad file)"
        ) from None
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{path}: image has zero size; replace the file")
    return image


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Largest centered square, then resize to ``resolution`` (bicubic, antialiased)."""
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == resolution:
        return square
    return square.resize((resolution, resolution), Image.Resampling.BICUBIC)


def load_image(path: str | Path, resolution: int | None = None) -> Image.Image:
    """An RGB image ready for the protocol: oriented, converted, and (optionally) square-resized."""
    image = open_image(path)
    return center_crop_resize(image, resolution) if resolution else image


def to_tensor(images: list[Image.Image]):
    """PIL RGB images of equal size to a float tensor NCHW in [0, 1]."""
    import torch

    arrays = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)
