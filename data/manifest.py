"""The sha256 manifest of the DreamBooth dataset: parsing, the shipped copy, file hashing.

The manifest (``data/resources/dreambooth_sha256.txt``, ``sha256sum`` format) is the one
definition of "the DreamBooth dataset": download, verify and the loader all check against it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath

from data.errors import ManifestError

MANIFEST_RESOURCE = "dreambooth_sha256.txt"
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def safe_relative_path(name: str) -> bool:
    """True for a plain relative POSIX path that stays inside its root (no '..', no absolute)."""
    if not name or "\\" in name or "\0" in name or name.startswith("/"):
        return False
    if re.match(r"^[A-Za-z]:", name):
        return False
    parts = PurePosixPath(name).parts
    return all(part not in ("..", ".", "") for part in parts)


def parse_manifest(text: str, source: str = "manifest") -> dict[str, str]:
    """``{relative path: sha256}`` from ``sha256sum`` output; blank lines and '#' comments skip."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line.rstrip("\r"))
        if not match:
            raise ManifestError(
                f"{source}, line {number}: expected '<64 hex digits>  <path>', got {line[:80]!r}"
            )
        digest, name = match.group(1).lower(), match.group(2)
        if not safe_relative_path(name):
            raise ManifestError(f"{source}, line {number}: unsafe path {name!r} (must be relative)")
        if name in entries and entries[name] != digest:
            raise ManifestError(f"{source}, line {number}: {name} listed twice with different sums")
        entries[name] = digest
    if not entries:
        raise ManifestError(f"{source}: no entries")
    return entries


def load_manifest(path: str | Path) -> dict[str, str]:
    path = Path(path)
    return parse_manifest(path.read_text(encoding="utf-8"), source=str(path))


@lru_cache(maxsize=1)
def _shipped() -> tuple[tuple[str, str], ...]:
    text = resources.files("data").joinpath("resources", MANIFEST_RESOURCE).read_text("utf-8")
    return tuple(parse_manifest(text, source=f"data/resources/{MANIFEST_RESOURCE}").items())


def shipped_manifest() -> dict[str, str]:
    """The manifest of the pinned DreamBooth dataset that ships with the package."""
    return dict(_shipped())


def manifest_subjects(manifest: Mapping[str, str]) -> dict[str, list[str]]:
    """``{subject: [relative image paths]}`` for entries one folder deep, in sorted order."""
    subjects: dict[str, list[str]] = {}
    for name in sorted(manifest):
        parts = PurePosixPath(name).parts
        if len(parts) == 2:
            subjects.setdefault(parts[0], []).append(name)
    return subjects


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
