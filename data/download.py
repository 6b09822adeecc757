"""Downloading the DreamBooth dataset: hub mirror or GitHub archive, verified, placed atomically.

Order of work: (1) a copy already at the target that verifies is kept, with no network at all;
(2) the hub mirror (``google/dreambooth``, pinned revision) after a bounded reachability probe;
(3) the GitHub archive at the pinned commit (or ``$SUBJECTBENCH_DATASET_URL``), downloaded to a
partial file that later runs resume with HTTP Range. Every file is checked against the shipped
sha256 manifest in a staging folder beside the target, and only a verified folder is renamed
into place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import ProxyHandler, Request, build_opener

from data.archive import copy_verified, extract_verified, map_to_manifest
from data.common import atomic_write_json, file_lock
from data.errors import DatasetError
from data.manifest import shipped_manifest
from data.subjects import dreambooth_dataset_dir
from data.verify import verify_dataset

GITHUB_REPO = "google/dreambooth"
# PROVENANCE of the shared copy: the dataset/ folder at this commit is what the manifest lists.
GITHUB_COMMIT = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"
HUB_REPO = "google/dreambooth"
# huggingface.co/datasets/google/dreambooth/tree/3512f046...: the commit after "Upload 160 files";
# later commits only edit README.md. Unverified against the live hub from this machine.
HUB_REVISION = "3512f046fbf17154239ad6a63f21c7d3537f39e0"
URL_ENV = "SUBJECTBENCH_DATASET_URL"
DOWNLOAD_SOURCES = ("auto", "hub", "github")
CREDIT_FILES = ("references_and_licenses.txt",)  # CC-BY: the photo credits travel with the images
MARKER = ".subjectbench-source.json"
MAX_ARCHIVE_BYTES = 1 << 30
_USER_AGENT = "subjectbench-data-download"


@dataclass(frozen=True)
class DownloadResult:
    """Where the dataset is, where it came from ('present', 'hub', 'github') and a summary."""

    path: Path
    source: str
    files: int
    message: str


class _SourceFailed(Exception):
    """This source cannot deliver the verified dataset; another source may."""


class _Transient(Exception):
    """A dropped connection, timeout or 5xx: worth a retry that resumes."""


def github_archive_url(commit: str = GITHUB_COMMIT) -> str:
    return f"https://github.com/{GITHUB_REPO}/archive/{commit}.tar.gz"


def default_archive_url() -> str:
    """``$SUBJECTBENCH_DATASET_URL`` (a mirror of the archive), else GitHub at the pinned commit."""
    return os.environ.get(URL_ENV) or github_archive_url()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- HTTP


def _opener(url: str):
    host = urlparse(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return build_opener(ProxyHandler({}))  # a proxy must never see a loopback test server
    return build_opener()


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write_json(path, meta)


def _fetch_once(url: str, part: Path, meta_path: Path, timeout: float, log) -> None:
    """One HTTP request that appends to ``part`` (Range) or restarts it; raises _Transient."""
    meta = _read_meta(meta_path)
    have = part.stat().st_size if part.exists() else 0
    if meta.get("complete") and meta.get("total") == have:
        return
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    try:
        response = _opener(url).open(Request(url, headers=headers), timeout=timeout)
    except HTTPError as error:
        if error.code == 416 and have:
            part.unlink(missing_ok=True)
            raise _Transient("the server refused to resume; restarting from zero") from None
        if error.code >= 500 or error.code in (408, 429):
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        raise DatasetError(
            f"{url}: HTTP {error.code} {error.reason}; check the URL (or ${URL_ENV}), or copy the "
            "dataset by hand and pass --dataset-dir"
        ) from None
    except (URLError, OSError, HTTPException) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (TimeoutError, ConnectionResetError, HTTPException)):
            raise _Transient(f"{type(reason).__name__}: {reason}") from None
        raise DatasetError(
            f"cannot reach {url} ({reason}); check the network, set ${URL_ENV} to a reachable "
            "mirror of the archive, or copy the dataset by hand and pass --dataset-dir"
        ) from None
    with response:
        resumed = response.status == 206 and have > 0
        if resumed:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                part.unlink(missing_ok=True)
                raise _Transient(f"unexpected Content-Range {content_range!r}; restarting")
            log(f"resuming the download at byte {have}")
        elif have:
            log("the server does not resume this download; restarting from zero")
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        if total and total > MAX_ARCHIVE_BYTES:
            raise DatasetError(f"{url}: {total} bytes is far more than the dataset; check the URL")
        meta = {"url": url, "total": total, "etag": response.headers.get("ETag"),
                "last_modified": response.headers.get("Last-Modified")}
        _write_meta(meta_path, meta)
        received = have
        # Only reading is transient; a failed write (disk full) is the caller's OSError.
        with open(part, "ab" if resumed else "wb") as out:
            while True:
                try:
                    block = response.read(1 << 16)
                except (HTTPException, OSError) as error:
                    raise _Transient(f"connection lost after {received} bytes "
                                     f"({type(error).__name__})") from None
                if not block:
                    break
                received += len(block)
                if received > MAX_ARCHIVE_BYTES:
                    raise DatasetError(f"{url}: more than {MAX_ARCHIVE_BYTES} bytes; check the URL")
                out.write(block)
    if total is not None and received < total:
        raise _Transient(f"connection closed after {received} of {total} bytes")
    if total is not None and received > total:
        part.unlink(missing_ok=True)
        raise _Transient(f"received {received} bytes but {total} were announced; restarting")
    _write_meta(meta_path, meta | {"complete": True, "total": received})


def fetch(url: str, part: Path, timeout: float = 30.0, retries: int = 3,
          retry_wait: float = 1.0, log: Callable[[str], None] = _stderr) -> Path:
    """Download ``url`` into ``part``, resuming what an earlier, interrupted run left there."""
    meta_path = part.with_name(part.name + ".json")
    if _read_meta(meta_path).get("url") != url:
        part.unlink(missing_ok=True)  # a partial file of another URL cannot be resumed
        meta_path.unlink(missing_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, meta_path, timeout, log)
            return part
        except _Transient as error:
            size = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DatasetError(
                    f"download of {url} interrupted ({error}); {size} bytes are kept in {part}: "
                    "run the same command again to resume"
                ) from None
            log(f"download interrupted ({error}); retrying ({attempt + 1}/{retries})")
            time.sleep(retry_wait * (attempt + 1))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- sources


def _from_archive(url: str, staging: Path, manifest: Mapping[str, str], timeout: float,
                  retries: int, retry_wait: float, log) -> Path:
    log(f"downloading {url}")
    part = fetch(url, staging / "archive.part", timeout, retries, retry_wait, log)
    try:
        return extract_verified(part, staging / "extract", manifest, CREDIT_FILES)
    except DatasetError:
        # A complete archive that fails verification must not be resumed next time.
        part.unlink(missing_ok=True)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
        raise


def _from_hub(staging: Path, manifest: Mapping[str, str], repo: str, revision: str,
              timeout: float, log) -> Path:
    """Snapshot of the hub mirror, mapped onto the manifest's names and verified.

    The mirror's layout is not pinned by anything we ship, so files are matched by their
    path suffix (``.../dog/00.jpg``) and every checksum is compared before use.
    """
    from data.common import hub_reachable

    if not hub_reachable(timeout=min(timeout, 3.0)):
        raise _SourceFailed(
            "the Hugging Face hub is unreachable (offline, HF_HUB_OFFLINE=1, or HF_ENDPOINT="
            f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} does not answer)"
        )
    from huggingface_hub import snapshot_download

    local = staging / "hub"
    log(f"downloading {repo}@{revision[:12]} from the Hugging Face hub")
    try:
        snapshot_download(repo_id=repo, repo_type="dataset", revision=revision,
                          local_dir=str(local), etag_timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any hub failure means: try the next source
        raise _SourceFailed(f"hub download of {repo}@{revision} failed: {type(error).__name__}: "
                            f"{str(error)[:300]}") from None
    names = [p.relative_to(local).as_posix() for p in local.rglob("*")
             if p.is_file() and ".cache" not in p.relative_to(local).parts]
    mapping = map_to_manifest(names, manifest)
    missing = sorted(set(manifest) - set(mapping))
    if missing:
        raise _SourceFailed(f"the hub snapshot lacks {len(missing)} dataset files "
                            f"(first: {', '.join(missing[:3])})")
    dataset = staging / "extract" / "dataset"
    shutil.rmtree(dataset.parent, ignore_errors=True)
    mismatched = []
    prefix = mapping[next(iter(mapping))][: -len(next(iter(mapping)))]
    wanted = dict(mapping) | {c: prefix + c for c in CREDIT_FILES if (local / (prefix + c)).is_file()}
    for relative, name in wanted.items():
        with open(local / name, "rb") as stream:
            digest = copy_verified(stream, dataset / relative)
        if relative in manifest and digest != manifest[relative]:
            mismatched.append(relative)
    shutil.rmtree(local, ignore_errors=True)
    if mismatched:
        shutil.rmtree(dataset.parent, ignore_errors=True)
        raise _SourceFailed(f"{len(mismatched)} hub files do not match the pinned checksums "
                            f"(first: {', '.join(mismatched[:3])})")
    return dataset


# ----------------------------------------------------------------------------- placing


@contextmanager
def _exclusive(staging: Path) -> Iterator[None]:
    """One download per target at a time (the lock dies with its process)."""
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(staging / ".lock", blocking=False))
        except BlockingIOError:
            raise DatasetError(
                f"another `subjectbench data download` is writing {staging}; wait for it to end"
            ) from None
        yield


def _present(target: Path, manifest: Mapping[str, str]) -> list[str] | None:
    """None when ``target`` holds the verified dataset, else the first problems found."""
    report = verify_dataset(target, manifest)
    if report.ok:
        return None
    problems = [f"{s.id}: missing {s.missing[:2]}" for s in [*report.subjects, *report.other]
                if s.missing]
    problems += [f"{s.id}: checksum mismatch {s.mismatched[:2]}" for s in report.subjects if s.mismatched]
    problems += [f"{s.id}: corrupt {[c['file'] for c in s.corrupt[:2]]}" for s in report.subjects if s.corrupt]
    problems += [f"extra files {report.extra[:2]}"] if report.extra else []
    problems += [f"{s.id}: extra files {s.extra[:2]}" for s in report.subjects if s.extra]
    return problems or ["does not verify"]


def download_dataset(
    dataset_dir: str | Path | None = None,
    *,
    source: str = "auto",
    manifest: Mapping[str, str] | None = None,
    url: str | None = None,
    hub_repo: str = HUB_REPO,
    hub_revision: str = HUB_REVISION,
    timeout: float = 30.0,
    retries: int = 3,
    retry_wait: float = 1.0,
    force: bool = False,
    log: Callable[[str], None] = _stderr,
) -> DownloadResult:
    """Make ``dataset_dir`` (default: ``dreambooth_dataset_dir()``) hold the verified dataset.

    ``manifest`` and ``url`` default to the shipped manifest and ``default_archive_url()``;
    tests pass small ones. An existing folder that does not verify is left alone unless
    ``force``, which renames it to ``<name>.old-<time>`` (never deletes it).
    """
    if source not in DOWNLOAD_SOURCES:
        raise DatasetError(f"unknown download source {source!r}; expected one of {DOWNLOAD_SOURCES}")
    target = dreambooth_dataset_dir(dataset_dir)
    manifest = dict(shipped_manifest() if manifest is None else manifest)
    if target.exists() and not target.is_dir():
        raise DatasetError(f"{target} exists and is not a folder; pass another --dataset-dir")
    if target.is_dir():
        problems = _present(target, manifest)
        if problems is None:
            return DownloadResult(target, "present", len(manifest),
                                  f"{target}: already present and verified ({len(manifest)} files)")
        if not any(target.iterdir()):
            target.rmdir()
        elif not force:
            raise DatasetError(
                f"{target} exists but is not the verified dataset ({'; '.join(problems[:3])}); "
                f"see `subjectbench data verify --dataset-dir {target}`, move it away, or pass "
                "--force to set it aside and download afresh"
            )
    staging = target.parent / f".{target.name}.download"
    try:
        with _exclusive(staging):
            dataset, origin, where = _obtain(staging, source, manifest, url, hub_repo,
                                             hub_revision, timeout, retries, retry_wait, log)
            _place(dataset, target, {"source": origin, "from": where, "files": len(manifest)}, log)
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise DatasetError(
            f"cannot write the dataset at {target} ({error}); choose a writable --dataset-dir "
            "with ~200 MB free"
        ) from None
    return DownloadResult(target, origin, len(manifest),
                          f"{target}: downloaded from {where} and verified ({len(manifest)} files)")


def _obtain(staging: Path, source: str, manifest: Mapping[str, str], url: str | None,
            hub_repo: str, hub_revision: str, timeout: float, retries: int, retry_wait: float,
            log) -> tuple[Path, str, str]:
    """The verified dataset in the staging folder, from the hub or else the archive."""
    if source in ("auto", "hub"):
        try:
            dataset = _from_hub(staging, manifest, hub_repo, hub_revision, timeout, log)
            return dataset, "hub", f"{hub_repo}@{hub_revision}"
        except _SourceFailed as error:
            if source == "hub":
                raise DatasetError(
                    f"{error}; retry when online, use --source github, or copy the dataset by "
                    "hand and pass --dataset-dir"
                ) from None
            log(f"{error}; falling back to the GitHub archive")
    archive_url = url or default_archive_url()
    dataset = _from_archive(archive_url, staging, manifest, timeout, retries, retry_wait, log)
    return dataset, "github", archive_url


def _place(dataset: Path, target: Path, provenance: dict, log) -> None:
    """Rename the verified folder into place; an unverified one already there is set aside."""
    provenance["verified_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    (dataset / MARKER).write_text(json.dumps(provenance, indent=1) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        aside = target.with_name(f"{target.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(target, aside)
        log(f"the previous, unverified {target} was kept as {aside}")
    os.rename(dataset, target)  # staging is a sibling of target: same filesystem, atomic
