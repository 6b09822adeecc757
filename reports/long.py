"""The long results format: one row per (image, metric), built from a run directory alone.

Saved as ``RUN_DIR/report/results.parquet``; load it with one call::

    import pandas as pd
    results = pd.read_parquet("RUN_DIR/report/results.parquet")

or, rebuilding it from the store, ``reports.load_results(RUN_DIR)``. The columns are listed with
their meaning in ``reports.schema.COLUMNS`` (and in the report's index page). Only images of the
run's latest plan that are finished and scored appear: a missing score is an absent row, never
a 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.hashing import stable_hash
from benchmark.results import current_fingerprints, load_plan, load_records, load_scores
from benchmark.store import Store
from reports.schema import clip_t_scales, metric_direction

REPORT_DIR = "report"
RESULTS_FILE = "results.parquet"

# Manifest fields carried into the long format (renamed where the plan already uses the name).
RECORD_FIELDS = {
    "backbone": "backbone",
    "backbone_random": "backbone_random",
    "dtype": "dtype",
    "device": "device",
    "seconds": "seconds_per_image",
    "peak_rss_mb": "peak_rss_mb",
    "peak_cuda_mb": "peak_cuda_mb",
    "git": "git",
}


def entry_names(frame: pd.DataFrame) -> pd.Series:
    """'cell_id' or 'cell_id @ checkpoint' (only cells with several checkpoints get the suffix)."""
    if frame.empty:
        return pd.Series([], dtype=object, index=frame.index)
    sweeps = frame.groupby("cell_id")["checkpoint"].transform("nunique") > 1
    return pd.Series(
        [f"{c} @ {k}" if s else c for c, k, s in zip(frame["cell_id"], frame["checkpoint"], sweeps)],
        index=frame.index,
    )


def _grid_columns(grids: pd.Series) -> pd.DataFrame:
    """One column per grid parameter; numbers stay numbers, anything else becomes text."""
    parsed = [json.loads(g) if isinstance(g, str) and g else {} for g in grids]
    names = sorted({name for grid in parsed for name in grid})
    columns = {}
    for name in names:
        values = [grid.get(name) for grid in parsed]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            columns[f"grid_{name}"] = pd.array(values, dtype="boolean")
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            columns[f"grid_{name}"] = np.array([np.nan if v is None else float(v) for v in values])
        else:
            columns[f"grid_{name}"] = pd.array(
                [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values], dtype="string"
            )
    return pd.DataFrame(columns, index=grids.index)


def finished_images(store: Store, plan: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """The plan's finished images (one row each) with their manifest fields and entry names."""
    # Entry names come from the whole plan, so a sweep keeps its '@ checkpoint' names while some
    # of its checkpoints are still missing.
    plan = plan.assign(entry=entry_names(plan))
    done = plan[store.done_mask(plan)] if not plan.empty else plan
    done = done.rename(columns={"label": "method", "method": "method_name", "prompt_text": "prompt"})
    wanted = ["key", *[f for f in RECORD_FIELDS if f in records.columns]]
    if not records.empty:
        extra = records[wanted].drop_duplicates("key").rename(columns=RECORD_FIELDS)
        if "fingerprint_json" in records.columns:
            hashes = records.drop_duplicates("key").set_index("key")["fingerprint_json"]
            extra["method_fingerprint"] = [
                stable_hash(json.loads(hashes[k])) if isinstance(hashes.get(k), str) else None for k in extra["key"]
            ]
        done = done.merge(extra, on="key", how="left")
    for column in RECORD_FIELDS.values():
        if column not in done.columns:
            done[column] = np.nan
    if "method_fingerprint" not in done.columns:
        done["method_fingerprint"] = None
    done = done.reset_index(drop=True)
    done["image"] = [
        str(store.image_path(m, s, k).relative_to(store.root)) for m, s, k in zip(done["method"], done["subject"], done["key"])
    ]
    return pd.concat([done, _grid_columns(done["grid"])], axis=1)


def results_frame(store: Store, plan: pd.DataFrame | None = None, records: pd.DataFrame | None = None) -> pd.DataFrame:
    """The long format of ``store`` (see the module docstring)."""
    plan = load_plan(store) if plan is None else plan
    records = load_records(store) if records is None else records
    images = finished_images(store, plan, records)
    scores = load_scores(store, plan)
    fingerprints = current_fingerprints(store)
    long = images.merge(scores, on="key", how="inner")
    weights = {m: (info.get("fingerprint") or {}).get("weights") for m, info in fingerprints.items()}
    directions = {m: metric_direction(m, (info.get("fingerprint") or {})) for m, info in fingerprints.items()}
    long["metric_weights"] = pd.array([weights.get(m) for m in long["metric"]], dtype="string")
    long["higher_is_better"] = pd.array([directions.get(m) for m in long["metric"]], dtype="boolean")
    backbone_random = long["backbone_random"].astype("boolean").fillna(False)
    long["smoke"] = (backbone_random | (long["metric_weights"] == "random").fillna(False)).astype(bool)
    is_clip_t = (long["metric"] == "clip_t").to_numpy()
    for column, values in clip_t_scales(long["value"].to_numpy(dtype=np.float64)).items():
        long[column] = np.where(is_clip_t, values, np.nan)
    long["value"] = long["value"].astype(np.float64)
    first = ["method", "cell_id", "entry", "checkpoint", "subject", "kind", "category", "prompt", "k", "seed", "metric", "value"]
    return long[first + [c for c in long.columns if c not in first]].reset_index(drop=True)


def results_path(run_dir: str | Path) -> Path:
    return Store(run_dir).root / REPORT_DIR / RESULTS_FILE


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """The long results of ``run_dir``, rebuilt from its store (same as report/results.parquet)."""
    from reports.rundata import check_run_dir

    return results_frame(check_run_dir(run_dir))
