"""The score stage: score finished images with each configured metric, computing only what is
missing (new images, or images whose scoring context changed), one subject batch at a time."""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from benchmark.hashing import stable_hash
from benchmark.results import (
    CONTEXT_KEY_VERSION,
    CURRENT_SCORES_FILE,
    context_keys,
    read_score_parts,
    sibling_groups,
    write_parquet,
)
from benchmark.store import Store, atomic_write_json
from data.images import load_image, to_tensor
from data.single_image import ALL_IMAGES

log = logging.getLogger("subjectbench")


# PNG decoding (libpng, mostly without the GIL: ``_decode``) of the next subject batch while this
# one scores; decoding is the host's share of scoring (H200 hosts: 7-13 ms per 512-px PNG on one
# core with PIL), so more cores decode in more threads. Not more than 8: on 16-core H200 hosts
# 12 threads were 7 % faster on one host and 13 % slower on another whose CPU was slower
# (benchmarks/results, sixteenth session): the threads compete with the scoring thread, which
# launches every metric's kernels.
DECODE_THREADS = max(4, min(8, os.cpu_count() or 1))


def _decode(store: Store, label: str, subject: str, key: str):
    """One stored PNG as a 3×H×W uint8 tensor (floats are made on the scoring device, 4× less to copy).

    libpng through torchvision: two calls that run without the GIL, where PIL's decode goes back
    to Python per chunk and per row block. The scoring thread holds the GIL much of the time (it
    launches every metric's kernels), and a decode thread that needs it often waits. On a 2-core
    CPU (`benchmarks/cpu/test_decode_bench.py`, 512-px PNGs) one decode thread made 1.2x as many
    images as PIL's alone, 1.1-1.4x beside a thread calling small modules, 3.4-4.3x beside a
    thread running pure Python. The pixels are PIL's ``convert("RGB")``, bit for bit (tested for
    RGB, RGBA, grey, palette, 1-bit); anything else (16-bit, not a PNG, a missing file) goes
    through PIL, whose error names the file.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_png, read_file

    path = store.image_path(label, subject, key)
    try:
        pixels = decode_png(read_file(str(path)), mode=ImageReadMode.RGB)
        if pixels.dtype == torch.uint8:
            return pixels
    except RuntimeError:
        pass
    return _decode_with_pil(path)


def _decode_with_pil(path):
    """PIL's ``convert("RGB")`` of the image at ``path`` as a 3×H×W uint8 tensor (``_decode``'s
    fallback, and the reference its benchmark compares with)."""
    import torch

    with Image.open(path) as handle:
        return torch.from_numpy(np.array(handle.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def _prefetch(pool: ThreadPoolExecutor, store: Store, passes, batch) -> dict[str, Future]:
    """Start decoding every image a subject batch's metrics will ask for (image key -> future)."""
    futures: dict[str, Future] = {}
    for one in passes:
        rows = one.by_batch.get(batch, one.rows.iloc[:0])
        for label, subject, key in zip(rows["label"], rows["subject"], rows["key"]):
            if key not in futures:
                futures[key] = pool.submit(_decode, store, label, subject, key)
    return futures


def _load_photo(path) -> object:
    """One real photo (reference, training or scene image) as a 3×H×W float tensor in [0, 1]."""
    return to_tensor([load_image(path)])[0]


def _photo_paths(subject: dict | None, choice: str) -> list:
    """Every real photo a subject batch's metrics may read (scene, subject photos, the view's
    references and training images); the same path often serves several roles."""
    if subject is None:
        return []
    try:
        view = subject_view(subject, choice)
    except KeyError:  # reported by _score_batch, as a failure of that batch
        return []
    return [*(subject.get("scene") or []), *subject["images"], *view["references"], *view["train"]]


def _prefetch_photos(pool: ThreadPoolExecutor, photos: dict, subject: dict | None, choice: str) -> None:
    """Start loading the photos of a subject batch not loaded yet (path -> future, in ``photos``)."""
    for path in _photo_paths(subject, choice):
        if str(path) not in photos:
            photos[str(path)] = pool.submit(_load_photo, path)


def _photo(path, photos: dict):
    """The decoded photo at ``path``: loaded once per scoring pass (a real DreamBooth photo of up
    to ~1300 px takes tens of ms to decode), whatever roles and metrics use it. A load error
    surfaces here, as a failure of the batch that needs it."""
    key = str(path)
    value = photos.get(key)
    if value is None:
        value = photos[key] = _load_photo(path)
    elif isinstance(value, Future):
        value = photos[key] = value.result()
    return value


_UNIT_TABLES: dict = {}  # device -> the 256 values k / 255 as data.images.to_tensor computes them on the CPU


def _unit_table(device):
    import torch

    key = str(device)
    if key not in _UNIT_TABLES:
        _UNIT_TABLES[key] = torch.arange(256, dtype=torch.uint8).float().div_(255.0).to(device)
    return _UNIT_TABLES[key]


def _images(store: Store, rows: pd.DataFrame, decoded: dict | None = None, device: str = "cpu",
            shared: dict | None = None):
    """N×3×H×W float in [0, 1] of ``rows``' PNGs, on ``device``; ``decoded`` (image key -> 3×H×W
    uint8) keeps each PNG decoded once for every metric of a pass, and ``shared`` (tuple of image
    keys -> the float batch) hands metrics that score the same rows the same device tensor (they
    must not modify it in place: ``metrics.base.ScoringInputs``).

    The batch crosses to the device as uint8 (a quarter of the bytes over the bus; the metrics'
    own ``.to(device)`` become no-ops) and becomes float there by a lookup in the table of
    ``k / 255`` made on the CPU: bit-equal to ``data.images.to_tensor`` on every device (CUDA's
    division by a scalar multiplies by the reciprocal and can differ in the last bit).
    """
    import torch

    decoded = {} if decoded is None else decoded
    keys = tuple(rows["key"])
    if shared is not None and keys in shared:
        return shared[keys]
    for label, subject, key in zip(rows["label"], rows["subject"], rows["key"]):
        if isinstance(decoded.get(key), Future):
            decoded[key] = decoded[key].result()  # a decode error surfaces here, as a failure of this batch
        if key not in decoded:
            decoded[key] = _decode(store, label, subject, key)
    tensors = [decoded[key] for key in rows["key"]]
    sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
    if len(sizes) > 1:
        raise ValueError(f"images of one subject batch differ in size: {sizes}; a run has one resolution")
    if torch.device(device).type == "cuda":
        # stacked into pinned memory, the copy does not wait for the kernels queued before it
        # (from pageable memory it does); the host allocator keeps the buffer until it is done
        staged = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.uint8, pin_memory=True)
        batch = torch.stack(tensors, out=staged).to(device, non_blocking=True)
    else:
        batch = torch.stack(tensors).to(device)
    table = _unit_table(batch.device)
    images = torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
    for start in range(0, len(batch), 16):  # 16 images at a time keeps the int64 indices small
        images[start : start + 16] = table[batch[start : start + 16].long()]
    if shared is not None:
        shared[keys] = images
    return images


@dataclass
class _MetricPass:
    """One metric's share of a scoring pass: what it still has to score, where values go."""

    name: str
    metric: object
    folder: object
    needs_groups: bool
    keyed: pd.DataFrame  # every finished image with this metric's context keys
    rows: pd.DataFrame  # the images it still has to score
    by_batch: dict  # (subject, train_image) -> its part of ``rows``, split once


def score_run(
    store: Store,
    plan: pd.DataFrame,
    subjects: list[dict],
    metrics_config,
    device: str,
    progress: Callable[[str, int], None] | None = None,
    force: bool = False,
    timings: dict | None = None,
) -> tuple[int, list[dict]]:
    """Score the plan's finished images. Returns (values computed, failures).

    One pass: subject batch by subject batch, every metric scores the batch's images, which are
    decoded once for all of them (a run scored with every convention variant reads each PNG once).
    Where the time went is logged at the end and, if ``timings`` is given, added to it per metric:
    ``inputs_s`` (its photos and its batch's images on the device: waiting for their decodes, the
    copy, the float conversion) and ``score_s`` (its ``score`` calls).
    """
    from metrics.registry import build_metric

    progress = progress or (lambda stage, n: None)
    done = plan[store.done_mask(plan)]
    if done.empty or not metrics_config.names:
        return 0, []
    done = done.reset_index(drop=True)
    if "train_image" not in done:  # plans written before the single-image track
        done = done.assign(train_image=ALL_IMAGES)
    by_subject = {s["id"]: s for s in subjects}
    settings = metric_settings(metrics_config, device, cache_dir=store.root / "cache" / "metrics")
    references: dict[str, list] = {}
    current: dict[str, dict] = {}
    passes: list[_MetricPass] = []
    keyed_by_groups: dict[bool, pd.DataFrame] = {}  # the plan with its context keys, made once per kind
    for name in metrics_config.names:
        metric = build_metric(name, settings)
        fingerprint = metric.fingerprint()
        fingerprint_hash = stable_hash(fingerprint)
        folder = store.scores_dir(name, fingerprint_hash)
        atomic_write_json(folder / "fingerprint.json", fingerprint)
        needs_groups = bool(getattr(metric, "needs_complete_groups", False))
        current[name] = {
            "hash": fingerprint_hash,
            "fingerprint": fingerprint,
            "needs_complete_groups": needs_groups,
            "context_version": CONTEXT_KEY_VERSION,
        }
        if needs_groups not in keyed_by_groups:
            keyed_by_groups[needs_groups] = done.assign(context_key=context_keys(done, needs_groups))
        keyed = keyed_by_groups[needs_groups]
        rows = keyed[keyed["role"] == metric.role]
        if not force:
            have = read_score_parts(folder)
            have_pairs = set(zip(have["image_key"], have["context_key"]))
            wanted = len(rows)
            # a boolean array, not a list: an empty list would select no columns instead of no rows
            rows = rows[np.fromiter(((k, c) not in have_pairs for k, c in zip(rows["key"], rows["context_key"])),
                                    dtype=bool, count=len(rows))]
            progress("score", wanted - len(rows))  # already scored: done, as skipped images are
        by_batch = dict(iter(rows.groupby(["subject", "train_image"], sort=False)))
        passes.append(_MetricPass(name, metric, folder, needs_groups, keyed, rows, by_batch))
    batches = list(dict.fromkeys(
        batch for one in passes for batch in zip(one.rows["subject"], one.rows["train_image"])
    ))
    computed, failures = 0, []
    photos: dict = {}  # photo path -> its tensor (a future while loading), one decode per path per pass
    spent: dict = {}  # metric -> seconds building its inputs and in its score calls
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
        def load_ahead(batch) -> dict:  # a batch's photos and PNGs start loading (PNGs: key -> future)
            _prefetch_photos(pool, photos, by_subject.get(batch[0]), batch[1])
            return _prefetch(pool, store, passes, batch)

        ahead = load_ahead(batches[0]) if batches else {}
        for index, batch in enumerate(batches):
            decoded: dict = dict(ahead)  # this batch's PNGs (futures until used), decoded once for every metric
            # the next batch loads while this one scores
            ahead = load_ahead(batches[index + 1]) if index + 1 < len(batches) else {}
            got = _score_batch(batch, decoded, passes, store, by_subject, references, progress, failures, device,
                               photos, spent)
            computed += got
    atomic_write_json(store.root / CURRENT_SCORES_FILE, current)
    if spent:
        log.info("scoring seconds (inputs: photos and decoded images on the device; score: the metric's calls): %s",
                 ", ".join(f"{name} {t['inputs_s']:.2f} + {t['score_s']:.2f}" for name, t in spent.items()))
    replayed = replay_summary(one.metric for one in passes)
    if replayed:
        log.info("metrics.cuda_graphs: %s", "; ".join(
            f"{name} {purpose}: {row['graphs']} graphs, {row['replays']} replays"
            + (f", capture failed ({row['capture_error']})" if row["capture_error"] else "")
            for name, rows in replayed.items() for purpose, row in rows.items()))
    if timings is not None:
        for name, t in spent.items():
            row = timings.setdefault(name, {"inputs_s": 0.0, "score_s": 0.0})
            row["inputs_s"] += t["inputs_s"]
            row["score_s"] += t["score_s"]
    return computed, failures


def metric_settings(metrics_config, device: str, cache_dir=None):
    """The ``metrics.base.MetricSettings`` of a run's ``metrics`` config on ``device``
    (``cache_dir``: where embeddings persist; None keeps them in memory only)."""
    from metrics.base import MetricSettings

    return MetricSettings(
        weights=metrics_config.weights,
        clip=metrics_config.clip,
        lpips_net=metrics_config.lpips_net,
        batch_size=metrics_config.batch_size,
        vlm_judge_model=metrics_config.vlm_judge_model,
        cuda_graphs=metrics_config.cuda_graphs,
        device=device,
        cache_dir=cache_dir,
    )


def replay_summary(metrics) -> dict:
    """Per backbone these metrics replay (``metrics.cuda_graphs``): graphs, replays, a capture
    error — counted since the process built it."""
    from metrics.base import BackboneMetric

    out = {}
    for metric in metrics:
        if not isinstance(metric, BackboneMetric):
            continue
        backbone = metric.backbone
        replays = getattr(backbone, "replays", None)
        if replays is not None and replays.forwards:
            out[f"{backbone.kind} {backbone.arch}"] = replays.summary()
    return out


def _score_batch(batch, decoded, passes, store, by_subject, references, progress, failures, device="cpu",
                 photos: dict | None = None, spent: dict | None = None) -> int:
    """Every metric of the pass on one subject batch; failures are recorded and appended."""
    from metrics.base import ScoringInputs

    subject_id, choice = batch
    photos = {} if photos is None else photos
    computed = 0
    shared: dict = {}  # this subject batch's device tensors, one per distinct row set
    for one in passes:
        name, metric = one.name, one.metric
        subject_rows = one.by_batch.get(batch)
        if subject_rows is None:
            continue
        subject = by_subject[subject_id]
        wanted_here = len(subject_rows)  # DIV below rescores scored siblings too; they count once
        started = time.perf_counter()
        # one failure record per (metric, subject[, single-image choice]); plain runs keep their names
        failure_key = f"score-{name}-{subject_id}" + ("" if choice == ALL_IMAGES else f"-image{choice}")
        try:
            view = subject_view(subject, choice)
            if (subject_id, "scene") not in references:
                references[(subject_id, "scene")] = [_photo(p, photos) for p in subject.get("scene") or []]
            if (subject_id, "photos") not in references:
                references[(subject_id, "photos")] = [_photo(p, photos) for p in subject["images"]]
            for role in ("references", "train"):
                if (subject_id, choice, role) not in references:
                    references[(subject_id, choice, role)] = [_photo(p, photos) for p in view[role]]
            # DIV needs every sibling of a group in one call, even those already scored.
            groups = sibling_groups(subject_rows)
            if one.needs_groups:
                wanted_groups = set(groups)
                keyed = one.keyed
                all_rows = keyed[(keyed["subject"] == subject_id) & (keyed["role"] == metric.role)]
                all_rows = all_rows[all_rows["train_image"] == choice]
                all_groups = sibling_groups(all_rows)
                subject_rows, groups = all_rows[all_groups.isin(wanted_groups)], all_groups[all_groups.isin(wanted_groups)]
            inputs = ScoringInputs(
                images=_images(store, subject_rows, decoded, device, shared),
                image_keys=list(subject_rows["key"]),
                texts=list(subject_rows["eval_text"]),
                references=references[(subject_id, choice, "references")],
                reference_key=view["reference_sha"],
                groups=list(groups),
                training_images=references[(subject_id, choice, "train")],
                training_key=view["train_sha"],
                subject_images=references[(subject_id, "photos")],
                subject_key=subject["data_sha"],
                scene_images=references[(subject_id, "scene")],
                prompt_texts=list(subject_rows["prompt_text"]),
            )
            scoring_started = time.perf_counter()
            values = np.asarray(metric.score(inputs), dtype=np.float64)
            if spent is not None:
                row = spent.setdefault(name, {"inputs_s": 0.0, "score_s": 0.0})
                row["inputs_s"] += scoring_started - started
                row["score_s"] += time.perf_counter() - scoring_started
            if values.shape != (len(subject_rows),):
                raise RuntimeError(f"metric {name} returned shape {values.shape} for {len(subject_rows)} images")
        except Exception as error:  # noqa: BLE001 - a scoring failure is recorded, the rest goes on
            failure = {
                "key": failure_key,
                "stage": "score",
                "kind": "error",
                "label": "-",
                "cell_id": "-",
                "subject": subject_id,
                "metric": name,
                "message": f"{type(error).__name__}: {error}".splitlines()[0],
                "traceback": "".join(traceback.format_exception(error)),
            }
            store.record_failure(failure["key"], failure)
            failures.append(failure)
            log.error("scoring %s on %s failed: %s", name, subject_id, failure["message"])
            continue
        store.clear_failure(failure_key)
        seconds = time.perf_counter() - started
        part = pd.DataFrame(
            {
                "image_key": list(subject_rows["key"]),
                "context_key": list(subject_rows["context_key"]),
                "value": values,
                # what the metric said about each value (why NaN, a truncation, a judge's answer)
                "note": _notes(metric, len(subject_rows)),
                "seconds_per_image": seconds / max(len(subject_rows), 1),
            }
        )
        write_parquet(one.folder / f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet", part)
        computed += len(part)
        progress("score", wanted_here)
    return computed


def _notes(metric, count: int) -> list[str]:
    notes = [str(note) for note in (getattr(metric, "notes", None) or [])]
    return notes if len(notes) == count else [""] * count


def subject_view(subject: dict, choice: str) -> dict:
    """The reference and training images of ``subject`` under a single-image choice (subjects.json)."""
    views = subject.get("views") or {}
    if choice in views:
        view = dict(views[choice])
    elif choice == ALL_IMAGES:  # a store written before the single-image track
        view = {"train": subject["images"], "references": subject["images"], "reference_sha": subject["data_sha"]}
    else:
        raise KeyError(f"subject {subject['id']!r} has no single-image view {choice!r} in subjects.json; rerun the suite")
    view["train_sha"] = stable_hash(["train", subject["data_sha"], [str(p) for p in view["train"]]])
    return view


def scoring_workload(groups, metric_names) -> int:
    """Values the score stage computes at most: each metric scores the images of its role."""
    from metrics.registry import get_metric_class

    roles = [get_metric_class(name).role for name in metric_names]
    return sum(roles.count(unit.role) for group in groups for unit in group.images)
