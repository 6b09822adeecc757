"""Safe extraction of a downloaded dataset archive (tar, tar.gz, zip) against a sha256 manifest.

Nothing is extracted with ``tarfile.extractall``: every entry is checked first (the whole
archive is refused if any entry is absolute, climbs out with '..', is a link pointing outside,
or is a device/fifo), then only the manifest's files are streamed out, hashed on the way, into a
staging folder. Only a fully verified folder is handed back.
"""

from __future__ import annotations

import hashlib
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from data.errors import DatasetError
from data.manifest import safe_relative_path

MAX_FILE_BYTES = 64 << 20  # the largest DreamBooth image is a few MB; more means a wrong file
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveEntry:
    """One archive member: ``kind`` is file, dir, symlink, hardlink or special."""

    name: str
    kind: str
    size: int
    link: str = ""


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def unsafe_reason(entry: ArchiveEntry) -> str | None:
    """Why extracting ``entry`` could write outside the target, or None when it is harmless."""
    name = _normalise(entry.name)
    if not name:
        return None  # the archive's own root ("./")
    if not safe_relative_path(name):
        return "its path is absolute or climbs out of the target with '..'"
    if entry.kind == "special":
        return "it is a device file, fifo or socket"
    if entry.kind == "symlink":
        if entry.link.startswith("/") or "\\" in entry.link:
            return f"it is a symlink to the absolute path {entry.link!r}"
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), entry.link))
        if resolved == ".." or resolved.startswith("../"):
            return f"it is a symlink pointing outside the target ({entry.link!r})"
    if entry.kind == "hardlink" and not safe_relative_path(_normalise(entry.link)):
        return f"it is a hard link to {entry.link!r}, outside the target"
    return None


def archive_format(path: Path) -> str:
    """'tar' or 'zip' from the file's first bytes (a download's name says nothing reliable)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar" or head.startswith((b"BZh", b"\xfd7zXZ")):
        return "tar"
    raise DatasetError(
        f"{path}: the download is neither a tar(.gz) nor a zip archive (it starts with "
        f"{head[:16]!r}); check the URL, e.g. an error page was served instead of the archive"
    )


class _Reader:
    """Uniform view of a tar or zip archive: entries, and a stream per regular file."""

    def __init__(self, path: Path):
        self.path = path
        self.format = archive_format(path)
        try:
            if self.format == "zip":
                self._zip = zipfile.ZipFile(path)
                self._entries = {e.name: e for e in self._zip_entries()}
            else:
                self._tar = tarfile.open(path, "r:*")
                self._members = {}
                self._entries = {e.name: e for e in self._tar_entries()}
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
            raise DatasetError(
                f"{path}: the archive is truncated or damaged ({type(error).__name__}: {error}); "
                "run the command again to download it afresh"
            ) from None

    def _tar_entries(self) -> Iterator[ArchiveEntry]:
        for member in self._tar.getmembers():
            if member.isreg():
                kind = "file"
            elif member.isdir():
                kind = "dir"
            elif member.issym():
                kind = "symlink"
            elif member.islnk():
                kind = "hardlink"
            else:
                kind = "special"
            self._members[member.name] = member
            yield ArchiveEntry(member.name, kind, member.size, member.linkname)

    def _zip_entries(self) -> Iterator[ArchiveEntry]:
        for info in self._zip.infolist():
            mode = (info.external_attr >> 16) & 0xFFFF
            if info.is_dir():
                kind = "dir"
            elif stat.S_ISLNK(mode):
                kind = "symlink"
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                kind = "special"
            else:
                kind = "file"
            link = self._zip.read(info).decode("utf-8", "replace") if kind == "symlink" else ""
            yield ArchiveEntry(info.filename, kind, info.file_size, link)

    def entries(self) -> list[ArchiveEntry]:
        return list(self._entries.values())

    def offset(self, name: str) -> int:
        """Position in the archive, so a compressed tar is read front to back, never re-wound."""
        if self.format == "zip":
            return self._zip.getinfo(name).header_offset
        return self._members[name].offset_data

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self.format == "zip":
            with self._zip.open(name) as stream:
                yield stream
        else:
            stream = self._tar.extractfile(self._members[name])
            if stream is None:
                raise DatasetError(f"{self.path}: entry {name} is not a regular file")
            with stream:
                yield stream

    def close(self) -> None:
        (self._zip if self.format == "zip" else self._tar).close()


def map_to_manifest(names: Iterable[str], manifest: Mapping[str, str]) -> dict[str, str]:
    """``{manifest path: source name}`` under the one folder prefix that holds most of them.

    The archive's and the hub's layouts differ (``dreambooth-<commit>/dataset/dog/00.jpg``,
    ``dataset/dog/00.jpg``): the prefix is found, not assumed.
    """
    names = {_normalise(name) for name in names}
    prefixes: Counter[str] = Counter()
    for name in names:
        parts = name.split("/")
        for cut in range(len(parts)):
            if "/".join(parts[cut:]) in manifest:
                prefixes["/".join(parts[:cut])] += 1
    if not prefixes:
        return {}
    best = max(prefixes.values())
    prefix = min((p for p, count in prefixes.items() if count == best), key=len)
    mapping = {}
    for relative in manifest:
        name = f"{prefix}/{relative}" if prefix else relative
        if name in names:
            mapping[relative] = name
    return mapping


def copy_verified(stream: IO[bytes], destination: Path) -> str:
    """Stream into ``destination`` (size-capped) and return its sha256; the caller compares."""
    digest = hashlib.sha256()
    written = 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "wb") as out:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            written += len(block)
            if written > MAX_FILE_BYTES:
                raise DatasetError(
                    f"{destination.name}: larger than {MAX_FILE_BYTES >> 20} MiB, not a dataset "
                    "file; the source is wrong (check the URL)"
                )
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def extract_verified(
    archive: Path,
    workdir: Path,
    manifest: Mapping[str, str],
    extra_files: Iterable[str] = (),
) -> Path:
    """Extract the manifest's files of ``archive`` into ``workdir/dataset`` and verify them.

    ``extra_files`` (e.g. the photo credits) are copied too when the archive has them, unverified.
    Raises DatasetError (and leaves no ``dataset`` folder) on any unsafe entry, missing file or
    checksum mismatch.
    """
    reader = _Reader(archive)
    try:
        entries = reader.entries()
        for entry in entries:
            reason = unsafe_reason(entry)
            if reason:
                raise DatasetError(
                    f"{archive}: refused, entry {entry.name!r} is unsafe to extract: {reason}. "
                    "Nothing was extracted; the archive is not the dataset's (check the URL)"
                )
        files = {_normalise(e.name): e.name for e in entries if e.kind in ("file", "hardlink")}
        mapping = map_to_manifest(files, manifest)
        missing = sorted(set(manifest) - set(mapping))
        if missing:
            raise DatasetError(
                f"{archive}: the archive lacks {len(missing)} of the {len(manifest)} dataset files "
                f"(first: {', '.join(missing[:3])}); it is not the pinned DreamBooth dataset "
                "(check the URL / source)"
            )
        prefix = next(iter(mapping.values()))[: -len(next(iter(mapping)))]
        wanted = dict(mapping)
        for extra in extra_files:
            if prefix + extra in files:
                wanted[extra] = prefix + extra
        dataset = workdir / "dataset"
        shutil.rmtree(workdir, ignore_errors=True)
        dataset.mkdir(parents=True)
        mismatched = []
        for relative, name in sorted(wanted.items(), key=lambda item: reader.offset(files[item[1]])):
            with reader.open(files[name]) as stream:
                digest = copy_verified(stream, dataset / relative)
            if relative in manifest and digest != manifest[relative]:
                mismatched.append(relative)
        if mismatched:
            shutil.rmtree(workdir, ignore_errors=True)
            raise DatasetError(
                f"{archive}: {len(mismatched)} file(s) do not match the pinned checksums "
                f"(first: {', '.join(mismatched[:3])}); refused, nothing was placed. The source "
                "serves different data than the pinned dataset: check the URL / mirror"
            )
        return dataset
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        shutil.rmtree(workdir, ignore_errors=True)
        raise DatasetError(
            f"{archive}: the archive is truncated or damaged ({type(error).__name__}: {error}); "
            "run the command again to download it afresh"
        ) from None
    finally:
        reader.close()
