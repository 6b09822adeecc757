"""Image loading for subjects: EXIF orientation, any mode to RGB, center crop, resize.

Every failure names the file and what to do about it; no PIL traceback reaches the user.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.common import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageLoadError(UserError, ValueError):
    """An image file that cannot be used, with the file named and the fix stated."""


def _integer_grey_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer grey to 8 bit, scaled by the bit depth the values use (PIL would clip)."""
    array = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        peak = 65535.0
    else:
        # Mode I holds 8- or 16-bit data read from PNG/TIFF as well as true 32-bit data; the
        # smallest depth that holds every value is the one the file was written with.
        top = float(array.max()) if array.size else 0.0
        peak = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


def _float_grey_to_l(image: Image.Image) -> Image.Image:
    array = np.nan_to_num(np.asarray(image, dtype=np.float64))
    # Float images come either normalised to [0, 1] or on the 8-bit scale.
    scale = 255.0 if (array.size == 0 or float(array.max()) <= 1.0) else 1.0
    array = np.clip(array * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        # A tRNS colour key: one grey level / colour means transparent.
        image = image.convert("RGBA")
    if image.mode.startswith("I"):
        image = _integer_grey_to_l(image)
    if image.mode == "F":
        image = _float_grey_to_l(image)
    if image.mode in ("La", "RGBa"):
        # Premultiplied alpha: the colour already carries the alpha, so white adds (1 - alpha).
        array = np.asarray(image).astype(np.float64)
        colour, alpha = array[..., :-1], array[..., -1:]
        composite = np.clip(colour + (255.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
        if composite.shape[-1] == 1:
            composite = np.repeat(composite, 3, axis=-1)
        return Image.fromarray(composite, mode="RGB")
    if image.mode in ("LA", "RGBA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and convert to RGB."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "no such image file"
        raise ImageLoadError(f"{path}: {what}; check the path or re-download the dataset")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes); replace it with the real image")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning becomes an error: such a file is not a photo.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                handle.load()
                image = ImageOps.exif_transpose(handle)
                image = to_rgb(image)
                image.load()
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{path}: not an image PIL can read (wrong suffix or not an image at all); remove it "
            "from the subject folder or replace it with a JPEG/PNG"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(
            f"{path}: refused, the image is implausibly large ({error}); downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError) as error:
        raise ImageLoadError(
            f"{path}: corrupt or truncated image ({type(error).__name__}: {error}); re-download "
            "or replace the file (`subjectbench data verify` lists every bad file)"
        ) from None
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{path}: image has zero size; replace the file")
    return image


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Largest centered square, then resize to ``resolution`` (bicubic, antialiased)."""
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
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

    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"to_tensor needs images of one size, got {sorted(sizes)}; resize first")
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)
