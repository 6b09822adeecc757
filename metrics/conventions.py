"""The metric conventions of published tables: which model, input, text and scale each uses.

``VARIANTS`` is the cross-walk (issue 15): one row per metric name of ours that computes a
published convention, saying what it computes and which papers use it. The README's
conventions table and the report's Conventions page are written from it.

Derived columns for reports: published tables mix raw cosine, 100·cos and CLIPScore.
The store holds raw cosines only. CLIP-T appears in the literature as raw cosine (DreamBooth:
.305), as 100·cos (torchmetrics ``CLIPScore``), and as CLIPScore = w·max(cos, 0) with w = 2.5
(Hessel et al., 2021); CLIP-I and DINO as raw cosine or 100·cos. These helpers derive the
other forms so that a report can print whichever a comparison needs, labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Convention:
    """One metric name of ours and the published convention it computes."""

    metric: str  # registry name
    label: str  # how reports name it
    family: str  # what it measures: "DINO", "CLIP-I" or "CLIP-T"
    model: str
    preprocessing: str
    text: str  # CLIP-T: what the image is compared to ("—" for image-image metrics)
    scale: str  # the stored value
    used_by: str  # the papers (and code) whose figures use it


_TIMM_CROP_248 = "shortest side 248, center crop 224 (timm crop_pct 0.9)"
_CROP_256 = "shortest side 256, center crop 224 (crop_pct 0.875)"
_SQUASH = "whole image squashed to 224×224"
_CLIP_CROP = "shortest side 224, center crop 224 (open_clip / CLIPProcessor)"
_NO_TEXT = "—"
_COSINE = "cosine, mean over the subject's references"

VARIANTS: tuple[Convention, ...] = (
    Convention("dino", "DINO", "DINO", "DINO ViT-S/16 (timm vit_small_patch16_224.dino)", _TIMM_CROP_248, _NO_TEXT, _COSINE,
               "DreamBooth (Ruiz et al. 2023, Table 1) and the papers that compare with its table (Custom Diffusion, "
               "HiFi Tuner); the paper does not state its preprocessing"),
    Convention("dino_s16_squash", "DINO S/16 squash", "DINO", "DINO ViT-S/16", _SQUASH, _NO_TEXT, _COSINE,
               "re-implementations that resize to 224×224 without cropping; none of the published rows here"),
    Convention("dino_s8_crop", "DINO S/8 crop", "DINO", "DINO ViT-S/8 (timm vit_small_patch8_224.dino)", _CROP_256, _NO_TEXT, _COSINE,
               "DreamBench++ (Peng et al. 2024; dino_score.py: torch.hub dino_vits8, Resize(256) + CenterCrop(224)), "
               "reported ×100"),
    Convention("dino_s8_squash", "DINO S/8 squash", "DINO", "DINO ViT-S/8", _SQUASH, _NO_TEXT, _COSINE,
               "none of the published rows here (shows the preprocessing effect on ViT-S/8)"),
    Convention("dinov2_s14_crop", "DINOv2 S/14 crop", "DINO", "DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2.lvd142m at 224 px)", _CROP_256,
               _NO_TEXT, _COSINE,
               "DreamBench++ (transformers Dinov2Model facebook/dinov2-small and its image processor), reported ×100"),
    Convention("dinov2_s14_squash", "DINOv2 S/14 squash", "DINO", "DINOv2 ViT-S/14", _SQUASH, _NO_TEXT, _COSINE,
               "none of the published rows here (shows the preprocessing effect on DINOv2)"),
    Convention("clip_i", "CLIP-I", "CLIP-I", "CLIP ViT-B/32 (OpenAI); ViT-L/14 with metrics.clip", _CLIP_CROP, _NO_TEXT, _COSINE,
               "DreamBooth, Custom Diffusion, HiFi Tuner (ViT-B/32 assumed: DreamBooth does not name it; Textual "
               "Inversion's and Custom Diffusion's code use ViT-B/32)"),
    Convention("clip_i_b32", "CLIP-I B/32", "CLIP-I", "CLIP ViT-B/32 (OpenAI), fixed", _CLIP_CROP, _NO_TEXT, _COSINE,
               "as clip_i at its default; DreamBench++ (openai/clip-vit-base-patch32), reported ×100"),
    Convention("clip_i_l14", "CLIP-I L/14", "CLIP-I", "CLIP ViT-L/14 (OpenAI), fixed", _CLIP_CROP, _NO_TEXT, _COSINE,
               "papers that switch CLIP-I to ViT-L/14; none of the published rows here"),
    Convention("clip_t", "CLIP-T", "CLIP-T", "CLIP ViT-B/32 (OpenAI); ViT-L/14 with metrics.clip", _CLIP_CROP,
               "the prompt without the identifier, class noun kept (\"a dog on the beach\")", "cosine",
               "DreamBooth, Custom Diffusion, HiFi Tuner; ×100 is torchmetrics' CLIPScore scale and DreamBench++'s "
               "(which scores the text stored beside each image); derived columns clip_t_x100 and clipscore = 2.5·max(cos, 0)"),
    Convention("clip_t_identifier", "CLIP-T with identifier", "CLIP-T", "as clip_t", _CLIP_CROP,
               "the prompt the method was given, identifier included (\"a sks dog on the beach\")", "cosine",
               "re-implementations that score the generation prompt as is; none of the published rows here"),
    Convention("clip_t_clipscore", "CLIPScore (Hessel)", "CLIP-T", "CLIP ViT-B/32 (OpenAI), fixed", _CLIP_CROP,
               "\"A photo depicts \" + the prompt without the identifier", "CLIPScore: 2.5·max(cos, 0) per image",
               "CLIPScore as defined by Hessel et al. 2021 (their clipscore.py)"),
)


def variant(metric: str) -> Convention | None:
    """The cross-walk row of ``metric`` (None for metrics that are no published convention)."""
    return next((row for row in VARIANTS if row.metric == metric), None)
