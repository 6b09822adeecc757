"""How the bundled mini set (``data/mini``) is derived from the real DreamBooth dataset.

``python -m data.build_mini --source /path/to/dreambooth --out data/mini`` takes images 00-03 of
three subjects (one live, two objects), checks each against the pinned sha256 manifest, applies
the protocol's loader (EXIF orientation, RGB), center-crops to a square, resizes to 128 px
(bicubic) and writes optimized PNGs. With the same Pillow/zlib the output is byte-identical to
the bundled files; ``subjects.yaml`` and ``ATTRIBUTION.md`` are written by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.errors import DatasetError
from data.images import load_image
from data.manifest import file_sha256, shipped_manifest

MINI_SUBJECTS = ("dog", "duck_toy", "teapot")
MINI_IMAGES = 4
MINI_RESOLUTION = 128


def build_mini(source: str | Path, out: str | Path) -> list[Path]:
    """Write the mini images derived from the DreamBooth copy at ``source`` into ``out``."""
    source, out = Path(source), Path(out)
    manifest = shipped_manifest()
    written = []
    for subject in MINI_SUBJECTS:
        for index in range(MINI_IMAGES):
            name = f"{subject}/{index:02d}.jpg"
            original = source / name
            if not original.is_file() or file_sha256(original) != manifest[name]:
                raise DatasetError(
                    f"{original}: missing or not the pinned original; point --source at a "
                    "verified copy (`subjectbench data verify --dataset-dir ...`)"
                )
            image = load_image(original, MINI_RESOLUTION)
            target = out / subject / f"{index:02d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, format="PNG", optimize=True)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.build_mini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a verified DreamBooth copy")
    parser.add_argument("--out", required=True, help="output folder (e.g. data/mini)")
    args = parser.parse_args(argv)
    try:
        written = build_mini(args.source, args.out)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
