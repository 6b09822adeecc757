"""GPU time of the score stage as a user gets it: ``benchmark.scoring.score_run`` over N images
stored as PNGs, beside the in-memory floor (the same metrics on the same images already decoded).

Issue 17 item 4's target: the metrics over 3000 images (the DreamBooth protocol's 30 subjects ×
25 prompts × 4 images, 512 px) in at most 10 s, decoding and preprocessing in worker threads
while the GPU scores, one pass per image for all metrics.

How:
- A run directory (``--work DIR``, else a temporary one) is filled through the harness's own
  code: a config (the ``dummy`` method over a dataset of ``ceil(N / 100)`` subjects written next
  to it) expanded by ``benchmark.units.expand``, ``plan.parquet`` and ``subjects.json`` written by
  ``benchmark.results.save_plan``, and the first N eval images of the plan written by
  ``benchmark.runner.ImageWriter`` (PNG, then its manifest row: what marks an image done).
  The images are the bundled mini subjects' photos (128 px) upscaled, cropped to ``--size`` px at
  a seeded offset, maybe mirrored, with a seeded colour jitter: natural content, each PNG
  distinct (PNG decode cost depends on content; noise or a flat colour would mislead). Each
  subject's reference photos are made the same way (4 per subject, distinct per subject).
- Backbones are built and warmed (CUDA context, kernels, allocator) by a first ``score_run`` on
  up to 100 images in a separate run directory; the timed runs exclude every build. Before each
  timed run the in-memory embedding caches are cleared and the run directory's scores and
  embedding cache are removed, so each run computes everything, as a first `subjectbench score`
  of a finished run does (the PNGs are in the OS page cache: they were just written, as after a
  generation).
- ``score_run`` end to end (``--repeats`` times, 3 on CUDA; the median is reported): seconds,
  images/s, peak GPU memory, and the seconds spent inside each metric's ``score`` calls as the
  run records them per subject batch (these include waiting for a batch's decodes).
- In-memory floor: the same metrics, built with the same settings except the embedding cache
  (memory only), score per subject batch the same images already decoded (float tensors in CPU
  memory), with the same texts, references and sibling groups (``benchmarks/gpu_metrics.py::
  timed_pass``'s loop). It runs before the timed ``score_run``s. It is what a caller scoring
  in-memory float tensors gets, and no longer a lower bound: ``score_run`` sends uint8 to the GPU
  and decodes ahead in threads, and on an H200 it ran below this "floor" (eighteenth session).
- PNG decode alone (``benchmark.scoring``'s decode: PNG -> RGB -> float tensor): seconds per
  image on one thread, and the wall time of all N in ``scoring.DECODE_THREADS`` threads.

Metric weights are random-init (the real architectures; no hub access): speed figures only.
The harness's settings are kept: metrics batch size from the config (32 unless ``--batch-size``),
precision "auto" (bf16 autocast on CUDA), cuDNN not benchmarking.

Usage (from the repository root):
    python benchmarks/gpu_scoring.py                     # CUDA, N=3000 at 512 px, JSON to $OUT or .
    python benchmarks/gpu_scoring.py --metrics suite:default   # the default suite's metric list
CPU check (the same code path, well under 2 minutes on 2 cores):
    python benchmarks/gpu_scoring.py --device cpu --n 48 --size 64 --out /tmp/gs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import environment, scoring  # noqa: E402
from benchmark.config import load_config  # noqa: E402
from benchmark.driver import resolved_config  # noqa: E402
from benchmark.results import load_subject_table, read_score_parts, save_plan, sibling_groups  # noqa: E402
from benchmark.runner import GroupResult, ImageWriter, JobSpec, _record  # noqa: E402
from benchmark.store import Store  # noqa: E402
from benchmark.units import expand, method_context  # noqa: E402
from benchmarks.gpu_metrics import (  # noqa: E402
    peak_memory,
    profile_steps,
    reset_peak,
    save_partial,
    synchronize,
    write_result,
)
from data.images import load_image, to_tensor  # noqa: E402
from data.subjects import mini_dataset_dir, read_subject_table  # noqa: E402
from metrics.base import CUDA_GRAPH_MODES, ScoringInputs  # noqa: E402
from metrics.embeddings import clear_embedding_caches  # noqa: E402
from metrics.registry import build_metric, get_metric_class  # noqa: E402

DEFAULT_METRICS = ("clip_t", "clip_i", "dino", "div")
PROMPTS, IMAGES_PER_PROMPT, REFERENCES = 25, 4, 4
PER_SUBJECT = PROMPTS * IMAGES_PER_PROMPT
WARMUP_IMAGES = PER_SUBJECT  # one full subject batch: every batch shape of the timed runs is met once
TARGET_SECONDS, TARGET_IMAGES = 10.0, 3000


# ---------------------------------------------------------------------------- images
def mini_photos() -> list[tuple[dict, list[Image.Image]]]:
    """The bundled mini subjects (their subjects.yaml row) with their photos, decoded once."""
    root = mini_dataset_dir()
    out = []
    for row in read_subject_table(root):
        paths = sorted(p for p in (root / row["id"]).iterdir() if p.suffix.lower() == ".png")
        out.append((row, [Image.open(p).convert("RGB") for p in paths]))
    return out


def varied(photo: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """``photo`` upscaled, cropped to size×size at a random offset, maybe mirrored, colour-jittered."""
    side = int(round(size * rng.uniform(1.1, 1.5)))
    image = photo.resize((side, side), Image.Resampling.BICUBIC)
    x, y = (int(v) for v in rng.integers(0, side - size + 1, size=2))
    image = image.crop((x, y, x + size, y + size))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.85, 1.15)))
    return image


def write_dataset(root: Path, subjects: int, size: int, seed: int) -> None:
    """A custom dataset of ``subjects`` subjects (cycling over the mini ones), 4 photos each."""
    if (root / "subjects.yaml").is_file() and len(read_subject_table(root)) == subjects:
        return
    sources = mini_photos()
    rows = []
    for index in range(subjects):
        row, photos = sources[index % len(sources)]
        subject_id = f"{row['id']}_{index:02d}"
        folder = root / subject_id
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 1, index])
        for number in range(REFERENCES):
            varied(photos[number % len(photos)], size, rng).save(folder / f"{number:02d}.png")
        rows.append({"id": subject_id, "class": row["class"], "kind": row["kind"]})
    (root / "subjects.yaml").write_text(yaml.safe_dump({"subjects": rows}, sort_keys=False))


# ---------------------------------------------------------------------------- run directory
def harness_config(dataset: Path, args: argparse.Namespace):
    overrides = [
        "dataset.source=custom",
        f"dataset.path={dataset}",
        "methods=dummy",
        "protocol.prompts=all",
        f"protocol.images_per_prompt={IMAGES_PER_PROMPT}",
        f"protocol.prior_images={args.prior_images}",
        f"protocol.resolution={args.size}",
        f"metrics.names=[{','.join(args.metrics)}]",
        "metrics.weights=random",
    ]
    if args.batch_size is not None:
        overrides.append(f"metrics.batch_size={args.batch_size}")
    return load_config("default", overrides), overrides


def populate(root: Path, dataset: Path, n: int, args: argparse.Namespace) -> tuple[Store, pd.DataFrame, list[dict], dict]:
    """A run directory holding the plan and its first ``n`` eval images (plus the prior images
    of their subjects), written as the runner writes them. Images already there are kept."""
    config, overrides = harness_config(dataset, args)
    store = Store(root)
    store.ensure()
    context = method_context(config, args.device, "float32")
    plan = expand(config, context)
    store.save_config(resolved_config(config))
    plan_table = save_plan(store, plan)
    job = JobSpec(run_dir=str(store.root), context=context, batch_size=config.generation.batch_size)
    photos = {row["id"]: images for row, images in mini_photos()}
    eval_left, written, started = n, 0, time.perf_counter()
    threads = max(4, os.cpu_count() or 1)  # setup only: as fast as the machine allows
    for group in plan.groups:
        if eval_left <= 0:
            break
        subject = group.prepare.subject
        source = photos[subject.id.rsplit("_", 1)[0]]
        units = [u for u in group.images if u.role == "eval"][:eval_left]
        eval_left -= len(units)
        units += [u for u in group.images if u.role != "eval"]
        units = [u for u in units if not store.image_done(u.label, u.subject_id, u.key)]

        def make(unit, source=source):
            rng = np.random.default_rng([args.seed, 2, int(unit.key[:15], 16)])  # per image
            return varied(source[int(rng.integers(len(source)))], args.size, rng)

        writer = ImageWriter(store, group, GroupResult(group=subject.id), threads)
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="make") as makers:
                for unit, image in zip(units, makers.map(make, units)):
                    writer.submit(unit, image, _record(unit, group, job, 0.0, {}, compiled=False))
                    written += 1
        finally:
            writer.drain()
    info = {"images_written": written, "write_seconds": round(time.perf_counter() - started, 2), "overrides": overrides}
    return store, plan_table, load_subject_table(store), info


def reset_scores(store: Store) -> None:
    """Forget every score and embedding of this run directory, on disk and in memory."""
    for folder in ("scores", "cache", "failures"):
        shutil.rmtree(store.root / folder, ignore_errors=True)
    clear_embedding_caches()


def score_parts(store: Store, name: str) -> pd.DataFrame:
    """Every score part the run holds for metric ``name`` (all fingerprints), as one frame."""
    folders = list((store.root / "scores" / name).glob("*"))
    return pd.concat([read_score_parts(f) for f in folders]) if folders else pd.DataFrame()


def metric_call_seconds(store: Store, names: list[str]) -> dict[str, float]:
    """Per metric: the seconds its score calls took, as the run recorded them per subject batch."""
    out = {}
    for name in names:
        parts = score_parts(store, name)
        if parts.empty or "seconds_per_image" not in parts:
            out[name] = 0.0
            continue
        # one seconds_per_image per (batch, metric) part: each row carries seconds / rows
        out[name] = round(float(parts["seconds_per_image"].sum()), 3)
    return out


def score_values(store: Store, names: list[str]) -> dict[str, pd.Series]:
    """Per metric: the values of its score parts, by image key (NaN where the metric gave NaN)."""
    out = {}
    for name in names:
        parts = score_parts(store, name)
        out[name] = (parts.drop_duplicates("image_key", keep="last").set_index("image_key")["value"].sort_index()
                     if not parts.empty else pd.Series(dtype=float))
    return out


def values_difference(reference: pd.Series, other: pd.Series) -> dict:
    """How ``other`` differs from ``reference``: images compared, the largest |difference|, and
    whether every value (NaN included) is identical."""
    joined = pd.concat([reference.rename("a"), other.rename("b")], axis=1)
    both_nan = joined["a"].isna() & joined["b"].isna()
    delta = (joined["a"] - joined["b"]).abs()
    return {
        "images": int(len(joined)),
        "max_abs_difference": float(delta.max()) if delta.notna().any() else 0.0,
        "identical": bool(((joined["a"] == joined["b"]) | both_nan).all()),
    }


def replay_summaries(config, device: str) -> dict:
    """Graphs captured and replays per backbone and forward, under ``config.metrics``' settings."""
    settings = scoring.metric_settings(config.metrics, device)
    return scoring.replay_summary(build_metric(name, settings) for name in config.metrics.names)


def repeated_score_runs(store: Store, plan: pd.DataFrame, subjects: list[dict], config, device: torch.device,
                        repeats: int) -> tuple[list[dict], float]:
    """``timed_score_run`` ``repeats`` times: each run's record and the median seconds."""
    runs = [timed_score_run(store, plan, subjects, config, device) for _ in range(repeats)]
    return runs, statistics.median(r["seconds"] for r in runs)


def timed_score_run(store: Store, plan: pd.DataFrame, subjects: list[dict], config, device: torch.device) -> dict:
    reset_scores(store)
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    split: dict = {}
    computed, failures = scoring.score_run(store, plan, subjects, config.metrics, str(device), timings=split)
    synchronize(device)
    seconds = time.perf_counter() - started
    in_calls = metric_call_seconds(store, list(config.metrics.names))
    return {
        "seconds": round(seconds, 3),
        "values_computed": computed,
        "failures": [f"{f['metric']} on {f['subject']}: {f['message']}" for f in failures],
        # per metric, as score_run records it per subject batch: references, waiting for the
        # batch's decodes, stacking them, and the score call
        "seconds_in_metric_calls": in_calls,
        "seconds_outside_metric_calls": round(seconds - sum(in_calls.values()), 3),
        # the same calls split: building the inputs (photos, waiting for the batch's decodes, the
        # copy to the device and the float conversion) vs the metric's own score call
        "seconds_split": {name: {k: round(v, 3) for k, v in row.items()} for name, row in split.items()},
        **peak_memory(device),
    }


# ---------------------------------------------------------------------------- in-memory floor
def decode_alone(store: Store, done: pd.DataFrame, sample: int) -> dict:
    """PNG decode as the scoring path does it: one thread per image, and N in DECODE_THREADS."""
    rows = list(zip(done["label"], done["subject"], done["key"]))
    count = min(sample, len(rows))
    started = time.perf_counter()
    for label, subject, key in rows[:count]:
        scoring._decode(store, label, subject, key)
    one_thread = (time.perf_counter() - started) / max(count, 1)
    started = time.perf_counter()
    with ThreadPoolExecutor(scoring.DECODE_THREADS, thread_name_prefix="decode") as pool:
        tensors = list(pool.map(lambda row: scoring._decode(store, *row), rows))
    threaded = time.perf_counter() - started
    sizes = [store.image_path(*row).stat().st_size for row in rows]
    return {
        "seconds_per_image_one_thread": round(one_thread, 5),
        "sample_images": count,
        "threads": scoring.DECODE_THREADS,
        "seconds_all_images_in_threads": round(threaded, 3),
        "images_per_second_in_threads": round(len(rows) / threaded, 1),
        "png_kib_mean": round(sum(sizes) / len(sizes) / 1024, 1),
    }, dict(zip(done["key"], tensors))


def floor_batches(done: pd.DataFrame, tensors: dict, subjects: list[dict], roles: set[str]) -> list[dict[str, ScoringInputs]]:
    """Per subject batch and metric role: the ScoringInputs ``score_run`` would build."""
    by_subject = {s["id"]: s for s in subjects}
    photos = {}
    batches = []
    for (subject_id, choice), rows in done.groupby(["subject", "train_image"], sort=False):
        subject = by_subject[subject_id]
        view = scoring.subject_view(subject, choice)

        def load(paths):
            return [to_tensor([load_image(p)])[0] for p in paths]

        if subject_id not in photos:
            photos[subject_id] = load(subject["images"])
        per_role = {}
        for role in roles:
            part = rows[rows["role"] == role]
            if part.empty:
                continue
            per_role[role] = ScoringInputs(
                # one copy in memory, float on the host (what a caller scoring in-memory tensors holds)
                images=torch.stack([tensors.pop(key) for key in part["key"]]).float().div_(255.0),
                image_keys=list(part["key"]),
                texts=list(part["eval_text"]),
                references=load(view["references"]),
                reference_key=view["reference_sha"],
                groups=list(sibling_groups(part)),
                training_images=load(view["train"]),
                training_key=view["train_sha"],
                subject_images=photos[subject_id],
                subject_key=subject["data_sha"],
                scene_images=load(subject.get("scene") or []),
                prompt_texts=list(part["prompt_text"]),
            )
        batches.append(per_role)
    return batches


def timed_floor(metrics: dict, batches: list[dict[str, ScoringInputs]], device: torch.device) -> dict:
    """Every metric on every subject batch, as ``gpu_metrics.timed_pass`` does, per role."""
    clear_embedding_caches()
    reset_peak(device)
    seconds = dict.fromkeys(metrics, 0.0)
    synchronize(device)
    started = time.perf_counter()
    for per_role in batches:
        for name, metric in metrics.items():
            inputs = per_role.get(metric.role)
            if inputs is None:
                continue
            synchronize(device)
            t0 = time.perf_counter()
            values = metric.score(inputs)
            synchronize(device)
            seconds[name] += time.perf_counter() - t0
            assert np.asarray(values).shape == (inputs.images.shape[0],), (name, np.asarray(values).shape)
    total = time.perf_counter() - started
    return {
        "seconds": round(total, 3),
        "seconds_per_metric": {name: round(value, 3) for name, value in seconds.items()},
        **peak_memory(device),
    }


# ---------------------------------------------------------------------------- main
def resolve_metrics(text: str) -> list[str]:
    if text.startswith("suite:"):
        return list(load_config(text.split(":", 1)[1]).metrics.names)
    return [name.strip() for name in text.split(",") if name.strip()]


def _progress(message: str) -> None:
    """A stage line on stderr, so a run stopped by a time limit shows how far it got."""
    print(f"[gpu_scoring] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, save=None) -> dict:
    """The benchmark; ``save(result)``, if given, is called after each stage with what is measured
    so far (``"complete": False`` until the end), so a call cut off by its time limit keeps it."""
    save = save or (lambda result: None)
    device = torch.device(args.device)
    environment.apply_determinism(False)  # as `subjectbench run`: fast kernels, cuDNN not benchmarking
    threads = environment.configure_cpu_threads(1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-scoring-"))
    n_subjects = math.ceil(args.n / PER_SUBJECT)
    dataset = work / f"dataset-{args.size}px"
    result: dict = {
        "device": environment.device_name(args.device),
        "device_type": device.type,
        "versions": {**environment.package_versions(), "cuda": torch.version.cuda, "platform": platform.platform()},
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads,
        "decode_threads": scoring.DECODE_THREADS,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "n_images": args.n,
        "image_size": args.size,
        "subjects": n_subjects,
        "metrics": args.metrics,
        "weights": "random (real architectures; speed only, values are not measurements)",
        "work_dir": str(work),
        "complete": False,
    }
    roles = sorted({get_metric_class(name).role for name in args.metrics})
    if "prior" in roles and args.prior_images == 0:
        print("warning: a metric of role 'prior' is asked for but --prior-images is 0: it scores nothing")

    started = time.perf_counter()
    _progress(f"writing {args.n} PNGs of {args.size} px ...")
    write_dataset(dataset, n_subjects, args.size, args.seed)
    store, plan, subjects, info = populate(work / f"run-{args.size}px", dataset, args.n, args)
    config, _ = harness_config(dataset, args)
    result["setup"] = {**info, "seconds": round(time.perf_counter() - started, 2)}
    result["metrics_batch_size"] = config.metrics.batch_size
    result["precision"] = "bf16-autocast" if device.type == "cuda" else "fp32"
    save(result)

    # Builds and warm-up: a first score_run in its own run directory (backbones stay cached).
    _progress(f"store written in {result['setup']['seconds']} s; metric builds and warm-up ...")
    started = time.perf_counter()
    warm_images = min(args.n, WARMUP_IMAGES)
    warm_store, warm_plan, warm_subjects, _ = populate(work / f"warmup-{args.size}px", dataset, warm_images, args)
    reset_scores(warm_store)
    t0 = time.perf_counter()
    scoring.score_run(warm_store, warm_plan, warm_subjects, config.metrics, args.device)
    synchronize(device)
    result["warmup"] = {
        "images": warm_images,
        "score_run_seconds_with_builds": round(time.perf_counter() - t0, 2),
        "seconds_total": round(time.perf_counter() - started, 2),
    }

    # The floor first: decode every image (timed alone), score them from memory, free them.
    _progress("decode alone and the in-memory floor ...")
    done = plan[store.done_mask(plan)].reset_index(drop=True)
    assert len(done) >= args.n, f"only {len(done)} of {args.n} images are done in {store.root}"
    roles_present = {get_metric_class(name).role for name in args.metrics}
    result["decode"], tensors = decode_alone(store, done, args.decode_sample)
    batches = floor_batches(done, tensors, subjects, roles_present)
    del tensors
    settings = scoring.metric_settings(config.metrics, args.device)  # no cache_dir: memory only
    metrics = {name: build_metric(name, settings) for name in args.metrics}
    for metric in metrics.values():
        metric.fingerprint()  # the backbone, cached since the warm-up: no build in the timing
    floor = timed_floor(metrics, batches, device)
    result["images_scored"] = len(done)  # the N eval images, plus prior images if asked for
    floor["images_per_second"] = round(len(done) / floor["seconds"], 1)
    floor["embedding_cache"] = "memory only"
    result["in_memory_floor"] = floor
    save(result)
    del batches, metrics

    _progress(f"floor {floor['seconds']} s; score_run × {args.repeats} ...")
    runs, seconds = repeated_score_runs(store, plan, subjects, config, device, args.repeats)
    result["score_run"] = {
        "seconds": round(seconds, 3),
        "images_per_second": round(len(done) / seconds, 1),
        "seconds_over_floor": round(seconds - floor["seconds"], 3),
        "excludes": "backbone builds and warm-up (a first score_run in another run directory, same process)",
        "includes": "done check of the plan, context keys, PNG decode (threads), references, every "
                    "metric's score calls, writing score parts and the embedding cache",
        "repeats": runs,
    }
    for threads in getattr(args, "decode_threads", []):
        # the same score_run with another decode pool size (the host decodes every PNG: on a
        # machine with more cores than scoring.DECODE_THREADS uses, more threads may hide it)
        if threads == scoring.DECODE_THREADS:
            continue
        _progress(f"score_run × {args.repeats} with {threads} decode threads ...")
        default_threads, scoring.DECODE_THREADS = scoring.DECODE_THREADS, threads
        try:
            more, median = repeated_score_runs(store, plan, subjects, config, device, args.repeats)
        finally:
            scoring.DECODE_THREADS = default_threads
        result.setdefault("score_run_by_decode_threads", {})[str(threads)] = {
            "seconds": round(median, 3), "repeats": more}
        save(result)
    if getattr(args, "cuda_graphs", []):
        reference_values = score_values(store, list(config.metrics.names))
    for mode in getattr(args, "cuda_graphs", []):
        # the same score_run under another metrics.cuda_graphs mode: one untimed run of the
        # warm-up directory first (with graphs on, it captures), then the timed repeats; the values
        # must equal those of the default runs above exactly (replayed or plain, the same kernels)
        if mode == config.metrics.cuda_graphs:
            continue
        _progress(f"score_run × {args.repeats} with metrics.cuda_graphs={mode} ...")
        arm = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, cuda_graphs=mode))
        reset_scores(warm_store)
        t0 = time.perf_counter()
        scoring.score_run(warm_store, warm_plan, warm_subjects, arm.metrics, str(device))
        synchronize(device)
        capture_seconds = time.perf_counter() - t0
        more, median = repeated_score_runs(store, plan, subjects, arm, device, args.repeats)
        values = score_values(store, list(config.metrics.names))
        differences = {name: values_difference(reference_values[name], values[name]) for name in values}
        result.setdefault("score_run_by_cuda_graphs", {})[mode] = {
            "seconds": round(median, 3),
            "warm_up_run_seconds_with_captures": round(capture_seconds, 2),
            "replays": replay_summaries(arm, args.device),
            # against the runs above, made with the default mode (files before 2026-12-05 call
            # this "values_vs_plain": the default was false then)
            "values_vs_default_run": {"default_mode": config.metrics.cuda_graphs, **differences},
            "repeats": more,
        }
        save(result)
    result["target"] = {
        "seconds": TARGET_SECONDS,
        "n_images": TARGET_IMAGES,
        "measured_seconds": round(seconds, 3),
        "met": bool(args.n >= TARGET_IMAGES and args.size >= 512 and seconds <= TARGET_SECONDS),
    }
    save(result)
    if args.profile:
        # the warm-up's run directory (up to 100 images, one subject): the profiler's own
        # post-processing of a 3000-image run outlasted a 180 s device call
        _progress("score_run of the warm-up directory under the profiler ...")

        def profiled_run():
            reset_scores(warm_store)
            scoring.score_run(warm_store, warm_plan, warm_subjects, config.metrics, str(device))

        # the device's busy seconds beside the wall: how much a faster host could still gain
        profile = profile_steps(profiled_run, 1, device, top=40)
        result["score_run"]["profile"] = {"images": warm_images, **profile}
    result["complete"] = True
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="images to score (default 3000: 30 subjects × 25 × 4)")
    parser.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma-separated metric names, or suite:NAME for a suite's list (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="metrics.batch_size (default: the config's, 32)")
    parser.add_argument("--prior-images", type=int, default=0, help="prior images per subject (for PRES; default 0)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed score_run repeats, the median is reported (default 3 on CUDA, 1 on a CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="one more score_run, of the warm-up directory (<= 100 images), under torch.profiler: "
                             "device busy seconds, top operators")
    parser.add_argument("--decode-sample", type=int, default=300, help="images timed for one-thread decode")
    parser.add_argument("--decode-threads", default="",
                        help="comma-separated decode pool sizes to time score_run with besides the default "
                             "(scoring.DECODE_THREADS), e.g. 12,16: score_run_by_decode_threads")
    parser.add_argument("--cuda-graphs", default="",
                        help="comma list of metrics.cuda_graphs modes to time beside the default (e.g. auto), "
                             "each checked for values identical to the default's")
    parser.add_argument("--work", default=None, help="run directory parent to (re)use; default a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_scoring.json, else ./gpu_scoring.json)")
    args = parser.parse_args(argv)
    args.metrics = resolve_metrics(args.metrics)
    try:
        args.decode_threads = [int(t) for t in str(args.decode_threads).split(",") if t.strip()]
    except ValueError:
        parser.error(f"--decode-threads {args.decode_threads!r}: give whole numbers, e.g. 12,16")
    if any(t < 1 for t in args.decode_threads):
        parser.error(f"--decode-threads {args.decode_threads}: each must be 1 or more")
    args.cuda_graphs = [m.strip().lower() for m in str(args.cuda_graphs).split(",") if m.strip()]
    unknown = sorted(set(args.cuda_graphs) - set(CUDA_GRAPH_MODES))
    if unknown:
        parser.error(f"--cuda-graphs {unknown}: choose from {', '.join(CUDA_GRAPH_MODES)}")
    if args.repeats is None:
        args.repeats = 3 if args.device.startswith("cuda") else 1
    write_result(run(args, save=lambda result: save_partial(result, args.out, "gpu_scoring.json")), args.out,
                 "gpu_scoring.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
