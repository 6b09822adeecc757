"""The run directory: content-keyed, atomic, resumable storage of states, images, scores, failures.

Layout under RUN_DIR (DESIGN.md "Run unit and store"):
  config.yaml, configs/<time>-<hash>.yaml   resolved config of the latest / every invocation
  plan.parquet, subjects.json               the latest invocation's units and subjects
  states/<label>/<subject>/<prepare-key>/   trained state (safetensors + JSON), DONE last
  images/<label>/<subject>/<key>.png        generated image
  images/<label>/<subject>/<key>.json       its manifest row; written last, so it marks done
  scores/<metric>/<fingerprint>/part-*.parquet  + fingerprint.json
  failures/<key>.json                        a failed unit with its traceback
  resume/<name>/points/, work/<subject>/      an unfinished training's resume points and working
                                             folders (training.resume_every), gone once published
  run.log                                    the log of every invocation
  invocations.jsonl                          one line per invocation: wall seconds per stage, executor,
                                             GPUs and workers per GPU (the report's run time, GPU-hours)
  invocations.live/<host>-<pid>.json          a running invocation's heartbeat; one left by a killed
                                             process becomes its line (``stopped_in``: "STAGE (killed)")
Every file is written to a temporary name in the same folder and renamed into place, so a
process killed at any moment leaves either the old state or the new one, never half a file.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import yaml

# The one atomic writer and file lock live in data.common (every package writes through them);
# they are re-exported here, where the harness and older code import them from.
from data.common import (  # noqa: F401 - re-exports
    DISK_ERRNOS,
    TMP_PREFIX,
    DiskWriteError,
    UserError,
    _fsync_write,
    atomic_write_bytes,
    atomic_write_image,
    atomic_write_json,
    atomic_write_text,
    disk_error,
    file_lock,
)

DONE = "DONE"
LIVE_EVERY_S = 30.0  # seconds between a running invocation's heartbeats (invocations.live/)
LIVE_STALE_S = 300.0  # a heartbeat older than this is a dead process's, on whatever host it ran


class StoreError(UserError, RuntimeError):
    """A run directory that cannot be used, naming the path and the fix."""


StoreWriteError = DiskWriteError  # the disk refused a write: the run stops, no unit is blamed


def _files_in(folder: Path) -> set[str]:
    """Names of the regular files in ``folder`` (none if it is missing or unreadable)."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except OSError:
        return set()


def _safe(name: str) -> str:
    """A path component for labels/subject ids (no separators, no dot-files)."""
    cleaned = re.sub(r"[^A-Za-z0-9._=+,\-\[\]]", "_", name).lstrip(".")
    return cleaned or "_"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LiveInvocation:
    """A running invocation's heartbeat file (``Store.live_invocation``)."""

    def __init__(self, path: Path, record: dict, clock, every: float) -> None:
        self.path, self.record, self.clock, self.every = path, record, clock, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="invocation-heartbeat", daemon=True)

    def write(self) -> None:
        try:
            self.path.parent.mkdir(exist_ok=True)
            atomic_write_json(self.path, {**self.record, **self.clock(), "host": _safe(socket.gethostname()),
                                          "pid": os.getpid(), "heartbeat": time.time()})
        except OSError:
            pass  # a full disk: the heartbeat is lost, the run's own writes say so

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self.write()

    def __enter__(self) -> LiveInvocation:
        self.write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:
            pass  # not empty: another host's invocation of a sharded run


class Store:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------------ layout
    def state_dir(self, label: str, subject_id: str, key: str) -> Path:
        return self.root / "states" / _safe(label) / _safe(subject_id) / key

    def image_path(self, label: str, subject_id: str, key: str) -> Path:
        return self.root / "images" / _safe(label) / _safe(subject_id) / f"{key}.png"

    def record_path(self, label: str, subject_id: str, key: str) -> Path:
        return self.image_path(label, subject_id, key).with_suffix(".json")

    def failure_path(self, key: str) -> Path:
        return self.root / "failures" / f"{key}.json"

    def scores_dir(self, metric: str, fingerprint_hash: str) -> Path:
        return self.root / "scores" / _safe(metric) / fingerprint_hash

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    # ------------------------------------------------------------------ lifecycle
    def ensure(self) -> None:
        """Create the run directory and check it can be written, before any work starts."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(
                f"{self.root} is a file, not a run directory; give --out a folder (a new one, or an earlier run's)"
            )
        probe = self.root / f"{TMP_PREFIX}write-probe.{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _fsync_write(probe, b"")
            probe.unlink()
        except OSError as error:
            raise StoreError(
                f"cannot write to run directory {self.root} ({error.strerror or error}); "
                "choose a writable --out, or free space / fix permissions there"
            ) from None

    def clean_temporaries(self) -> int:
        """Remove what killed processes left half-written (temp files and temp state folders)."""
        removed = 0
        for sub in ("states", "images", "scores", "failures", "resume", "invocations.live", "."):
            base = self.root / sub
            if not base.exists():
                continue
            pattern = f"{TMP_PREFIX}*" if sub == "." else f"**/{TMP_PREFIX}*"
            for path in list(base.glob(pattern)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ------------------------------------------------------------------ config and plan
    @property
    def invocations_path(self) -> Path:
        return self.root / "invocations.jsonl"

    def record_invocation(self, record: dict) -> None:
        """Add one invocation's record (``benchmark.driver``: wall seconds per stage, executor,
        device, GPUs, workers per GPU) to ``invocations.jsonl``, rewritten atomically."""
        with file_lock(self.root / ".invocations.lock"):
            self._append_invocations([record])

    def _append_invocations(self, records: list[dict]) -> None:
        """``records`` as lines at the end of ``invocations.jsonl``, rewritten atomically (the
        caller holds ``.invocations.lock``)."""
        path = self.invocations_path
        earlier = path.read_text(encoding="utf-8") if path.is_file() else ""
        atomic_write_text(path, earlier + "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))

    @property
    def live_path(self) -> Path:
        return self.root / "invocations.live"

    def live_invocation(self, record: dict, clock, every: float = LIVE_EVERY_S) -> LiveInvocation:
        """The running invocation's heartbeat (a context manager): ``record`` plus ``clock()``'s
        seconds, stage seconds and current stage, rewritten every ``every`` seconds until the
        invocation records its line. A process killed outright (SIGKILL, the OOM killer, a lost
        machine) leaves it behind; ``invocations()`` and the next run count it."""
        return LiveInvocation(self.live_path / f"{_safe(socket.gethostname())}-{os.getpid()}.json", record, clock, every)

    def killed_invocations(self, holding_run_lock: bool = False) -> list[tuple[Path, dict]]:
        """Heartbeats left by processes that died without recording their line, as lines: their
        last heartbeat's seconds (the process ran up to ``LIVE_EVERY_S`` longer), ``stopped_in``
        "STAGE (killed)". Dead: on this host its process is gone (every one of this host's, for
        the holder of the run's lock: no other run of this folder can be running); anywhere, its
        heartbeat is older than ``LIVE_STALE_S``."""
        if not self.live_path.is_dir():
            return []
        here, now, found = _safe(socket.gethostname()), time.time(), []
        for path in sorted(self.live_path.glob("*.json")):
            try:
                beat = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue  # being replaced this instant, or unreadable: not evidence of a death
            host, pid = beat.pop("host", None), beat.pop("pid", None)
            last = beat.pop("heartbeat", now)
            dead = now - last > LIVE_STALE_S or (
                host == here and (holding_run_lock or not isinstance(pid, int) or not _pid_alive(pid)))
            if dead:
                beat["last_heartbeat"] = datetime.datetime.fromtimestamp(last, datetime.UTC).isoformat(timespec="seconds")
                beat["stopped_in"] = f"{beat.get('stopped_in') or 'plan'} (killed)"
                beat["killed"] = True
                found.append((path, beat))
        return found

    def settle_killed_invocations(self) -> int:
        """Move killed invocations' heartbeats into ``invocations.jsonl`` (the driver, at start,
        holding the run's lock)."""
        with file_lock(self.root / ".invocations.lock"):
            killed = self.killed_invocations(holding_run_lock=True)
            if killed:
                self._append_invocations([record for _, record in killed])
                for live, _ in killed:
                    live.unlink(missing_ok=True)
            if self.live_path.is_dir():
                try:
                    self.live_path.rmdir()
                except OSError:
                    pass  # another host's invocation is still running
        return len(killed)

    def invocations(self) -> list[dict]:
        """Every invocation's record, oldest first (none for a run made before they were kept),
        with those of killed invocations not yet moved into ``invocations.jsonl``."""
        records = self._recorded_invocations()
        killed = [r for _, r in self.killed_invocations()]
        if killed:
            records = sorted([*records, *killed], key=lambda r: str(r.get("started") or ""))
        return records

    def _recorded_invocations(self) -> list[dict]:
        path = self.invocations_path
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise StoreError(f"{path} line {number} is not JSON ({error}); delete that line (it only "
                                 "feeds the report's run time) and rerun") from None
        return records

    def save_config(self, resolved: dict) -> None:
        from benchmark.hashing import stable_hash

        text = yaml.safe_dump(resolved, sort_keys=False)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        atomic_write_text(self.root / "configs" / f"{stamp}-{stable_hash(resolved, 8)}.yaml", text)
        atomic_write_text(self.root / "config.yaml", text)

    def config_history(self) -> list[Path]:
        """The saved config of each distinct config this directory has run with, oldest first."""
        distinct: dict[str, Path] = {}
        for path in sorted((self.root / "configs").glob("*.yaml")):
            distinct.setdefault(path.stem.rsplit("-", 1)[-1], path)
        return list(distinct.values())

    def load_config_dict(self) -> dict:
        path = self.root / "config.yaml"
        if not path.is_file():
            raise StoreError(
                f"{self.root} is not a run directory (no config.yaml); create one with "
                f"`subjectbench run [SUITE] --out {self.root}`"
            )
        return yaml.safe_load(path.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ states
    def state_done(self, label: str, subject_id: str, key: str) -> bool:
        return (self.state_dir(label, subject_id, key) / DONE).is_file()

    def new_state_workdir(self, label: str, subject_id: str, key: str) -> Path:
        final = self.state_dir(label, subject_id, key)
        work = final.with_name(f"{TMP_PREFIX}{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        work.mkdir(parents=True)
        return work

    def publish_state(self, workdir: Path, label: str, subject_id: str, key: str, info: dict) -> Path:
        """Mark ``workdir`` complete (DONE) and move it into place atomically."""
        for path in workdir.rglob("*"):
            if path.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"):
                raise StoreError(
                    f"state file {path.name} is not safetensors/JSON; methods must save with "
                    "safetensors (no pickle is ever written or loaded)"
                )
        atomic_write_json(workdir / DONE, info)
        final = self.state_dir(label, subject_id, key)
        if final.exists():  # --force, or a stale folder without DONE
            trash = final.with_name(f"{TMP_PREFIX}old-{key}.{uuid.uuid4().hex[:8]}")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)  # a resume space's workdir lives elsewhere
        os.replace(workdir, final)
        return final

    # ------------------------------------------------------------------ resume points
    def resume_space(self, name: str, keys: list[str], fresh: bool = False) -> Path:
        """The folder a resumable training (one subject's, or a pass's) works in: its resume points
        (``points/``, ``methods.training.resume_points``) and its states' working folders
        (``resume_workdir``), kept across runs until the states are published. Without a saved
        point it is emptied first: checkpoint files of a training killed before its first point
        must not reach a state; ``fresh`` (``--force``) empties it always. ``keys``: the prepare
        keys it trains (``discard_resume``)."""
        space = self.root / "resume" / _safe(name)
        if fresh or not any((space / "points").glob("loop-*.json")):
            shutil.rmtree(space, ignore_errors=True)
        space.mkdir(parents=True, exist_ok=True)
        atomic_write_json(space / "keys.json", sorted(keys))
        return space

    @staticmethod
    def resume_workdir(space: Path, subject_id: str, key: str) -> Path:
        """One training's working folder in ``space``: named by subject and prepare key, since a
        pass may train two single-image views of one subject (same id, different keys)."""
        work = space / "work" / f"{_safe(subject_id)}-{key}"
        work.mkdir(parents=True, exist_ok=True)
        return work

    def discard_resume(self, keys: Iterable[str]) -> None:
        """Remove every resume space that trains any of ``keys`` (their states are published:
        an older pass or a lone training of the same subject is of no further use)."""
        base = self.root / "resume"
        if not base.is_dir():
            return
        keys = set(keys)
        for space in list(base.iterdir()):
            try:
                listed = set(json.loads((space / "keys.json").read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
            if listed & keys:
                shutil.rmtree(space, ignore_errors=True)

    def state_info(self, label: str, subject_id: str, key: str) -> dict | None:
        path = self.state_dir(label, subject_id, key) / DONE
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ images
    def image_done(self, label: str, subject_id: str, key: str) -> bool:
        return self.record_path(label, subject_id, key).is_file() and self.image_path(label, subject_id, key).is_file()

    def done_mask(self, frame) -> list[bool]:
        """Per row of a plan frame (label, subject, key columns): is its image finished (its PNG
        and its record both there, as ``image_done``)? One listing per image folder instead of two
        stats per image (3000 images: 0.14 -> 0.018 s on a 2-core CPU, warm page cache)."""
        listed: dict[tuple[str, str], set[str]] = {}
        done = []
        for label, subject, key in zip(frame["label"], frame["subject"], frame["key"]):
            names = listed.get((label, subject))
            if names is None:
                names = listed[(label, subject)] = _files_in(self.image_path(label, subject, key).parent)
            done.append(f"{key}.png" in names and f"{key}.json" in names)
        return done

    def write_image(self, label: str, subject_id: str, key: str, image, record: dict) -> None:
        """PNG first, then its record: the record's presence means the image is complete."""
        atomic_write_image(self.image_path(label, subject_id, key), image)
        atomic_write_json(self.record_path(label, subject_id, key), record)
        self.clear_failure(key)

    def images_written_since(self, epoch: float) -> int:
        """Images whose record was written at or after ``epoch`` (seconds): what an invocation that
        stopped before its executor reported made (a ``--force`` rerun overwrites, so no count of
        files before and after would do)."""
        base = self.root / "images"
        count = 0
        for path in base.glob("*/*/*.json") if base.exists() else ():
            try:
                count += not path.name.startswith(TMP_PREFIX) and path.stat().st_mtime >= epoch
            except OSError:
                continue
        return count

    def iter_records(self) -> Iterable[dict]:
        base = self.root / "images"
        if not base.exists():
            return
        for path in sorted(base.glob("*/*/*.json")):
            if path.name.startswith(TMP_PREFIX):
                continue
            yield json.loads(path.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ failures
    def record_failure(self, key: str, info: dict) -> None:
        atomic_write_json(self.failure_path(key), info)

    def clear_failure(self, key: str) -> None:
        self.failure_path(key).unlink(missing_ok=True)

    def failure(self, key: str) -> dict | None:
        path = self.failure_path(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def failures(self) -> dict[str, dict]:
        base = self.root / "failures"
        if not base.exists():
            return {}
        return {
            p.stem: json.loads(p.read_text())
            for p in sorted(base.glob("*.json"))
            if not p.name.startswith(TMP_PREFIX)
        }
