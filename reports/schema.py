"""What report columns and metrics mean: names, display labels, directions, derived CLIP-T scales.

One place for every label a reader sees, so that a table, a plot and the data dictionary never
disagree about what a column holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Leaderboard/table order; metrics the store has beyond these follow in name order.
METRIC_ORDER = ("dino", "clip_i", "clip_t", "div", "pres", "copy", "copy_nn", "copy_real", "lpips_scene")
METRIC_LABELS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "div": "DIV",
    "pres": "PRES",
    "copy": "copy rate",
    "copy_nn": "DINO to nearest training image",
    "copy_real": "real-vs-real DINO (LOO)",
    "lpips_scene": "LPIPS to scene",
    "vlm_judge_cp": "VLM judge CP (0-4)",
    "vlm_judge_pf": "VLM judge PF (0-4)",
    "clip_t_x100": "CLIP-T×100",
    "clipscore": "CLIPScore",
}
METRIC_MEANING = {
    "dino": "subject fidelity: DINO ViT-S/16 cosine to the real references (higher is better)",
    "clip_i": "subject fidelity: CLIP image cosine to the real references (higher is better)",
    "clip_t": "prompt fidelity: CLIP cosine to the prompt without the identifier (higher is better)",
    "div": "diversity: mean pairwise LPIPS among images of one prompt (higher = more diverse)",
    "pres": "prior collapse: DINO of class-prior images 'a {class}' to the subject (higher is worse)",
    "copy": "copy rate: share of images whose DINO cosine to the nearest training image exceeds the 95th "
            "percentile of the subject's real-vs-real leave-one-out cosines (lower = less copying)",
    "copy_nn": "DINO cosine of each image to its nearest training image (compare with copy_real)",
    "copy_real": "real-vs-real reference: mean DINO cosine of each real photo to its nearest other photo",
    "lpips_scene": "scene preservation: LPIPS of the image to its scene image (lower is better)",
    "vlm_judge_cp": "concept preservation rated 0-4 by a local VLM against the reference photos; "
                    "unparsable answers are missing, not scored (higher is better)",
    "vlm_judge_pf": "prompt following rated 0-4 by a local VLM against the prompt without the identifier; "
                    "unparsable answers are missing, not scored (higher is better)",
}
# Directions of the built-in metrics (DESIGN.md); a metric's fingerprint or class overrides.
KNOWN_DIRECTIONS = {"dino": True, "clip_i": True, "clip_t": True, "div": True, "pres": False, "copy": False,
                    "lpips_scene": False}

CLIPSCORE_WEIGHT = 2.5  # Hessel et al. (2021), CLIPScore = w * max(cos, 0)

# The unit a leaderboard row stands for: one method cell at one checkpoint.
ENTRY_COLUMNS = ("method", "cell_id", "checkpoint_index", "checkpoint")

COLUMNS: dict[str, str] = {
    "key": "image unit key (hash of everything that changes the image); the PNG is images/.../<key>.png",
    "prepare_key": "key of the trained state (states/<method>/<subject>/<prepare_key>/)",
    "method": "the suite entry's label (e.g. dreambooth, dreambooth_lora)",
    "method_name": "the registry name of the method adapter",
    "cell_id": "method label plus its grid point, e.g. dreambooth[lr=1e-05]",
    "entry": "what one leaderboard row is: cell_id, plus ' @ checkpoint' for checkpoint sweeps",
    "grid": "the cell's grid parameters as JSON ({} when the method has no grid)",
    "grid_<name>": "one column per grid parameter (NaN/None for methods without it)",
    "subject": "subject id",
    "class_noun": "the subject's class noun",
    "kind": "live (cats, dogs) or object",
    "data_sha": "hash of the subject's reference image bytes",
    "role": "eval (protocol prompts) or prior (class-prior images for PRES)",
    "prompt_index": "index of the prompt among the 25 of its kind (-1 for the prior prompt)",
    "category": "recontextualization / accessorization / property / prior",
    "template": "the prompt template ({0} = identifier, {1} = class noun)",
    "prompt": "the text the model was given",
    "eval_text": "the text CLIP-T compares to (identifier removed, class noun kept)",
    "checkpoint": "checkpoint name (final, or step-N of a sweep)",
    "checkpoint_index": "position of the checkpoint in the method's sweep (step order)",
    "k": "image index within the prompt (0..images_per_prompt-1)",
    "seed": "the image's seed (derived from protocol seed, subject, prompt, k)",
    "image": "path of the PNG relative to the run directory",
    "backbone": "diffusion backbone name (tiny, sd15-random: random init; sd14, sd15, ...: real)",
    "backbone_random": "True when the diffusion backbone is random-init (smoke numbers)",
    "method_fingerprint": "hash of the method's fingerprint (params, backbone, code version)",
    "dtype": "dtype images were generated in",
    "device": "device images were generated on",
    "seconds_per_image": "generation seconds per image (batch time / batch size)",
    "peak_rss_mb": "peak resident memory of the generating process, MB",
    "peak_cuda_mb": "peak CUDA memory during the image's batch, MB (NaN on CPU)",
    "git": "subjectbench commit that generated the image",
    "metric": "metric name: dino, clip_i, clip_t, div, pres",
    "value": "the stored metric value (CLIP-T, CLIP-I, DINO, PRES: raw cosine; DIV: LPIPS)",
    "metric_fingerprint": "hash of the metric's fingerprint (scores/<metric>/<hash>/fingerprint.json)",
    "metric_weights": "pretrained or random metric backbone weights (random: smoke numbers)",
    "higher_is_better": "direction of the metric (PRES: False, higher is worse)",
    "smoke": "True when the diffusion backbone or the metric weights are random: not a measurement",
    "clip_t_x100": "CLIP-T rows only: 100 × cosine (torchmetrics CLIPScore scale)",
    "clipscore": "CLIP-T rows only: 2.5 × max(cosine, 0) (Hessel et al. 2021 CLIPScore)",
}


def metric_label(metric: str) -> str:
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    from metrics.conventions import variant  # the convention variants name themselves

    row = variant(metric)
    return row.label if row else metric.upper()


def ordered_metrics(metrics: Iterable[str]) -> list[str]:
    present = set(metrics)
    return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def metric_direction(metric: str, fingerprint: dict | None = None) -> bool | None:
    """True if higher is better: from the fingerprint, the built-in table, or the metric class."""
    if fingerprint and isinstance(fingerprint.get("higher_is_better"), bool):
        return fingerprint["higher_is_better"]
    if metric in KNOWN_DIRECTIONS:
        return KNOWN_DIRECTIONS[metric]
    try:
        from metrics.registry import get_metric_class

        return bool(get_metric_class(metric).higher_is_better)
    except Exception:  # noqa: BLE001 - a metric we cannot import has no known direction
        return None


def clip_t_scales(cosine: np.ndarray) -> dict[str, np.ndarray]:
    """The published forms of a CLIP-T cosine: 100·cos and CLIPScore 2.5·max(cos, 0)."""
    cosine = np.asarray(cosine, dtype=np.float64)
    return {
        "clip_t_x100": 100.0 * cosine,
        "clipscore": CLIPSCORE_WEIGHT * np.where(np.isnan(cosine), np.nan, np.maximum(cosine, 0.0)),
    }
