"""Rank confidence (reports.ranking): a paired hierarchical bootstrap over subjects, then prompts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports.ranking import rank_confidence, rank_confidence_markdown


def _long(values_by_entry: dict[str, np.ndarray], metric: str = "dino") -> pd.DataFrame:
    """values_by_entry: (subjects, prompts, images) arrays, one per entry."""
    rows = []
    for entry, values in values_by_entry.items():
        for (s, p, k), value in np.ndenumerate(values):
            rows.append({"entry": entry, "subject": f"s{s}", "template": f"p{p}", "k": k, "metric": metric, "value": value})
    return pd.DataFrame(rows)


@pytest.fixture
def base():
    rng = np.random.default_rng(1)
    subject_effect = rng.normal(0, 0.1, (10, 1, 1))  # large between-subject spread
    return 0.6 + subject_effect + rng.normal(0, 0.05, (10, 5, 4))


def test_identical_methods_are_50_50_and_a_dominated_one_never_wins(base):
    result = rank_confidence(_long({"a": base, "twin": base.copy(), "worse": base - 0.2}), "dino", resamples=400)
    index = {e: i for i, e in enumerate(result.entries)}
    a, twin, worse = index["a"], index["twin"], index["worse"]
    assert result.entries[2] == "worse"
    assert result.rank_probabilities[a, :2] == pytest.approx([0.5, 0.5])
    assert result.rank_probabilities[twin, :2] == pytest.approx([0.5, 0.5])
    assert result.beats[a, twin] == pytest.approx(0.5) and result.beats[twin, a] == pytest.approx(0.5)
    assert result.rank_probabilities[worse].tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert result.beats[worse, a] == 0.0 and result.beats[a, worse] == 1.0
    assert result.tied_with(a) == ["twin"] and result.tied_with(worse) == []
    assert result.rank_probabilities.sum(axis=1) == pytest.approx(np.ones(3))  # each entry: one rank per replicate
    assert result.rank_probabilities.sum(axis=0) == pytest.approx(np.ones(3))  # each rank: one entry per replicate
    table = result.rank_table().set_index("entry")
    assert table.loc["twin", "tied_with"] == "a" and table.loc["worse", "p_rank_3"] == pytest.approx(1.0)
    assert (table.loc["worse", "rank_low"], table.loc["worse", "rank_high"]) == (3, 3)
    beats = result.beats_table().set_index("entry")
    assert beats.loc["a", "worse"] == 1.0 and np.isnan(beats.loc["a", "a"])
    markdown = rank_confidence_markdown(result, "DINO")
    assert "## Rank confidence" in markdown and "| worse | 0.4" in markdown


def test_the_bootstrap_is_paired(base):
    """A small but consistent gain on every image is certain when subjects are drawn once for both
    entries, although the between-subject spread dwarfs it (unpaired, the intervals overlap)."""
    result = rank_confidence(_long({"a": base, "a_plus": base + 0.01}), "dino", resamples=400)
    assert result.entries == ["a_plus", "a"]
    assert result.beats[0, 1] == 1.0 and result.rank_probabilities[0, 0] == 1.0
    assert result.tied_with(0) == []


def test_close_methods_are_marked_as_not_separable(base):
    rng = np.random.default_rng(2)
    noisy = base + rng.normal(0, 0.05, base.shape)  # same mean, independent image noise
    result = rank_confidence(_long({"a": base, "b": noisy}), "dino", resamples=400)
    assert 0.025 < result.beats[0, 1] < 0.975 and result.tied_with(0) == [result.entries[1]]
    assert (result.rank_low[0], result.rank_high[0]) == (1, 2)


def test_lower_is_better_metrics_rank_the_smallest_first(base):
    result = rank_confidence(_long({"high": base, "low": base - 0.2}, "pres"), "pres", higher_is_better=False, resamples=200)
    assert result.entries == ["low", "high"] and result.rank_probabilities[0, 0] == 1.0


def test_seeded_missing_values_and_too_few_entries(base):
    long = _long({"a": base, "b": base - 0.01})
    first = rank_confidence(long, "dino", resamples=200, seed=3)
    assert np.array_equal(first.beats, rank_confidence(long, "dino", resamples=200, seed=3).beats, equal_nan=True)
    gaps = long.copy()
    gaps.loc[(gaps["entry"] == "b") & (gaps["subject"] == "s0"), "value"] = np.nan  # dropped, never 0
    assert rank_confidence(gaps, "dino", resamples=200).entries == ["a", "b"]
    assert rank_confidence(long[long["entry"] == "a"], "dino") is None
    assert rank_confidence(long, "clip_t") is None
    with pytest.raises(ValueError, match="confidence must be in"):
        rank_confidence(long, "dino", confidence=1.5)
