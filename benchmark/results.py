"""Reading a run directory back: plan, image records, current scores (what reports build on)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from benchmark.hashing import stable_hash
from benchmark.store import TMP_PREFIX, Store, StoreError, atomic_write_bytes, atomic_write_json
from benchmark.units import Plan, unit_spec
from data.single_image import view_table

PLAN_FILE = "plan.parquet"
SUBJECTS_FILE = "subjects.json"
CURRENT_SCORES_FILE = "scores/current.json"
# How context keys are computed (``context_keys``). Bump it when that changes: stores scored
# under another version then ask for `subjectbench score` instead of silently showing nothing.
CONTEXT_KEY_VERSION = 2


def plan_frame(plan: Plan) -> pd.DataFrame:
    rows = []
    for group in plan.groups:
        for unit in group.images:
            spec = unit_spec(group, unit)
            rows.append({**spec, "grid": json.dumps(spec["grid"], sort_keys=True)})
    return pd.DataFrame(rows)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def save_plan(store: Store, plan: Plan) -> pd.DataFrame:
    frame = plan_frame(plan)
    write_parquet(store.root / PLAN_FILE, frame)
    subjects = [
        {
            "id": s.id,
            "class_noun": s.class_noun,
            "kind": s.kind,
            "data_sha": s.data_sha,
            "images": [str(p) for p in s.images],
            # per single-image choice: the training image(s) and the held-out references
            "views": view_table(s, plan.config.protocol.single_image),
            "scene": [str(p) for p in s.scene] if s.scene else None,  # the scene + instance task
        }
        for s in plan.subjects
    ]
    atomic_write_json(store.root / SUBJECTS_FILE, subjects)
    return frame


def load_plan(store: Store) -> pd.DataFrame:
    path = store.root / PLAN_FILE
    if not path.is_file():
        store.load_config_dict()  # raises the "not a run directory" error if that is the cause
        raise FileNotFoundError(f"{path} is missing; rerun `subjectbench run` with --out {store.root}")
    return pd.read_parquet(path)


def invocation_gpu_hours(record: dict) -> float | None:
    """An invocation's GPU-hours (``invocations.jsonl``): its wall seconds × the GPUs its workers
    shared, however many workers each held; None on a CPU or when the GPU count is unknown (Ray)."""
    gpus, wall = record.get("gpus"), record.get("seconds")
    return wall * gpus / 3600 if gpus and wall is not None else None


def run_time_line(store: Store) -> str | None:
    """One line on the run's wall time over every invocation, for ``status``; None before any."""
    records = store.invocations()
    if not records:
        return None
    wall = sum(r.get("seconds") or 0.0 for r in records)
    hours = [invocation_gpu_hours(r) for r in records]
    cut = sum(1 for r in records if r.get("stopped_in"))
    gpu = f", {sum(hours):.3f} GPU-hours" if all(h is not None for h in hours) else ""
    return (f"run time: {len(records)} invocation{'s' if len(records) != 1 else ''}, {wall:.0f} s wall{gpu}"
            + (f" ({cut} stopped early)" if cut else ""))


def load_subject_table(store: Store) -> list[dict]:
    return json.loads((store.root / SUBJECTS_FILE).read_text())


def load_records(store: Store) -> pd.DataFrame:
    """One row per finished image in the store (its manifest row), flattened."""
    rows = []
    for record in store.iter_records():
        flat = {k: v for k, v in record.items() if k not in ("fingerprint", "backbone", "packages", "sampler", "grid")}
        flat["backbone"] = record.get("backbone", {}).get("name")
        flat["backbone_random"] = record.get("backbone", {}).get("source") == "built"
        flat["fingerprint_json"] = json.dumps(record.get("fingerprint"), sort_keys=True)
        flat["packages_json"] = json.dumps(record.get("packages"), sort_keys=True)
        rows.append(flat)
    return pd.DataFrame(rows)


SIBLING_GROUP = ["prepare_key", "cell_id", "checkpoint", "template", "role"]


def sibling_groups(frame: pd.DataFrame) -> pd.Series:
    """Per image: its sibling group (DIV) — same training, same cell (cells that share a training
    differ in how they generate), checkpoint, prompt and role: the columns' strings joined by "|".
    Column-wise (a row-wise join built a Series per row: ~20 ms per subject batch and metric)."""
    columns = [frame[name].astype(str) for name in SIBLING_GROUP]
    return columns[0].str.cat(columns[1:], sep="|", na_rep="nan")


def context_keys(frame: pd.DataFrame, with_siblings: bool) -> pd.Series:
    """Per image: a hash of the scoring context a metric sees (references and CLIP-T text, plus
    the image's sibling set for metrics whose values depend on it, e.g. DIV).

    A cached score is reused only while its context key is unchanged, so DIV is recomputed when
    a sibling joins the group, and nothing else is.
    """
    if with_siblings:
        # one hash per sibling group, looked up per row (a groupby transform ran Python per group
        # through pandas' slow path)
        groups = sibling_groups(frame)
        hashes = {group: stable_hash(sorted(keys)) for group, keys in frame["key"].groupby(groups, sort=False)}
        siblings = groups.map(hashes)
    else:
        siblings = pd.Series("", index=frame.index)
    # The reference set: the subject's images (its data_sha), or the held-out ones of the
    # single-image track; plans written before the track have no reference_sha column.
    references = frame["reference_sha"] if "reference_sha" in frame else frame["data_sha"]
    return pd.Series(
        [stable_hash([d, t, s]) for d, t, s in zip(references, frame["eval_text"], siblings)],
        index=frame.index,
    )


def read_score_parts(folder: Path) -> pd.DataFrame:
    parts = sorted(p for p in folder.glob("part-*.parquet") if not p.name.startswith(TMP_PREFIX))
    if not parts:
        return pd.DataFrame(columns=["image_key", "context_key", "value"])
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return frame.drop_duplicates(["image_key", "context_key"], keep="last")


def current_fingerprints(store: Store) -> dict[str, dict]:
    """metric -> {'hash', 'fingerprint'} used by the latest scoring pass."""
    path = store.root / CURRENT_SCORES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_scores(store: Store, plan: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long scores of the plan's finished images: one row per (image, metric), current context only."""
    plan = load_plan(store) if plan is None else plan
    done = plan[store.done_mask(plan)]
    if done.empty:
        return pd.DataFrame(columns=["key", "metric", "value", "metric_fingerprint"])
    frames = []
    for metric, info in current_fingerprints(store).items():
        if info.get("context_version") != CONTEXT_KEY_VERSION:
            raise StoreError(
                f"{store.root}: the {metric} scores were written by another version of subjectbench "
                f"(context keys v{info.get('context_version', 1)}, this one reads v{CONTEXT_KEY_VERSION}); "
                f"recompute them with `subjectbench score {store.root}` (images are kept)"
            )
        scores = read_score_parts(store.scores_dir(metric, info["hash"]))
        keyed = done.assign(context_key=context_keys(done, info.get("needs_complete_groups", False)))
        merged = keyed[["key", "context_key"]].merge(
            scores, left_on=["key", "context_key"], right_on=["image_key", "context_key"]
        )
        merged = merged.assign(metric=metric, metric_fingerprint=info["hash"])
        frames.append(merged[["key", "metric", "value", "metric_fingerprint"]])
    if not frames:
        return pd.DataFrame(columns=["key", "metric", "value", "metric_fingerprint"])
    return pd.concat(frames, ignore_index=True)
