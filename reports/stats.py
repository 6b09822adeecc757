"""Confidence intervals for benchmark means: a seeded hierarchical bootstrap (subjects, then prompts).

Why hierarchical: images of one subject (and of one prompt) are not independent draws — a
method that fails on one subject fails on all 100 of its images. Resampling images as if they
were independent gives intervals that are far too narrow. The protocol's sampling units are
subjects (30) and, within a subject, prompts (25); the images of one prompt (k = 0..3) stay
together.

One bootstrap replicate:
  1. draw S subjects with replacement from the S subjects that have values;
  2. for each drawn subject, draw P_s prompts with replacement from its P_s prompts;
  3. take every image of every drawn prompt, and compute the image-weighted mean.
The point estimate is the plain mean over all images (the published convention: the mean
over the protocol's 3000 images). The interval is the percentile interval of the replicate
means (default 95 %: the 2.5th and 97.5th percentiles of 2000 replicates). The RNG is
``numpy.random.default_rng(seed)``, so a report rebuilt from the same store gives the same
intervals. NaN values (a metric that has no value for an image, e.g. DIV for an image alone in
its group) are dropped before resampling, never counted as 0.

Paired comparisons bootstrap the per-image differences (current − baseline) of matched images
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval; NaN everywhere when there was nothing to estimate."""

    mean: float
    low: float
    high: float
    n_subjects: int
    n_images: int

    @property
    def empty(self) -> bool:
        return self.n_images == 0


EMPTY = Estimate(float("nan"), float("nan"), float("nan"), 0, 0)


def _cells(values: np.ndarray, subjects: np.ndarray, prompts: np.ndarray):
    """Sums and counts per (subject, prompt), padded to the largest prompt count."""
    subject_codes, subject_index = np.unique(subjects, return_inverse=True)
    n_subjects = len(subject_codes)
    pair_codes, pair_index = np.unique(
        np.stack([subject_index, np.unique(prompts, return_inverse=True)[1]]), axis=1, return_inverse=True
    )
    pair_index = pair_index.reshape(-1)
    pair_subject = pair_codes[0]
    prompt_counts = np.bincount(pair_subject, minlength=n_subjects)
    # Position of each (subject, prompt) pair among its subject's prompts.
    first_of_subject = np.concatenate([[0], np.cumsum(prompt_counts)[:-1]])
    slot = np.arange(pair_codes.shape[1]) - first_of_subject[pair_subject]
    sums = np.zeros((n_subjects, prompt_counts.max()))
    counts = np.zeros_like(sums)
    np.add.at(sums, (pair_subject, slot), np.bincount(pair_index, weights=values))
    np.add.at(counts, (pair_subject, slot), np.bincount(pair_index))
    return sums, counts, prompt_counts


def bootstrap_means(
    values: ArrayLike,
    subjects: ArrayLike,
    prompts: ArrayLike,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """The ``resamples`` replicate means of the hierarchical bootstrap (module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    subjects = np.asarray(subjects)
    prompts = np.asarray(prompts)
    if not (len(values) == len(subjects) == len(prompts)):
        raise ValueError(
            f"bootstrap: values, subjects and prompts must have one entry per image "
            f"(got {len(values)}, {len(subjects)}, {len(prompts)})"
        )
    keep = ~np.isnan(values)
    values, subjects, prompts = values[keep], subjects[keep], prompts[keep]
    if len(values) == 0:
        return np.full(resamples, np.nan)
    sums, counts, prompt_counts = _cells(values, subjects.astype(str), prompts.astype(str))
    n_subjects, max_prompts = sums.shape
    rng = np.random.default_rng(seed)
    drawn_subjects = rng.integers(0, n_subjects, size=(resamples, n_subjects))
    drawn_counts = prompt_counts[drawn_subjects][..., None]  # (B, S, 1)
    drawn_prompts = np.floor(rng.random((resamples, n_subjects, max_prompts)) * drawn_counts).astype(np.int64)
    # A subject with fewer prompts than the widest one draws only as many as it has.
    used = np.arange(max_prompts)[None, None, :] < drawn_counts
    rows = np.broadcast_to(drawn_subjects[..., None], drawn_prompts.shape)
    total = np.where(used, sums[rows, drawn_prompts], 0.0).sum(axis=(1, 2))
    count = np.where(used, counts[rows, drawn_prompts], 0.0).sum(axis=(1, 2))
    return total / count


def hierarchical_bootstrap(
    values: ArrayLike,
    subjects: ArrayLike,
    prompts: ArrayLike,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Estimate:
    """Mean of ``values`` with a percentile interval from :func:`bootstrap_means`.

    ``subjects`` and ``prompts`` label each value's subject and prompt (any hashable labels;
    prompts are nested in subjects, so the same prompt text under two subjects is two prompts).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    if not keep.any():
        return EMPTY
    replicates = bootstrap_means(values, subjects, prompts, resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return Estimate(
        mean=float(values[keep].mean()),
        low=float(low),
        high=float(high),
        n_subjects=int(len(np.unique(np.asarray(subjects)[keep].astype(str)))),
        n_images=int(keep.sum()),
    )
