"""Metric names -> classes, imported lazily (listing metrics loads no network weights)."""

from __future__ import annotations

import importlib

from data.common import did_you_mean

BUILTIN_METRICS: dict[str, str] = {
    "clip_t": "metrics.clip:ClipT",
    "clip_i": "metrics.clip:ClipI",
    "dino": "metrics.dino:Dino",
    "div": "metrics.lpips_metrics:Div",
    "pres": "metrics.dino:Pres",
    "copy_nn": "metrics.copying:CopyNearest",
    "copy_real": "metrics.copying:CopyReal",
    "copy": "metrics.copying:CopyRate",
    "lpips_scene": "metrics.scene:LpipsScene",
    # Convention variants (issue 15): other models, inputs and texts papers use; see
    # metrics.conventions.VARIANTS and the README's conventions table.
    "dino_s16_squash": "metrics.dino:DinoS16Squash",
    "dino_s8_crop": "metrics.dino:DinoS8Crop",
    "dino_s8_squash": "metrics.dino:DinoS8Squash",
    "dinov2_s14_crop": "metrics.dino:Dinov2S14Crop",
    "dinov2_s14_squash": "metrics.dino:Dinov2S14Squash",
    "clip_i_b32": "metrics.clip:ClipIB32",
    "clip_i_l14": "metrics.clip:ClipIL14",
    "clip_t_identifier": "metrics.clip:ClipTIdentifier",
    "clip_t_clipscore": "metrics.clip:ClipTClipScore",
    "vlm_judge_cp": "metrics.vlm_judge:VlmJudgeConcept",
    "vlm_judge_pf": "metrics.vlm_judge:VlmJudgePrompt",
}
# A name in a config that stands for several metrics (in this order).
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "vlm_judge": ("vlm_judge_cp", "vlm_judge_pf"),
}


def available_metrics() -> dict[str, str]:
    return dict(BUILTIN_METRICS)


def expand_metric_names(names) -> tuple[str, ...]:
    """``names`` with each group name replaced by its metrics, duplicates dropped, order kept."""
    expanded = [member for name in names for member in METRIC_GROUPS.get(name, (name,))]
    return tuple(dict.fromkeys(expanded))


def get_metric_class(name: str) -> type:
    registry = available_metrics()
    if name not in registry:
        raise KeyError(f"unknown metric {name!r}{did_you_mean(name, registry)}; valid: {', '.join(registry)}")
    module_name, _, class_name = registry[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_metric(name: str, settings):
    """An instance of metric ``name`` built with ``settings`` (a metrics.base.MetricSettings)."""
    return get_metric_class(name)(settings)
