"""The helpers every package uses: user errors, did-you-mean, atomic writes, file locks, hub
checks, and the CPU budget.

This module is the floor of the import graph: it imports nothing of ours, so every package
(data, methods, metrics, the harness, reports) can use it without importing upward. It lives in
``data/`` because data is the lowest package (reports -> harness -> methods, metrics -> data).
Old names stay importable from their first homes (``benchmark.errors``, ``benchmark.store``,
``benchmark.hub``, ``benchmark.cli.UserError``) as re-exports.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import io
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# ----------------------------------------------------------------------------- errors


class UserError(Exception):
    """An error whose message is the whole story (it names the input and the fix): the CLI prints
    it as one ``error:`` line, without a traceback, and exits 2. Every package's user-facing
    errors derive from it."""


class ConfigError(UserError, ValueError):
    """A config key or value that is not valid."""


class DiskWriteError(UserError, OSError):
    """The disk refused a write (full, read-only, no permission); names the path and the fix."""


class ChecksumError(UserError, ValueError):
    """A downloaded file whose content is not the pinned one; names the file and both hashes."""


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> str:
    """The sha256 of ``path`` if it starts with ``expected`` (a full hash or the prefix a file
    name pins, as torchvision's do); else a ChecksumError. Checked before loading, every time:
    downloaders check only what they download, never a file already in the cache."""
    actual = file_sha256(path)
    if not actual.startswith(expected.lower()):
        raise ChecksumError(
            f"{what}: {path} has sha256 {actual}, expected {expected}{'...' if len(expected) < 64 else ''}; "
            "the file is corrupt or not the pinned one: delete it so that it is downloaded again"
        )
    return actual


def did_you_mean(value: str, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- atomic writes

TMP_PREFIX = ".tmp-"

# Errors of the disk, not of one file's content: retrying other work cannot succeed.
DISK_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES, errno.EPERM) if code
)


def disk_error(error: BaseException, path: Path | str | None = None) -> DiskWriteError | None:
    """The clear error for a full, read-only or forbidden disk; None for any other error."""
    if isinstance(error, DiskWriteError):
        return error
    if not isinstance(error, OSError) or error.errno not in DISK_ERRNOS:
        return None
    where = error.filename or path or "a file"
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        fix = "free space on that disk (or write elsewhere), then rerun the same command: finished work is kept"
    else:
        fix = "make that folder writable (or write elsewhere), then rerun the same command: finished work is kept"
    return DiskWriteError(f"cannot write {where}: {error.strerror or error}; {fix}")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers see the old file or the
    new one, never half of one. A full or read-only disk raises ``DiskWriteError``."""
    temporary = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _fsync_write(temporary, data)
        os.replace(temporary, path)
    except OSError as error:
        fatal = disk_error(error, path)
        if fatal is None:
            raise
        raise fatal from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True, default=str))


def atomic_write_image(path: Path, image, format: str = "PNG", **options: Any) -> None:
    """A PIL image, encoded in memory, then written like every other file."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed) for the block; it dies with
    the process. Non-blocking: raises ``BlockingIOError`` when another process holds it.
    Where fcntl does not exist (Windows) there is no lock; atomic renames keep files whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- CPU budget


def available_cores() -> int:
    """The cores this process may actually use: its CPU affinity (``os.sched_getaffinity``),
    lowered by a cgroup CPU quota when one is set (containers), never below 1. ``os.cpu_count()``
    counts the machine's cores, which a shared or confined process does not have."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def threads_per_process(processes: int = 1) -> int:
    """Threads each of ``processes`` concurrent workers may use so that together they use the
    available cores once: workers x threads <= cores (never nested pools of full size)."""
    return max(1, available_cores() // max(1, processes))


# ----------------------------------------------------------------------------- hub checks

HUB_PROBE_TIMEOUT_S = 3.0  # an unreachable hub otherwise hangs ~47 s per load


def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> tuple[str, int]:
    parsed = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """False at once under HF_HUB_OFFLINE; else a TCP connect to the endpoint, bounded by ``timeout``."""
    if hub_offline_requested():
        return False
    host, port = hub_endpoint()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
