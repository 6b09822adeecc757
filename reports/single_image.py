"""The single-image track's table: each method's one-image rows beside its all-images row.

For every method entry trained on one photo per subject (``protocol.single_image`` = an index)
and the same entry trained on all photos (``all``) in the same run, per metric: both means, the
drop (one-image − all-images) and its confidence interval. The drop is *paired*: images are
matched by (subject, prompt, k) — the seed rule gives both tracks the same seeds — and the
hierarchical bootstrap (subjects, then prompts; ``reports.stats``) runs over the per-image
differences of the subjects where both exist. Note the two tracks score against different
reference sets (all photos vs the held-out ones): the DINO / CLIP-I drop includes that change
of yardstick, which is the point of the track — the all-images row is scored against photos
its method trained on.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from reports.render import Cell, estimate, html_table, markdown_table, number, text
from reports.schema import metric_direction, metric_label, ordered_metrics
from reports.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    hierarchical_bootstrap,
)

ALL = "all"
GRID_NAME = "train_image"
COLUMNS = ["method", "base_cell", "checkpoint", "train_image", "metric", "all_images_mean", "one_image_mean",
           "drop", "ci_low", "ci_high", "pairs", "subjects", "higher_is_better"]
PAIR_KEYS = ["method", "base_cell", "checkpoint", "subject", "template", "k", "metric"]


def _base_cell(method: str, grid: str) -> str:
    """The cell id without its single-image choice: what the two tracks of an entry share."""
    values = {k: v for k, v in (json.loads(grid) if isinstance(grid, str) and grid else {}).items() if k != GRID_NAME}
    return method + ("[" + ",".join(f"{k}={v}" for k, v in values.items()) + "]" if values else "")


def single_image_table(
    long: pd.DataFrame,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pd.DataFrame:
    """One row per (entry, one-image choice, metric); empty when the run has no such pair."""
    if long.empty or "train_image" not in long or set(long["train_image"].astype(str)) <= {ALL}:
        return pd.DataFrame(columns=COLUMNS)
    frame = long.assign(
        train_image=long["train_image"].astype(str),
        base_cell=[_base_cell(m, g) for m, g in zip(long["method"], long["grid"])],
    )
    baseline = frame[frame["train_image"] == ALL][[*PAIR_KEYS, "value"]]
    rows = []
    for (method, base, checkpoint, choice, metric), one in frame[frame["train_image"] != ALL].groupby(
        ["method", "base_cell", "checkpoint", "train_image", "metric"], sort=False
    ):
        paired = one[[*PAIR_KEYS, "value"]].merge(baseline, on=PAIR_KEYS, suffixes=("_one", "_all"))
        higher = metric_direction(metric)
        row = {"method": method, "base_cell": base, "checkpoint": checkpoint, "train_image": choice, "metric": metric,
               "one_image_mean": float(np.nanmean(one["value"])) if one["value"].notna().any() else np.nan,
               "all_images_mean": np.nan, "drop": np.nan, "ci_low": np.nan, "ci_high": np.nan,
               "pairs": len(paired), "subjects": int(paired["subject"].nunique()), "higher_is_better": higher}
        if not paired.empty:
            difference = (paired["value_one"] - paired["value_all"]).to_numpy(float)
            estimate = hierarchical_bootstrap(
                difference, paired["subject"].to_numpy(), paired["template"].to_numpy(), resamples, seed, confidence
            )
            all_values = paired["value_all"].to_numpy(float)
            row.update(all_images_mean=float(np.nanmean(all_values)) if (~np.isnan(all_values)).any() else np.nan,
                       drop=estimate.mean, ci_low=estimate.low, ci_high=estimate.high)
            if estimate.n_subjects < 2:  # no between-subject spread from one subject
                row.update(ci_low=np.nan, ci_high=np.nan)
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    rank = {m: i for i, m in enumerate(ordered_metrics(table["metric"].unique()))}
    return table.assign(_m=table["metric"].map(rank)).sort_values(
        ["method", "base_cell", "checkpoint", "train_image", "_m"], kind="stable"
    ).drop(columns="_m").reset_index(drop=True)


HEADERS = ["method", "checkpoint", "training image", "metric", "all images", "one image", "drop [CI]", "pairs", "subjects"]


def explanation(confidence: float = DEFAULT_CONFIDENCE) -> str:
    return (
        f"Drop = one-image − all-images, paired per image (same subject, prompt, k and seed); {confidence:.0%} "
        "hierarchical-bootstrap CI over subjects, then prompts. One-image rows are scored against the subject's "
        "held-out photos only, all-images rows against every photo. Copy rate: share of images closer (DINO) to a "
        "training photo than the 95th percentile of the subject's real-vs-real nearest-photo cosines."
    )


def table_rows(table: pd.DataFrame) -> list[list[Cell]]:
    return [
        [text(row.base_cell), text(row.checkpoint), text(row.train_image), text(metric_label(row.metric)),
         number(row.all_images_mean), number(row.one_image_mean), estimate(row.drop, row.ci_low, row.ci_high),
         Cell(str(row.pairs)), Cell(str(row.subjects))]
        for row in table.itertuples(index=False)
    ]


def single_image_markdown(table: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE) -> str:
    return "## One image vs all images\n\n" + explanation(confidence) + "\n\n" + markdown_table(HEADERS, table_rows(table))


def single_image_html(table: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE) -> str:
    return f"<h1>One image vs all images</h1><p class='note'>{explanation(confidence)}</p>" + html_table(HEADERS, table_rows(table))
