"""Derived columns for reports: published tables mix raw cosine, 100·cos and CLIPScore.

The store holds raw cosines only. CLIP-T appears in the literature as raw cosine (DreamBooth:
.305), as 100·cos (torchmetrics ``CLIPScore``), and as CLIPScore = w·max(cos, 0) with w = 2.5
(Hessel et al., 2021); CLIP-I and DINO as raw cosine or 100·cos. These helpers derive the
other forms so that a report can print whichever a comparison needs, labelled.
"""

from __future__ import annotations

import numpy as np

CLIPSCORE_WEIGHT = 2.5
DERIVED = {
    "clip_t": ("x100", "clipscore"),
    "clip_i": ("x100",),
    "dino": ("x100",),
    "pres": ("x100",),
}


def times_100(cosine: np.ndarray | float) -> np.ndarray:
    """100·cos: the scale of torchmetrics' CLIPScore before its clamp at 0."""
    return 100.0 * np.asarray(cosine, dtype=np.float64)


def clipscore(cosine: np.ndarray | float, weight: float = CLIPSCORE_WEIGHT) -> np.ndarray:
    """CLIPScore of Hessel et al.: w·max(cos, 0), w = 2.5. NaN stays NaN."""
    cosine = np.asarray(cosine, dtype=np.float64)
    return weight * np.where(np.isnan(cosine), np.nan, np.maximum(cosine, 0.0))


def derived_columns(metric: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """{column suffix: values} derived from raw ``values`` of ``metric`` (empty if none apply)."""
    functions = {"x100": times_100, "clipscore": clipscore}
    return {suffix: functions[suffix](values) for suffix in DERIVED.get(metric, ())}


def add_derived_columns(frame, metric_column: str = "metric", value_column: str = "value"):
    """A copy of a long DataFrame with ``value_x100`` and ``value_clipscore`` (NaN where n/a)."""
    out = frame.copy()
    for suffix in ("x100", "clipscore"):
        out[f"{value_column}_{suffix}"] = np.nan
    for metric, rows in out.groupby(metric_column).groups.items():
        for suffix, derived in derived_columns(str(metric), out.loc[rows, value_column].to_numpy()).items():
            out.loc[rows, f"{value_column}_{suffix}"] = derived
    return out
