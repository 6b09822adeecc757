"""Validation of what metrics are given: every bad input fails here, naming the argument.

Metrics take float images in [0, 1]; a uint8 tensor, an image in [-1, 1] or a NaN would
otherwise give a plausible-looking wrong number (torchmetrics' most reported LPIPS confusion),
so they are refused with a message that says what was expected.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch

from metrics.base import MetricInputError, ScoringInputs


def check_image_tensor(value: object, name: str, batched: bool = True) -> torch.Tensor:
    """A float tensor of RGB images in [0, 1]: N×3×H×W (``batched``) or 3×H×W."""
    shape_text = "N×3×H×W" if batched else "3×H×W"
    if not isinstance(value, torch.Tensor):
        raise MetricInputError(f"{name}: expected a torch.Tensor {shape_text}, got {type(value).__name__}")
    if not value.is_floating_point():
        hint = " (divide a uint8 image by 255)" if value.dtype == torch.uint8 else ""
        raise MetricInputError(
            f"{name}: expected a floating tensor with values in [0, 1], got dtype {value.dtype}{hint}"
        )
    if value.ndim != (4 if batched else 3):
        raise MetricInputError(
            f"{name}: expected shape {shape_text}, got {tuple(value.shape)} ({value.ndim} dimensions)"
        )
    channels = value.shape[-3]
    if channels != 3:
        raise MetricInputError(
            f"{name}: expected 3 (RGB) channels in dimension {-3 + value.ndim}, got {channels} "
            f"(shape {tuple(value.shape)}); convert grey or RGBA images to RGB"
        )
    if value.shape[-1] < 1 or value.shape[-2] < 1:
        raise MetricInputError(f"{name}: image has zero size (shape {tuple(value.shape)})")
    if value.numel() == 0 or _checked_before(value):
        return value
    # One pass over the pixels (3000 images at 512 px are 9 GB of float32): NaN propagates
    # through min/max, and an infinity is the min or the max.
    low, high = (float(v) for v in torch.aminmax(value.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(value)).sum())
        raise MetricInputError(f"{name}: contains {bad} NaN or infinite value(s); expected finite values in [0, 1]")
    if low < 0.0 or high > 1.0:
        hint = " (images in [-1, 1] must be mapped with (x + 1) / 2)" if low < 0.0 else ""
        hint = hint or (" (images in [0, 255] must be divided by 255)" if high > 1.0 else "")
        raise MetricInputError(f"{name}: values must lie in [0, 1], got [{low:.4g}, {high:.4g}]{hint}")
    _remember_checked(value)
    return value


# Tensors whose values passed the check above, by id, with their version counter then: every
# metric of a subject batch is handed the same image batch and reference photos, and the value
# check (a pass over the pixels; on a GPU it also waits for every queued kernel) ran once per
# metric. A tensor changed in place since (its version counter moved) or gone (the weak
# reference died, or another tensor reuses its id) is checked again.
_CHECKED: dict[int, tuple[weakref.ref, int]] = {}


def _version(value: torch.Tensor) -> int | None:
    try:
        return value._version
    except RuntimeError:  # inference tensors have no version counter: always checked
        return None


def _checked_before(value: torch.Tensor) -> bool:
    entry = _CHECKED.get(id(value))
    if entry is None or entry[0]() is not value:
        return False
    version = _version(value)
    return version is not None and version == entry[1]


def _remember_checked(value: torch.Tensor) -> None:
    version = _version(value)
    if version is None:
        return
    key = id(value)
    _CHECKED[key] = (weakref.ref(value, lambda _, key=key: _CHECKED.pop(key, None)), version)


def check_lengths(values: Sequence, name: str, expected: int, what: str = "images") -> None:
    if len(values) != expected:
        raise MetricInputError(
            f"{name}: expected one entry per image ({expected} {what}), got {len(values)}"
        )


def check_inputs(
    inputs: ScoringInputs,
    *,
    texts: bool = False,
    prompt_texts: bool = False,
    references: bool = False,
    groups: bool = False,
) -> None:
    """Validate ``inputs`` for a metric that needs the named context fields."""
    if not isinstance(inputs, ScoringInputs):
        raise MetricInputError(f"inputs: expected a metrics.base.ScoringInputs, got {type(inputs).__name__}")
    check_image_tensor(inputs.images, "inputs.images")
    count = inputs.images.shape[0]
    check_lengths(inputs.image_keys, "inputs.image_keys", count)
    if len(set(inputs.image_keys)) != len(inputs.image_keys):
        seen, duplicates = set(), []
        for key in inputs.image_keys:
            if key in seen:
                duplicates.append(key)
            seen.add(key)
        raise MetricInputError(
            f"inputs.image_keys: keys must be unique (they index the embedding cache); duplicated: {duplicates[:3]}"
        )
    for wanted, field_name in ((texts, "texts"), (prompt_texts, "prompt_texts")):
        if not wanted:
            continue
        values = getattr(inputs, field_name)
        check_lengths(values, f"inputs.{field_name}", count, "images; mismatched prompt/image counts")
        for index, text in enumerate(values):
            if not isinstance(text, str):
                raise MetricInputError(f"inputs.{field_name}[{index}]: expected a string, got {type(text).__name__}")
    if references:
        if not inputs.references:
            raise MetricInputError(
                "inputs.references: empty reference set; CLIP-I, DINO and PRES compare against the "
                "subject's real images, pass at least one"
            )
        for index, reference in enumerate(inputs.references):
            check_image_tensor(reference, f"inputs.references[{index}]", batched=False)
        if not isinstance(inputs.reference_key, str) or not inputs.reference_key:
            raise MetricInputError(
                "inputs.reference_key: expected a non-empty string identifying the reference set "
                "(the subject's data_sha); it keys the reference-embedding cache"
            )
    if groups:
        check_lengths(inputs.groups, "inputs.groups", count, "images; a sibling group id per image")
