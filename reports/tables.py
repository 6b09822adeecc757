"""Aggregate tables: metric means with hierarchical-bootstrap CIs per method entry, breakdowns
by subject kind and prompt category, a per-subject table and a cost table.

Every table is first a tidy numeric DataFrame (what the CSVs hold); ``reports.render`` turns them
into Markdown and HTML. A metric with no values for a row is NaN here and "—" when rendered.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.results import invocation_gpu_hours
from reports.rundata import RunData
from reports.schema import ENTRY_COLUMNS, clip_t_scales, ordered_metrics
from reports.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    hierarchical_bootstrap,
)

ENTRY_KEYS = [*ENTRY_COLUMNS, "entry"]
# Between-subject variation cannot be estimated from one subject: such rows get no interval.
MIN_SUBJECTS_FOR_CI = 2


def entry_order(images: pd.DataFrame) -> list[str]:
    """Entries in config order: cells as planned, checkpoints in step order."""
    if images.empty:
        return []
    ordered = images.drop_duplicates("entry").reset_index()
    ordered["_cell_pos"] = ordered.groupby("cell_id")["index"].transform("min")
    return list(ordered.sort_values(["_cell_pos", "checkpoint_index"])["entry"])


def with_clip_t_scales(long: pd.DataFrame) -> pd.DataFrame:
    """``long`` plus pseudo-metric rows 'clip_t_x100' and 'clipscore' derived from CLIP-T rows.

    CLIPScore clamps each image at 0 before averaging, so its mean is not a function of the
    mean cosine: it is bootstrapped like any metric.
    """
    clip_t = long[long["metric"] == "clip_t"]
    if clip_t.empty:
        return long
    extra = []
    for name, values in clip_t_scales(clip_t["value"].to_numpy(dtype=np.float64)).items():
        extra.append(clip_t.assign(metric=name, value=values))
    return pd.concat([long, *extra], ignore_index=True)


def metric_summary(
    long: pd.DataFrame,
    by: list[str],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    intervals: bool = True,
) -> pd.DataFrame:
    """Tidy: one row per (``by`` groups, metric) with mean, ci_low, ci_high, n_subjects, n_images."""
    columns = [*by, "metric", "mean", "ci_low", "ci_high", "n_subjects", "n_images"]
    if long.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for group, frame in long.groupby([*by, "metric"], sort=False, dropna=False):
        values = frame["value"].to_numpy(dtype=np.float64)
        if intervals:
            estimate = hierarchical_bootstrap(
                values, frame["subject"].to_numpy(), frame["template"].to_numpy(), resamples, seed, confidence
            )
            mean, low, high = estimate.mean, estimate.low, estimate.high
            n_subjects, n_images = estimate.n_subjects, estimate.n_images
            if n_subjects < MIN_SUBJECTS_FOR_CI:
                low = high = np.nan
        else:
            kept = frame[~np.isnan(values)]
            mean = float(kept["value"].mean()) if len(kept) else np.nan
            low = high = np.nan
            n_subjects, n_images = kept["subject"].nunique(), len(kept)
        rows.append([*group, mean, low, high, n_subjects, n_images])
    return pd.DataFrame(rows, columns=columns)


def wide(tidy: pd.DataFrame, index: list[str], metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per ``index`` group; columns <metric>_mean, _ci_low, _ci_high, _n_images."""
    if tidy.empty:
        return pd.DataFrame(columns=index)
    metrics = metrics or ordered_metrics(tidy["metric"].unique())
    out = tidy[index].drop_duplicates().reset_index(drop=True)
    for metric in metrics:
        part = tidy[tidy["metric"] == metric][[*index, "mean", "ci_low", "ci_high", "n_subjects", "n_images"]]
        part = part.rename(columns={c: f"{metric}_{c}" for c in ("mean", "ci_low", "ci_high", "n_subjects", "n_images")})
        out = out.merge(part, on=index, how="left")
    return out


CATEGORY_ORDER = {"recontextualization": 0, "accessorization": 1, "property": 2, "prior": 3}


def sort_entries(frame: pd.DataFrame, order: list[str], extra: list[str] | None = None) -> pd.DataFrame:
    """Entries in config order, then ``extra`` columns (prompt categories in protocol order)."""
    position = {entry: i for i, entry in enumerate(order)}
    keyed = frame.assign(_pos=frame["entry"].map(position))
    keys = ["_pos"]
    for column in extra or []:
        if column == "category":
            keyed[f"_{column}"] = keyed[column].map(CATEGORY_ORDER).fillna(len(CATEGORY_ORDER))
            keys += [f"_{column}", column]
        else:
            keys.append(column)
    keyed = keyed.sort_values(keys, kind="stable")
    return keyed.drop(columns=[k for k in keys if k.startswith("_")]).reset_index(drop=True)


def summary_tables(
    run: RunData,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, pd.DataFrame]:
    """The wide numeric tables of a run: summary, by_kind, by_category, per_subject, clip_t_scales."""
    long = run.long
    order = entry_order(run.images)
    metrics = ordered_metrics(long["metric"].unique()) if not long.empty else []
    tables: dict[str, pd.DataFrame] = {}
    overall = metric_summary(long, ENTRY_KEYS, resamples, seed, confidence)
    summary = sort_entries(wide(overall, ENTRY_KEYS, metrics), order) if metrics else pd.DataFrame(columns=ENTRY_KEYS)
    # Grid parameters as columns, so that an ablation table can be plotted against them directly.
    grid_columns = [c for c in run.images.columns if c.startswith("grid_")]
    if grid_columns and not summary.empty:
        grids = run.images.drop_duplicates("cell_id")[["cell_id", *grid_columns]]
        summary = summary.merge(grids, on="cell_id", how="left")
    tables["summary"] = summary
    for name, column in (("by_kind", "kind"), ("by_category", "category")):
        tidy = metric_summary(long, [*ENTRY_KEYS, column], resamples, seed, confidence)
        table = wide(tidy, [*ENTRY_KEYS, column], metrics) if metrics else pd.DataFrame(columns=[*ENTRY_KEYS, column])
        tables[name] = sort_entries(table, order, [column]) if not table.empty else table
    per_subject = metric_summary(long, [*ENTRY_KEYS, "subject", "kind"], intervals=False)
    table = wide(per_subject, [*ENTRY_KEYS, "subject", "kind"], metrics) if metrics else pd.DataFrame()
    if not table.empty:
        table = table.drop(columns=[c for c in table.columns if c.endswith(("_ci_low", "_ci_high", "_n_subjects"))])
        table = sort_entries(table, order, ["subject"])
    tables["per_subject"] = table
    scales = metric_summary(with_clip_t_scales(long[long["metric"] == "clip_t"]), ENTRY_KEYS, resamples, seed, confidence)
    scales = scales[scales["metric"].isin(["clip_t", "clip_t_x100", "clipscore"])]
    tables["clip_t_scales"] = (
        sort_entries(wide(scales, ENTRY_KEYS, ["clip_t", "clip_t_x100", "clipscore"]), order) if not scales.empty else pd.DataFrame()
    )
    return tables


def _device_class(devices: pd.Series) -> str:
    kinds = {"CPU" if str(d).startswith("cpu") else "GPU" for d in devices.dropna()}
    return "/".join(sorted(kinds)) if kinds else "?"


def _peak(frame: pd.DataFrame, cuda: str, rss: str) -> tuple[float, str]:
    """Peak CUDA memory where it was measured, else the process's peak RSS (labelled)."""
    if cuda in frame and frame[cuda].notna().any():
        return float(frame[cuda].max()), "CUDA"
    if rss in frame and frame[rss].notna().any():
        return float(frame[rss].max()), "RSS"
    return np.nan, "?"


def _pretraining(states: pd.DataFrame) -> dict:
    """One-time pre-training of the cell's encoder (steps, seconds, images, device), NaN if none."""
    if states.empty or "pretrain_seconds" not in states or states["pretrain_seconds"].isna().all():
        return {"pretrain_seconds": np.nan, "pretrain_steps": np.nan, "pretrain_images": np.nan, "pretrain_device": "?"}
    first = states[states["pretrain_seconds"].notna()].iloc[0]
    out = {k: first[k] for k in ("pretrain_seconds", "pretrain_steps", "pretrain_images")}
    # "cuda x8": a device class and a process count; the seconds are wall seconds of all of them.
    kind, _, processes = str(first["pretrain_device"]).partition(" x")
    out["pretrain_device"] = _device_class(pd.Series([kind])) + (f" x{processes}" if processes not in ("", "1") else "")
    return out


RUN_TIME_COLUMNS = ["invocation", "started", "config", "device_name", "executor", "gpus", "workers_per_gpu", "mps",
                    "plan_seconds", "execute_seconds", "score_seconds", "wall_seconds", "stopped_in",
                    "images_generated", "gpu_hours"]


def run_time_table(run: RunData) -> pd.DataFrame:
    """Each invocation of the run (``invocations.jsonl``): wall seconds per stage, where and how it
    ran, and its GPU-hours = wall seconds × the GPUs its workers shared (however many workers per
    GPU); then a ``total`` row. What a run cost the hardware, where the cost table's
    ``device_hours`` (per cell, summed over processes) overstate it when workers share a GPU.
    An invocation whose GPU count is unknown (a Ray cluster) or that ran on a CPU has no GPU-hours."""
    rows = []
    for number, record in enumerate(run.invocations, 1):
        stages = record.get("stage_seconds") or {}
        gpus = record.get("gpus")
        wall = record.get("seconds")
        hours = invocation_gpu_hours(record)
        rows.append({
            "invocation": str(number), "started": record.get("started"), "config": record.get("config"),
            "device_name": record.get("device_name"),
            "executor": record.get("executor"), "gpus": gpus, "workers_per_gpu": record.get("workers_per_gpu"),
            "mps": record.get("mps"), "plan_seconds": stages.get("plan"), "execute_seconds": stages.get("execute"),
            "score_seconds": stages.get("score"), "wall_seconds": wall, "stopped_in": record.get("stopped_in"),
            "images_generated": record.get("images_generated"),
            "gpu_hours": np.nan if hours is None else hours,
        })
    if not rows:
        return pd.DataFrame(columns=RUN_TIME_COLUMNS)
    table = pd.DataFrame(rows, columns=RUN_TIME_COLUMNS)
    numeric = ["plan_seconds", "execute_seconds", "score_seconds", "wall_seconds", "images_generated"]
    total = {"invocation": "total", **{c: pd.to_numeric(table[c], errors="coerce").sum(min_count=1) for c in numeric}}
    gpu_rows = pd.to_numeric(table["gpu_hours"], errors="coerce")
    # a total only when every invocation's GPU-hours are known (a CPU or Ray invocation among them: none)
    total["gpu_hours"] = gpu_rows.sum() if gpu_rows.notna().all() else np.nan
    return pd.concat([table, pd.DataFrame([total], columns=RUN_TIME_COLUMNS)], ignore_index=True)


def cost_table(run: RunData) -> pd.DataFrame:
    """Per method cell: preparation time and memory, state size, generation time and memory, and the
    one-time pre-training of a pre-trained component (the tuning encoder), kept apart from the
    per-subject seconds.

    ``device_hours``: the cell's preparation plus generation seconds on its device, summed over
    subjects and images (what the cell cost; scoring and start-up are not in it). With several
    workers sharing one GPU (``--workers-per-gpu``) these are process-hours: the GPU's wall time
    is lower by the concurrency gain (``benchmarks/results``)."""
    columns = [
        "method", "cell_id", "subjects_prepared", "subjects_planned", "prepare_device", "prepare_seconds_per_subject",
        "prepare_seconds_total", "prepare_peak_mb", "prepare_peak_kind", "state_mb_per_subject",
        "generate_device", "images_done", "images_planned", "seconds_per_image", "generate_peak_mb", "generate_peak_kind",
        "device_hours", "pretrain_seconds", "pretrain_steps", "pretrain_images", "pretrain_device",
    ]
    if run.plan.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for cell_id, planned in run.plan.groupby("cell_id", sort=False):
        states = run.states[run.states["cell_id"] == cell_id] if not run.states.empty else pd.DataFrame()
        done_states = states[states["done"]] if not states.empty else states
        images = run.images[run.images["cell_id"] == cell_id]
        prepare_peak, prepare_kind = _peak(done_states, "prepare_peak_cuda_mb", "prepare_peak_rss_mb")
        generate_peak, generate_kind = _peak(images, "peak_cuda_mb", "peak_rss_mb")
        has_states = not done_states.empty
        prepare_total = float(done_states["prepare_seconds"].sum()) if has_states else np.nan
        generate_total = float(images["seconds_per_image"].sum()) if not images.empty else 0.0
        rows.append(
            {
                "method": planned["label"].iloc[0],
                "cell_id": cell_id,
                "subjects_prepared": len(done_states),
                "subjects_planned": planned["subject"].nunique(),
                "prepare_device": _device_class(done_states["prepare_device"]) if has_states else "?",
                "prepare_seconds_per_subject": float(done_states["prepare_seconds"].mean()) if has_states else np.nan,
                "prepare_seconds_total": prepare_total,
                "prepare_peak_mb": prepare_peak,
                "prepare_peak_kind": prepare_kind,
                "state_mb_per_subject": float(done_states["state_bytes"].mean()) / 2**20 if has_states else np.nan,
                "generate_device": _device_class(images["device"]) if not images.empty else "?",
                "images_done": len(images),
                "images_planned": len(planned),
                "seconds_per_image": float(images["seconds_per_image"].mean()) if not images.empty else np.nan,
                "generate_peak_mb": generate_peak,
                "generate_peak_kind": generate_kind,
                "device_hours": ((prepare_total if has_states else 0.0) + generate_total) / 3600,
                **_pretraining(done_states),
            }
        )
    return pd.DataFrame(rows, columns=columns)
