"""Result bundles: a run's results without its images, self-describing and content-hashed.

``subjectbench export RUN_DIR --out BUNDLE`` writes (``export_bundle``):
  README.md          dataset card (YAML front matter, huggingface_hub.DatasetCard) whose ``configs``
                     make ``datasets.load_dataset("BUNDLE")`` load results.parquet (and images.parquet
                     as the "images" config); ``load_dataset("parquet", data_files="BUNDLE/results.parquet")``
                     works too. Push it with ``huggingface_hub.upload_folder(..., repo_type="dataset")``.
  results.parquet    the long results (reports.long): one row per (image, metric)
  images.parquet     the per-image manifest: keys, seeds, prompts, backbone, device, dtype, git,
                     package versions, method fingerprint, seconds, memory, the PNG's sha256
  plan.parquet       every planned image unit (coverage and cost read it)
  states.parquet     one row per prepared state: seconds, peak memory, device, state bytes
  config.yaml        the resolved config of the run
  subjects.json      subject ids, classes, kinds and image checksums
  fingerprints.json  metric fingerprints (weights, weights sha256, preprocessing, convention) and
                     the method fingerprints behind the images
  protocol.json      the protocol and metric signatures that decide comparability (reports.comparability)
  cost.csv           the cost table (reports.tables.cost_table)
  invocations.json   each `subjectbench run` of it: wall seconds per stage, executor, GPUs, workers per
                     GPU (the report's run time and GPU-hours; absent from bundles made before)
  failures.json      recorded failures (unit key -> error), tracebacks left out
  thumbnails/        with --thumbnails: <key>.jpg, at most 128 px
  bundle.json        last: sha256 of every other file and one content hash over them

``read_bundle`` verifies every file against bundle.json before reading anything and refuses a
bundle with a changed, missing or extra file, naming it. ``read_source`` reads a bundle or a run
directory into the same ``RunData`` that every report is built from, so a bundle can stand
wherever a run directory can (leaderboard sites, the baseline of ``compare``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import yaml

from benchmark import __version__
from benchmark.results import load_records
from benchmark.store import (
    TMP_PREFIX,
    Store,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from reports.comparability import metric_signature, protocol_signature, signature_key
from reports.rundata import ReportError, RunData, read_run
from reports.tables import cost_table

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "subjectbench-bundle"
BUNDLE_VERSION = 1
THUMBNAIL_PX = 128
# Manifest fields of each image record carried into images.parquet beside the long columns.
RECORD_EXTRAS = {"packages_json": "packages", "fingerprint_json": "method_fingerprint_json", "time": "time"}


class BundleError(ReportError):
    """A bundle that cannot be read or trusted; the message names the file and the fix."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(files: dict[str, str]) -> str:
    """One sha256 over the per-file digests, in the ``sha256sum`` line format, sorted by path."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _bundle_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and p.name != BUNDLE_FILE and not p.name.startswith(TMP_PREFIX)
    )


def _hosting_file(name: str) -> bool:
    """Files a hub repository or its download adds around a pushed bundle (not part of the results)."""
    return name == ".gitattributes" or name.startswith(".cache/")


HUB_PREFIX = "hf://datasets/"


def resolve_source(given: str | Path) -> tuple[Path, str | None]:
    """A local path, or ``hf://datasets/OWNER/NAME[@REVISION]`` downloaded with huggingface_hub;
    returns (folder, its hub web address or None)."""
    text = str(given)
    if not text.startswith(HUB_PREFIX):
        return Path(given).expanduser().resolve(), None
    from huggingface_hub import snapshot_download

    repo, _, revision = text[len(HUB_PREFIX):].partition("@")
    try:
        folder = snapshot_download(repo_id=repo, repo_type="dataset", revision=revision or None)
    except Exception as error:  # noqa: BLE001 - hub errors are many; the message carries the cause
        raise BundleError(f"{text}: cannot download the bundle ({type(error).__name__}: {str(error).splitlines()[0]}); "
                          "check the repository id, the network and HF_HUB_OFFLINE") from None
    return Path(folder), f"https://huggingface.co/datasets/{repo}"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _image_manifest(run: RunData) -> pd.DataFrame:
    images = run.images.copy()
    records = load_records(run.store)
    if not records.empty:
        wanted = [c for c in RECORD_EXTRAS if c in records.columns]
        extra = records[["key", *wanted]].drop_duplicates("key").rename(columns=RECORD_EXTRAS)
        images = images.merge(extra, on="key", how="left")
    images["image_sha256"] = [
        _sha256_file(run.root / path) if (run.root / path).is_file() else None for path in images["image"]
    ]
    return images


def _write_thumbnails(run: RunData, images: pd.DataFrame, out: Path) -> list[str | None]:
    from PIL import Image

    names = []
    for key, path in zip(images["key"], images["image"]):
        source = run.root / path
        if not source.is_file():
            names.append(None)
            continue
        with Image.open(source) as image:
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            thumbnail.save(buffer, format="JPEG", quality=85)
        name = f"thumbnails/{key}.jpg"
        atomic_write_bytes(out / name, buffer.getvalue())
        names.append(name)
    return names


def _card(run: RunData, name: str, signature: dict, thumbnails: bool) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    smoke = run.smoke_reasons()
    data = DatasetCardData(
        pretty_name=f"subjectbench results: {name}",
        tags=["subjectbench", "subject-driven-generation", "benchmark-results"],
        configs=[
            {"config_name": "results", "data_files": [{"split": "train", "path": "results.parquet"}], "default": True},
            {"config_name": "images", "data_files": [{"split": "train", "path": "images.parquet"}]},
        ],
    )
    methods = ", ".join(dict.fromkeys(run.images["cell_id"])) if not run.images.empty else "none"
    metrics = ", ".join(f"{m} ({(info.get('fingerprint') or {}).get('weights', '?')} weights, fingerprint {info.get('hash')})"
                        for m, info in run.fingerprints.items()) or "none"
    warning = ("\n**Smoke numbers, not measurements:** " + "; ".join(smoke) + ".\n") if smoke else ""
    body = f"""
# subjectbench results: {name}

Exported by subjectbench {__version__} from run `{run.config.get('name', name)}`
({run.config.get('description', '')}). No images are included{' (thumbnails only)' if thumbnails else ''}.
{warning}
- method entries: {methods}
- metrics: {metrics}
- backbone: {run.config.get('backbone')}; resolution {signature['protocol'].get('resolution')};
  sampler {json.dumps(signature['protocol'].get('sampler'))}
- {len(run.images)} finished images of {len(run.plan)} planned; {len(run.long)} (image, metric) values
- comparability key: `{signature['key']}` (protocol + metric fingerprints; see protocol.json)

## Load

```python
import datasets
results = datasets.load_dataset("parquet", data_files="BUNDLE/results.parquet", split="train")
# or, through this card's configs: datasets.load_dataset("BUNDLE", "results", split="train")
```

`subjectbench leaderboard BUNDLE ... --out SITE` ranks it with other bundles and runs;
`subjectbench compare BUNDLE RUN_DIR` uses it as a regression baseline. `bundle.json` holds the
sha256 of every file and one content hash over them; a bundle whose files changed is refused.

## Files

results.parquet (one row per image × metric), images.parquet (per-image manifest), plan.parquet,
states.parquet, config.yaml, subjects.json, fingerprints.json, protocol.json, cost.csv,
invocations.json, failures.json{', thumbnails/' if thumbnails else ''}.
"""
    return str(DatasetCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def export_bundle(run_dir: str | Path, out: str | Path, thumbnails: bool = False) -> tuple[Path, str]:
    """Export ``run_dir`` as a bundle in ``out`` (must not exist or be empty); returns (path, content hash)."""
    run = read_run(run_dir)
    out = Path(out).expanduser().resolve()
    if out == run.root or run.root in out.parents:
        raise BundleError(f"--out {out} is inside the run directory {run.root}; choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"--out {out} already exists and is not empty; remove it or choose another folder")
    if run.images.empty:
        raise BundleError(f"{run.root} has no finished images to export; run `subjectbench run ... --out {run.root}` first")
    # Named after the run, not the bundle folder: one run exported twice has one content hash.
    name = run.root.name
    staging = out.with_name(f"{TMP_PREFIX}{out.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        images = _image_manifest(run)
        if thumbnails:
            images["thumbnail"] = _write_thumbnails(run, images, staging)
        signature = {"protocol": protocol_signature(run), "metrics": metric_signature(run)}
        signature["key"] = signature_key(signature["protocol"], signature["metrics"])
        atomic_write_bytes(staging / "results.parquet", _parquet_bytes(run.long))
        atomic_write_bytes(staging / "images.parquet", _parquet_bytes(images))
        atomic_write_bytes(staging / "plan.parquet", _parquet_bytes(run.plan))
        atomic_write_bytes(staging / "states.parquet", _parquet_bytes(run.states))
        atomic_write_text(staging / "config.yaml", yaml.safe_dump(run.config, sort_keys=False))
        atomic_write_json(staging / "subjects.json", run.subjects)
        methods = {cell: sorted(set(frame["method_fingerprint_json"].dropna())) for cell, frame in images.groupby("cell_id")} \
            if "method_fingerprint_json" in images else {}
        atomic_write_json(staging / "fingerprints.json", {"metrics": run.fingerprints,
                                                          "methods": {c: [json.loads(f) for f in v] for c, v in methods.items()}})
        atomic_write_json(staging / "protocol.json", signature)
        atomic_write_text(staging / "cost.csv", cost_table(run).to_csv(index=False))
        atomic_write_json(staging / "invocations.json", run.invocations)
        atomic_write_json(staging / "failures.json", {k: {f: v for f, v in info.items() if f != "traceback"}
                                                      for k, info in run.failures.items()})
        atomic_write_text(staging / "README.md", _card(run, name, signature, thumbnails))
        files = {relative: _sha256_file(staging / relative) for relative in _bundle_files(staging)}
        digest = content_hash(files)
        atomic_write_json(staging / BUNDLE_FILE, {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "subjectbench": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source_run": str(run.root),
            "run_name": run.config.get("name"), "files": files, "content_hash": digest,
        })
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, digest


def verify_bundle(path: str | Path) -> dict:
    """bundle.json of ``path`` after checking every file against it; raises BundleError naming the first bad file."""
    root = Path(path).expanduser().resolve()
    manifest_path = root / BUNDLE_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a result bundle (no {BUNDLE_FILE}); make one with `subjectbench export RUN_DIR --out {root}`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{manifest_path} is not a valid bundle manifest; re-export the bundle") from None
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{manifest_path}: format {manifest.get('format')} v{manifest.get('format_version')} is not "
                          f"{BUNDLE_FORMAT} v{BUNDLE_VERSION}; re-export it with this subjectbench")
    if content_hash(files) != manifest.get("content_hash"):
        raise BundleError(f"{manifest_path}: the file digests do not add up to its content_hash; the manifest was edited, re-export the bundle")
    present = set(_bundle_files(root))
    for name in sorted(files):
        if name not in present:
            raise BundleError(f"bundle {root}: {name} is missing; the bundle is incomplete, re-export or re-download it")
        if _sha256_file(root / name) != files[name]:
            raise BundleError(f"bundle {root}: {name} was modified since export (sha256 differs); "
                              "re-export the bundle from its run directory, or restore the original file")
    extra = sorted(name for name in present - set(files) if not _hosting_file(name))
    if extra:
        raise BundleError(f"bundle {root}: {extra[0]} is not part of the exported bundle; remove it or re-export the bundle")
    return manifest


def read_bundle(path: str | Path) -> RunData:
    """A verified bundle as the RunData every report reads (images are absent: ``image_sha256`` stands for them)."""
    root = Path(path).expanduser().resolve()
    verify_bundle(root)
    return RunData(
        store=Store(root),
        config=yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8")) or {},
        plan=pd.read_parquet(root / "plan.parquet"),
        images=pd.read_parquet(root / "images.parquet"),
        long=pd.read_parquet(root / "results.parquet"),
        subjects=json.loads((root / "subjects.json").read_text(encoding="utf-8")),
        fingerprints=json.loads((root / "fingerprints.json").read_text(encoding="utf-8"))["metrics"],
        failures=json.loads((root / "failures.json").read_text(encoding="utf-8")),
        states=pd.read_parquet(root / "states.parquet"),
        invocations=(json.loads((root / "invocations.json").read_text(encoding="utf-8"))
                     if (root / "invocations.json").is_file() else []),
    )


def read_source(path: str | Path) -> RunData:
    """A bundle (it has bundle.json) or a run directory, read for reporting."""
    return read_bundle(path) if is_bundle(path) else read_run(path)


def image_digests(run: RunData) -> dict[str, str | None]:
    """image path (relative to the run) -> sha256 of its PNG: recorded in a bundle, read from disk in a run."""
    if run.images.empty:
        return {}
    if "image_sha256" in run.images:
        return dict(zip(run.images["image"], run.images["image_sha256"]))
    return {path: (_sha256_file(run.root / path) if (run.root / path).is_file() else None) for path in run.images["image"]}
