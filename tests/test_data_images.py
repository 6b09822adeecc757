"""Image loading on real files written here: every mode to RGB, EXIF orientation, crop/resize, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.images import ImageLoadError, center_crop_resize, load_image, open_image, to_tensor


def near(pixel, expected, tolerance=2) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    image.putpixel((1, 1), 1)
    if transparent:
        image.info["transparency"] = 0
    return image


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


# (name, builder(tmp_path) -> path, pixel to probe, expected RGB)
MODE_CASES = [
    ("L", lambda p: _save(Image.new("L", (4, 4), 100), p / "l.png"), (0, 0), (100, 100, 100)),
    ("LA-transparent", lambda p: _save(Image.new("LA", (4, 4), (0, 0)), p / "la.png"), (0, 0),
     (255, 255, 255)),
    ("RGBA-half", lambda p: _save(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), p / "rgba.png"),
     (0, 0), (255, 127, 127)),
    ("RGBA-opaque", lambda p: _save(Image.new("RGBA", (4, 4), (10, 20, 30, 255)), p / "o.png"),
     (0, 0), (10, 20, 30)),
    ("P", lambda p: _save(_palette(False), p / "p.png"), (1, 1), (0, 0, 255)),
    ("P-transparency", lambda p: _save(_palette(True), p / "pt.png"), (0, 0), (255, 255, 255)),
    ("P-transparency-opaque-pixel", lambda p: _save(_palette(True), p / "pt2.png"), (1, 1),
     (0, 0, 255)),
    ("CMYK-jpeg", lambda p: _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), p / "c.jpg",
                                  quality=100), (4, 4), (0, 255, 255)),
    ("CMYK-tiff", lambda p: _save(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), p / "c.tif"),
     (0, 0), (255, 0, 255)),
    ("I;16", lambda p: _save(Image.fromarray(np.full((4, 4), 32896, np.uint16)), p / "i16.png"),
     (0, 0), (128, 128, 128)),
    ("I-32bit", lambda p: _save(Image.fromarray(np.full((4, 4), 65535, np.int32)), p / "i.tif"),
     (0, 0), (255, 255, 255)),
    ("I-8bit-values", lambda p: _save(Image.fromarray(np.full((4, 4), 200, np.int32)), p / "i8.tif"),
     (0, 0), (200, 200, 200)),
    ("F", lambda p: _save(Image.fromarray(np.full((4, 4), 0.5, np.float32)), p / "f.tif"),
     (0, 0), (128, 128, 128)),
    ("1", lambda p: _save(Image.new("1", (4, 4), 1), p / "one.png"), (0, 0), (255, 255, 255)),
]


@pytest.mark.parametrize(("name", "build", "xy", "expected"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_becomes_rgb(tmp_path, name, build, xy, expected):
    path = build(tmp_path)
    image = open_image(path)
    assert image.mode == "RGB"
    assert near(image.getpixel(xy), expected), (name, image.getpixel(xy))


def test_premultiplied_modes_composite_on_white():
    from data.images import to_rgb

    assert to_rgb(Image.new("La", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBa", (2, 2), (100, 0, 0, 255))).getpixel((0, 0)) == (100, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    # 40x20 landscape: left half red, right half blue. Orientation 6 means "rotate 90 deg
    # clockwise to display": the left half must end up on top of a 20x40 portrait image.
    pixels = Image.new("RGB", (40, 20), (0, 0, 255))
    pixels.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    pixels.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)  # the file itself is stored unrotated
    image = open_image(path)
    assert image.size == (20, 40)
    assert near(image.getpixel((10, 5)), (255, 0, 0), 20)
    assert near(image.getpixel((10, 35)), (0, 0, 255), 20)


def test_center_crop_then_resize(tmp_path):
    # 300x100: green centre square between a red left and blue right third.
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    path = _save(image, tmp_path / "wide.png")
    loaded = load_image(path, resolution=64)
    assert loaded.size == (64, 64)
    colours = {loaded.getpixel((x, y)) for x in (1, 32, 62) for y in (1, 32, 62)}
    assert colours == {(0, 255, 0)}
    assert load_image(path).size == (300, 100)  # no resolution: untouched size
    with pytest.raises(ValueError, match="resolution must be a positive"):
        center_crop_resize(image, 0)


def test_to_tensor_range_and_shape(tmp_path):
    tensor = to_tensor([Image.new("RGB", (4, 4), (255, 0, 51))] * 2)
    assert tuple(tensor.shape) == (2, 3, 4, 4)
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    with pytest.raises(ValueError, match="one size"):
        to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 5))])


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def jpeg_bytes() -> bytes:
    import io

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_truncated_jpeg_names_the_file(tmp_path, jpeg_bytes):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    with pytest.raises(ImageLoadError, match=rf"^{path}: corrupt or truncated image .*re-download or replace"):
        open_image(path)


def test_truncated_png_names_the_file(tmp_path):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:-200])
    with pytest.raises(ImageLoadError, match=rf"^{path}: corrupt or truncated image"):
        open_image(path)


def test_text_file_with_jpg_suffix(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    with pytest.raises(ImageLoadError, match=rf"^{path}: not an image PIL can read.*remove it"):
        open_image(path)


def test_empty_missing_and_folder_paths(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=rf"^{empty}: empty file"):
        open_image(empty)
    with pytest.raises(ImageLoadError, match=rf"^{tmp_path / 'nope.png'}: no such image file"):
        load_image(tmp_path / "nope.png", 64)
    with pytest.raises(ImageLoadError, match="is a folder"):
        open_image(tmp_path)


def test_bad_image_error_is_not_a_pil_traceback(tmp_path, jpeg_bytes):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[:300])
    with pytest.raises(ImageLoadError) as caught:
        open_image(path)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
