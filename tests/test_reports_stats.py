"""Report statistics and plot geometry: the hierarchical bootstrap against an independent
loop-based reference, pareto frontiers, and non-overlapping plot labels."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from reports.pareto import frontier_path, label_boxes, pareto_figure, pareto_mask, place_labels
from reports.stats import bootstrap_means, hierarchical_bootstrap


def synthetic(seed: int = 1):
    """Subjects with strong effects, prompts nested in subjects (unequal counts), noisy images."""
    rng = np.random.default_rng(seed)
    values, subjects, prompts = [], [], []
    for s in range(8):
        subject_effect = rng.normal(0, 0.10)
        for p in range(3 + s % 3):  # 3..5 prompts per subject
            prompt_effect = rng.normal(0, 0.05)
            for _ in range(1 + (s + p) % 3):  # 1..3 images per prompt
                values.append(0.6 + subject_effect + prompt_effect + rng.normal(0, 0.02))
                subjects.append(f"subject-{s}")
                prompts.append(f"prompt {p}")  # the same text under every subject: still nested
    return np.array(values), np.array(subjects), np.array(prompts)


def reference_interval(values, subjects, prompts, resamples, seed, confidence=0.95):
    """Written from the definition, with loops: subjects with replacement, then each drawn
    subject's prompts with replacement, all images of a drawn prompt, image-weighted mean."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for value, subject, prompt in zip(values, subjects, prompts):
        tree.setdefault(subject, {}).setdefault(prompt, []).append(value)
    names = sorted(tree)
    means = []
    for _ in range(resamples):
        pool = []
        for subject in rng.choice(names, size=len(names), replace=True):
            prompt_names = sorted(tree[subject])
            for index in rng.integers(0, len(prompt_names), size=len(prompt_names)):
                pool.extend(tree[subject][prompt_names[index]])
        means.append(np.mean(pool))
    alpha = (1 - confidence) / 2
    return np.quantile(means, [alpha, 1 - alpha])


def test_interval_matches_independent_reference_bootstrap():
    values, subjects, prompts = synthetic()
    ours = hierarchical_bootstrap(values, subjects, prompts, resamples=4000, seed=11)
    low, high = reference_interval(values, subjects, prompts, resamples=4000, seed=12)
    width = high - low
    # Two independent Monte Carlo runs of 4000 replicates: endpoints agree to a few % of the width.
    assert abs(ours.low - low) < 0.08 * width
    assert abs(ours.high - high) < 0.08 * width
    assert ours.mean == pytest.approx(values.mean())
    assert (ours.n_subjects, ours.n_images) == (8, len(values))
    # The check can fail: an image-level bootstrap (ignoring the hierarchy) is far narrower.
    rng = np.random.default_rng(3)
    flat = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(4000)]
    flat_low, flat_high = np.quantile(flat, [0.025, 0.975])
    assert flat_high - flat_low < 0.6 * width
    assert abs(flat_low - low) > 0.08 * width


def test_bootstrap_is_seeded_and_ignores_nan():
    values, subjects, prompts = synthetic()
    a = hierarchical_bootstrap(values, subjects, prompts, resamples=500, seed=5)
    assert a == hierarchical_bootstrap(values, subjects, prompts, resamples=500, seed=5)
    assert a != hierarchical_bootstrap(values, subjects, prompts, resamples=500, seed=6)
    with_nan = np.append(values, np.nan)
    b = hierarchical_bootstrap(with_nan, np.append(subjects, "subject-0"), np.append(prompts, "prompt 0"), resamples=500, seed=5)
    assert b == a  # a NaN is no value, never a 0
    empty = hierarchical_bootstrap([np.nan, np.nan], ["a", "b"], ["p", "p"])
    assert empty.empty and np.isnan(empty.mean)


def test_bootstrap_degenerate_cases():
    # One prompt per subject: only subjects vary, so the replicates are means of subject draws.
    replicates = bootstrap_means([1.0, 3.0], ["a", "b"], ["p", "p"], resamples=2000, seed=0)
    assert set(np.round(replicates, 9)) <= {1.0, 2.0, 3.0}
    assert abs(np.mean(replicates == 2.0) - 0.5) < 0.05
    constant = hierarchical_bootstrap([0.4] * 12, list("aaabbbcccddd"), list("xyzxyzxyzxyz"))
    assert constant.low == constant.high == pytest.approx(0.4)
    with pytest.raises(ValueError, match="one entry per image"):
        bootstrap_means([1.0, 2.0], ["a"], ["p", "q"])


def test_pareto_mask_and_frontier_path():
    x = np.array([0.1, 0.2, 0.3, 0.15, 0.3])
    y = np.array([0.9, 0.8, 0.5, 0.7, 0.4])
    assert list(pareto_mask(x, y)) == [True, True, True, False, False]
    # Lower-is-better on y flips which points are efficient.
    assert list(pareto_mask(x, y, y_higher=False)) == [False, False, False, False, True]
    px, py = frontier_path(x[:3], y[:3])
    assert list(zip(px, py)) == [(0.1, 0.9), (0.1, 0.8), (0.2, 0.8), (0.2, 0.5), (0.3, 0.5)]


def _no_overlaps(boxes) -> bool:
    return all(
        min(a.x1, b.x1) - max(a.x0, b.x0) <= 0 or min(a.y1, b.y1) - max(a.y0, b.y0) <= 0
        for a, b in itertools.combinations(boxes, 2)
    )


def test_labels_do_not_overlap_in_a_crowded_plot():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    rng = np.random.default_rng(0)
    xs, ys = 0.25 + rng.normal(0, 0.004, 24), 0.6 + rng.normal(0, 0.004, 24)  # 24 points in a clump
    ax.scatter(xs, ys)
    ax.set_xlim(0.2, 0.3)
    ax.set_ylim(0.55, 0.65)
    annotations = place_labels(ax, xs, ys, [f"dreambooth[lr={i}e-06] @ step-{100 * i}" for i in range(24)])
    figure.draw_without_rendering()
    boxes = label_boxes(annotations)
    assert len(boxes) == 24 and _no_overlaps(boxes)


def test_pareto_figure_of_a_crowded_sweep_has_separate_labels(tmp_path):
    rows = []
    for cell in range(4):
        for step in range(5):
            x, y = 0.20 + 0.004 * step + 0.001 * cell, 0.70 - 0.005 * step + 0.002 * cell
            rows.append({"entry": f"db[lr={cell}] @ step-{step}", "cell_id": f"db[lr={cell}]", "checkpoint": f"step-{step}",
                         "checkpoint_index": step, "x": x, "y": y, "x_low": x - 0.003, "x_high": x + 0.003,
                         "y_low": y - 0.004, "y_high": y + 0.004})
    figure = pareto_figure(pd.DataFrame(rows), "dino", "clip_t", smoke=False)
    labels = [t for t in figure.axes[0].texts if t.get_text()]
    assert {t.get_text() for t in labels} >= {f"step-{s}" for s in range(5)}
    assert any("published" in t.get_text() for t in labels)  # anchors shown for a non-smoke run
    figure.draw_without_rendering()
    assert _no_overlaps(label_boxes(labels))
    assert figure.axes[0].get_xlabel().startswith("CLIP-T (cosine similarity")
