"""Subject masks: one binary mask per dataset image, made once and cached with its provenance.

Two producers:
- ``sam``: Segment Anything through transformers (``SamModel`` / ``SamProcessor``, default
  ``facebook/sam-vit-base``) prompted with one box. DreamBooth photos are subject-centred, so the
  box is the bounding box of the GrabCut mask below (grown by 5% of the image side), or a
  centred box (10% margin) when GrabCut finds nothing; of SAM's three candidate masks the one
  with the highest predicted IoU is kept.
- ``grabcut``: OpenCV GrabCut seeded with a centred box (10% margin), on a copy downscaled to
  at most 256 px (GrabCut costs ~2 s per image at 512 px, ~0.3 s at 256), then upsampled back.
  Needs no weights, so it is the offline fallback; it is cruder than SAM and the quality check
  below says where it failed.

Masks are computed on the image as every loader sees it (EXIF orientation applied) and stored
as 8-bit PNG (0/255) with a JSON sidecar (producer, params, version, source image sha256). They
go next to the dataset (``<dataset>/masks/<producer>/<subject>/<image>.png``) when that folder
is writable, else under the cache (``<cache>/masks/<dataset name>-<path hash>/...``). A mask is
reused only when its sidecar matches the producer, params, version and the source image's sha.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.common import atomic_write_image, atomic_write_json, atomic_write_text, available_cores
from data.images import open_image
from data.subjects import (
    DATASET_SOURCES,
    DatasetError,
    Subject,
    cache_root,
    file_sha256,
    load_subjects,
)

MASKS_VERSION = 1
SEGMENTERS = ("grabcut", "sam")
DEFAULT_SAM_MODEL = "facebook/sam-vit-base"
GRABCUT_PARAMS = {"max_side": 256, "box_margin": 0.1, "retry_box_margin": 0.02, "iterations": 5,
                  "min_component_fraction": 0.01, "rng_seed": 0}
SAM_BOX_GROW = 0.05
EMPTY_FRACTION = 0.005  # below: flagged "empty"
FULL_FRACTION = 0.98  # above: flagged "full"


class MaskError(DatasetError):
    """A mask that cannot be made or used, naming the file or producer and the fix."""


# ----------------------------------------------------------------------------- producers


def center_box(width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the centred box leaving ``margin`` of each side outside."""
    return (round(width * margin), round(height * margin),
            round(width * (1 - margin)), round(height * (1 - margin)))


def _remove_small_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_fraction * mask.size
    return keep[labels]


def grabcut_mask(image: Image.Image, params: dict | None = None) -> np.ndarray:
    """Boolean H×W subject mask of an RGB image by GrabCut from a centred box."""
    import cv2

    params = {**GRABCUT_PARAMS, **(params or {})}
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    scale = min(1.0, params["max_side"] / max(height, width))
    small = rgb if scale == 1.0 else cv2.resize(
        rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
    )
    bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
    small_height, small_width = small.shape[:2]
    foreground = np.zeros((small_height, small_width), dtype=bool)
    # A subject GrabCut loses inside the default box is retried once with a larger box.
    for margin in (params["box_margin"], params["retry_box_margin"]):
        x0, y0, x1, y1 = center_box(small_width, small_height, margin)
        if x1 - x0 < 2 or y1 - y0 < 2:
            break
        labels = np.zeros((small_height, small_width), dtype=np.uint8)
        background_model, foreground_model = np.zeros((1, 65)), np.zeros((1, 65))
        cv2.setRNGSeed(int(params["rng_seed"]))
        cv2.grabCut(bgr, labels, (x0, y0, x1 - x0, y1 - y0), background_model, foreground_model,
                    int(params["iterations"]), cv2.GC_INIT_WITH_RECT)
        foreground = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        foreground = _remove_small_components(foreground, params["min_component_fraction"])
        if foreground.mean() >= 2 * EMPTY_FRACTION:
            break
    if scale == 1.0:
        return foreground
    upsampled = cv2.resize(foreground.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return upsampled >= 0.5


def mask_box(mask: np.ndarray, grow: float = SAM_BOX_GROW) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) bounding the mask, grown by ``grow`` of the image side; None if empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    height, width = mask.shape
    pad_x, pad_y = round(grow * width), round(grow * height)
    return (max(0, int(xs.min()) - pad_x), max(0, int(ys.min()) - pad_y),
            min(width, int(xs.max()) + 1 + pad_x), min(height, int(ys.max()) + 1 + pad_y))


class SamSegmenter:
    """SAM (transformers) prompted with one box per image; loaded once, fails fast offline."""

    def __init__(self, model_id: str = DEFAULT_SAM_MODEL, device: str = "cpu") -> None:
        source = check_sam_available(model_id)
        import torch
        from transformers import SamModel, SamProcessor

        try:
            self.model = SamModel.from_pretrained(source).to(device).eval()
            self.processor = SamProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise MaskError(f"SAM: could not load {source!r}: {error}") from None
        self.model_id, self.device, self.torch = model_id, device, torch

    def __call__(self, image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
        inputs = self.processor(images=image, input_boxes=[[list(map(float, box))]], return_tensors="pt")
        with self.torch.inference_mode():
            outputs = self.model(
                pixel_values=inputs["pixel_values"].to(self.device),
                input_boxes=inputs["input_boxes"].to(self.device),
                multimask_output=True,
            )
        masks = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]
        best = int(outputs.iou_scores[0, 0].float().argmax())
        return masks[0, best].numpy().astype(bool)


def check_sam_available(model_id: str) -> str:
    """Where SAM will load from (a folder or a hub id), or a MaskError at once when it cannot.

    Runs before transformers is imported, so that an offline machine fails in about a second.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        return str(local)
    from huggingface_hub import try_to_load_from_cache

    from data.common import hub_reachable

    if not isinstance(try_to_load_from_cache(model_id, "config.json"), str) and not hub_reachable():
        raise MaskError(
            f"SAM weights {model_id!r} are not in the local Hugging Face cache and the hub is "
            "unreachable (or HF_HUB_OFFLINE=1). Use `--segmenter grabcut` (offline, no weights), "
            "enable the network, or pass --sam-model /path/to/a/downloaded/sam folder"
        )
    return model_id


def sam_mask(segmenter: SamSegmenter, image: Image.Image) -> np.ndarray:
    box = mask_box(grabcut_mask(image)) or center_box(image.width, image.height, GRABCUT_PARAMS["box_margin"])
    return segmenter(image, box)


# ----------------------------------------------------------------------------- quality


def mask_quality(mask: np.ndarray) -> tuple[float, list[str]]:
    """Foreground fraction and the flags of a suspicious mask: empty, full, touches all borders."""
    fraction = float(mask.mean()) if mask.size else 0.0
    flags = []
    if fraction < EMPTY_FRACTION:
        flags.append("empty")
    if fraction > FULL_FRACTION:
        flags.append("full")
    if mask.size and all(edge.any() for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1])):
        flags.append("touches all borders")
    return fraction, flags


# ----------------------------------------------------------------------------- storage


def folder_writable(folder: Path) -> bool:
    """Writable, and meant to be: root passes ``os.access`` on a read-only (r-x) shared copy."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(folder, os.W_OK)


def masks_root(dataset_dir: Path, source: str = "dreambooth") -> Path:
    """Where masks of the dataset at ``dataset_dir`` live: beside it if writable, else the cache."""
    dataset_dir = Path(dataset_dir).resolve()
    if source != "mini" and folder_writable(dataset_dir):
        return dataset_dir / "masks"
    tag = hashlib.sha256(str(dataset_dir).encode()).hexdigest()[:8]
    return cache_root() / "masks" / f"{dataset_dir.name}-{tag}"


def producer_name(segmenter: str, sam_model: str = DEFAULT_SAM_MODEL) -> str:
    return "grabcut" if segmenter == "grabcut" else f"sam-{Path(sam_model).name}"


def producer_params(segmenter: str, sam_model: str = DEFAULT_SAM_MODEL) -> dict:
    if segmenter == "grabcut":
        return dict(GRABCUT_PARAMS)
    return {"model": sam_model, "box": "grabcut bbox grown 5% (centred box if empty)",
            "multimask": "highest predicted IoU", "grabcut": dict(GRABCUT_PARAMS)}


def mask_path(root: Path, producer: str, subject_id: str, image: Path) -> Path:
    return root / producer / subject_id / f"{image.stem}.png"


def load_mask(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: no such mask; run `subjectbench data masks` for its dataset")
    return np.asarray(Image.open(path).convert("L")) >= 128




def _sidecar_matches(sidecar: Path, producer: str, params: dict, source_sha: str) -> bool:
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return (record.get("producer"), record.get("params"), record.get("version"), record.get("source_sha256")) == (
        producer, params, MASKS_VERSION, source_sha)


@dataclass
class MaskRecord:
    subject: str
    image: str
    path: str
    foreground_fraction: float
    flags: list[str]
    reused: bool
    seconds: float


def _make_one(job: dict) -> MaskRecord:
    """Make (or reuse) the mask of one image; runs in a worker process for GrabCut."""
    started = time.perf_counter()
    image_path, out = Path(job["image"]), Path(job["out"])
    sidecar = out.with_suffix(".json")
    source_sha = file_sha256(image_path)
    if not job["force"] and out.is_file() and _sidecar_matches(sidecar, job["producer"], job["params"], source_sha):
        fraction, flags = mask_quality(load_mask(out))
        return MaskRecord(job["subject"], image_path.name, str(out), fraction, flags, True, 0.0)
    image = open_image(image_path)
    mask = sam_mask(job["segmenter"], image) if job.get("segmenter") is not None else grabcut_mask(image, job["params"])
    if mask.shape != (image.height, image.width):
        raise MaskError(f"{image_path}: mask size {mask.shape[::-1]} differs from the image {image.size}")
    fraction, flags = mask_quality(mask)
    atomic_write_image(out, Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
    record = {"producer": job["producer"], "params": job["params"], "version": MASKS_VERSION,
              "source_image": image_path.name, "source_sha256": source_sha,
              "size": [image.width, image.height], "foreground_fraction": round(fraction, 6), "flags": flags}
    atomic_write_json(sidecar, record)
    return MaskRecord(job["subject"], image_path.name, str(out), fraction, flags, False,
                      time.perf_counter() - started)


def make_masks(
    subjects: Sequence[Subject],
    root: Path,
    segmenter: str = "grabcut",
    *,
    force: bool = False,
    workers: int = 1,
    sam_model: str = DEFAULT_SAM_MODEL,
    device: str = "cpu",
) -> list[MaskRecord]:
    """Masks for every image of ``subjects`` under ``root``; finished ones are reused."""
    if segmenter not in SEGMENTERS:
        raise MaskError(f"unknown segmenter {segmenter!r}; valid: {', '.join(SEGMENTERS)}")
    producer, params = producer_name(segmenter, sam_model), producer_params(segmenter, sam_model)
    jobs = [{"subject": s.id, "image": str(image), "out": str(mask_path(root, producer, s.id, image)),
             "producer": producer, "params": params, "force": force}
            for s in subjects for image in s.images]
    if segmenter == "sam":
        model = SamSegmenter(sam_model, device)  # loaded once, before any image
        return [_make_one({**job, "segmenter": model}) for job in jobs]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_make_one, jobs, chunksize=4))
    return [_make_one(job) for job in jobs]


def subject_mask_paths(subject: Subject, segmenter: str = "sam", sam_model: str = DEFAULT_SAM_MODEL,
                       source: str = "dreambooth") -> tuple[Path, ...]:
    """The mask of every image of ``subject``, or a MaskError naming the command that makes them."""
    root = masks_root(subject.images[0].parent.parent, source)
    paths = tuple(mask_path(root, producer_name(segmenter, sam_model), subject.id, image) for image in subject.images)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MaskError(
            f"subject {subject.id!r}: {len(missing)} {segmenter} mask(s) missing (e.g. {missing[0]}); run "
            f"`subjectbench data masks --segmenter {segmenter} --dataset-dir {subject.images[0].parent.parent}`"
        )
    return paths


def with_masks(subject: Subject, segmenter: str = "sam", **kwargs) -> Subject:
    return dataclasses.replace(subject, masks=subject_mask_paths(subject, segmenter, **kwargs))


def load_subject_masks(subject: Subject) -> list[np.ndarray]:
    """The boolean masks of a subject (``subject.masks``), each checked against its image's size."""
    if not subject.masks:
        raise MaskError(f"subject {subject.id!r} has no masks; use data.masks.with_masks(subject) first")
    if len(subject.masks) != len(subject.images):
        raise MaskError(f"subject {subject.id!r}: {len(subject.masks)} masks for {len(subject.images)} images")
    masks = []
    for mask_file, image_file in zip(subject.masks, subject.images):
        mask, image = load_mask(mask_file), open_image(image_file)
        if mask.shape != (image.height, image.width):
            raise MaskError(
                f"{mask_file}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                f"{image_file} ({image.width}x{image.height}); remake it with `subjectbench data masks --force`"
            )
        masks.append(mask)
    return masks


# ----------------------------------------------------------------------------- command


def format_report(records: Sequence[MaskRecord], seconds: float, root: Path) -> str:
    made = sum(not r.reused for r in records)
    lines = [f"{len(records)} masks in {root} ({made} made, {len(records) - made} reused) in {seconds:.1f} s"]
    for flag in ("empty", "full", "touches all borders"):
        flagged = [r for r in records if flag in r.flags]
        lines.append(f"  {flag:20s} {len(flagged)}")
        lines.extend(f"    {r.subject}/{r.image} (foreground {r.foreground_fraction:.1%})" for r in flagged)
    fractions = np.array([r.foreground_fraction for r in records]) if records else np.zeros(1)
    lines.append(f"  foreground fraction: median {np.median(fractions):.1%}, "
                 f"min {fractions.min():.1%}, max {fractions.max():.1%}")
    return "\n".join(lines)


def add_masks_command(commands: argparse._SubParsersAction) -> None:
    """Register ``data masks`` on the ``data`` sub-command parser."""
    parser = commands.add_parser(
        "masks", help="make a subject mask per dataset image (SAM, or GrabCut offline)",
        description="Make one binary subject mask per image, cached with its provenance, and "
        "print a quality report (empty, full, touching every border).",
    )
    parser.add_argument("--segmenter", choices=SEGMENTERS, default="sam",
                        help="sam: transformers SAM (hub weights); grabcut: OpenCV, offline")
    parser.add_argument("--dataset", choices=DATASET_SOURCES, default="dreambooth")
    parser.add_argument("--dataset-dir", default=None, help="dataset folder (default: the cache copy)")
    parser.add_argument("--subjects", default=None, help="comma-separated subject ids (default: all)")
    parser.add_argument("--out", default=None, help="mask folder (default: beside the dataset, else the cache)")
    parser.add_argument("--force", action="store_true", help="recompute masks that are already there")
    parser.add_argument("--workers", type=int, default=available_cores(), help="GrabCut processes (default: the cores available)")
    parser.add_argument("--sam-model", default=DEFAULT_SAM_MODEL, help="hub id or local folder")
    parser.add_argument("--device", default="cpu", help="SAM device (cpu, cuda)")
    parser.set_defaults(handler=cmd_masks)


def cmd_masks(args: argparse.Namespace) -> int:
    if args.segmenter == "sam":
        check_sam_available(args.sam_model)
    subjects = load_subjects(
        args.dataset, args.dataset_dir, [s for s in args.subjects.split(",") if s] if args.subjects else None
    )
    dataset_dir = subjects[0].images[0].parent.parent
    root = Path(args.out).expanduser() if args.out else masks_root(dataset_dir, args.dataset)
    started = time.perf_counter()
    records = make_masks(subjects, root, args.segmenter, force=args.force, workers=max(1, args.workers),
                         sam_model=args.sam_model, device=args.device)
    seconds = time.perf_counter() - started
    report = format_report(records, seconds, root)
    print(report)
    summary = {"seconds": round(seconds, 2), "segmenter": args.segmenter, "dataset_dir": str(dataset_dir),
               "masks": [dataclasses.asdict(r) for r in records]}
    atomic_write_text(root / f"report-{producer_name(args.segmenter, args.sam_model)}.json",
                      json.dumps(summary, indent=1))
    return 0
