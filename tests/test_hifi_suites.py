"""The hifi_ablation and mask_noise suites: validity, shared trainings, and the ablation report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmark.config import load_config
from benchmark.units import expand, method_context
from reports.ablation import PUBLISHED_TABLE2, ablation_markdown, ablation_table, mask_noise_figure


def _plan(suite: str, overrides: list[str] | None = None):
    config = load_config(suite, overrides or [])
    return expand(config, method_context(config, "cpu", "float32"))


@pytest.mark.parametrize("suite", ["hifi_ablation", "hifi_ablation_tiny"])
def test_ablation_trains_once_per_subject_for_rows_that_differ_in_generation_only(suite):
    plan = _plan(suite, ["dataset.source=mini"])
    subjects = len(plan.subjects)
    labels_per_training = [sorted({unit.label for unit in group.images}) for group in plan.groups]
    for labels in labels_per_training:
        if "+reg" in labels:
            assert labels == ["+reference_guidance", "+reg", "+stepwise"]
        if "dreambooth_400" in labels:
            assert labels == ["dreambooth_400", "dreambooth_400+reference_guidance"]
    # ti_baseline, +output_embedding, +mask, the shared +reg training, the shared DreamBooth
    # training, and the reg_sweep points (+reg is the sweep's default 1e-3; 3 in the full suite, 2 tiny).
    sweep_only = 3 if suite == "hifi_ablation" else 2
    assert len(plan.groups) == subjects * (5 + sweep_only)


@pytest.mark.parametrize("suite", ["mask_noise", "mask_noise_tiny"])
def test_mask_noise_trains_one_cell_per_corruption(suite):
    plan = _plan(suite, ["dataset.source=mini"])
    corruptions = [cell.params.mask_corruption for cell in plan.cells]
    assert corruptions[0] == "" and {"bbox", "empty", "full"} <= set(corruptions)
    assert len(plan.groups) == len(corruptions) * len(plan.subjects)


def _long(entries: dict[str, float], subjects=("a", "b", "c"), prompts=4, k=2, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.normal(0.5, 0.05, size=(len(subjects), prompts, k))
    rows = []
    for entry, shift in entries.items():
        for s, subject in enumerate(subjects):
            for p in range(prompts):
                for kk in range(k):
                    for metric in ("dino", "clip_i", "clip_t"):
                        rows.append({"entry": entry, "subject": subject, "prompt_index": p, "k": kk, "role": "eval",
                                     "metric": metric, "value": base[s, p, kk] + shift})
    return pd.DataFrame(rows)


def test_ablation_table_paired_deltas_and_published_rows():
    long = _long({"ti_baseline": 0.0, "+output_embedding": 0.02, "+mask": 0.05, "dreambooth_400": 0.1,
                  "+reg": 0.06, "reg_sweep[reg_weight=0.01]": 0.04, "reg_sweep[reg_weight=0.0]": 0.05})
    table = ablation_table(long, resamples=200, reg_row_weight=1e-3)
    assert list(table["entry"]) == ["ti_baseline", "+output_embedding", "+mask", "+reg", "dreambooth_400",
                                    "reg_sweep[reg_weight=0.0]", "+reg", "reg_sweep[reg_weight=0.01]"]
    mask = table.set_index("entry").loc["+mask"]
    # Every image moved by exactly +0.03: the paired CI has no width, the unpaired ones do.
    assert mask["dino_delta"] == pytest.approx(0.03) and mask["dino_delta_high"] - mask["dino_delta_low"] < 1e-9
    assert mask["dino_high"] - mask["dino_low"] > 0.01
    assert mask["previous"] == "+output_embedding" and mask["dino_published"] == PUBLISHED_TABLE2["+mask"][0]
    assert np.isnan(table.set_index("entry").loc["+output_embedding", "dino_published"])
    assert pd.isna(table.set_index("entry").loc["dreambooth_400", "previous"])  # a chain of its own
    text = ablation_markdown(table, ["tiny backbone"], 0.95)
    assert "0.606 (published)" in text and "Smoke numbers" in text and "+0.030 [+0.030, +0.030]" in text


def test_mask_noise_figure_draws_one_curve_per_operator():
    rows = [{"operator": "clean", "level": 0.0, "iou": 1.0}, {"operator": "erode", "level": 2.0, "iou": 0.8},
            {"operator": "erode", "level": 4.0, "iou": 0.6}, {"operator": "bbox", "level": np.nan, "iou": 0.5}]
    frame = pd.DataFrame(rows)
    for metric in ("dino", "clip_i", "clip_t"):
        frame[metric] = [0.6, 0.55, 0.5, 0.52]
        frame[f"{metric}_low"] = frame[metric] - 0.01
        frame[f"{metric}_high"] = frame[metric] + 0.01
    figure = mask_noise_figure(frame, smoke=True, confidence=0.95)
    level_axis, iou_axis = figure.axes[0], figure.axes[3]
    assert [line.get_label() for line in level_axis.containers] == ["erode"]  # bbox has no level
    assert [c.get_label() for c in iou_axis.containers] == ["erode", "bbox"]
    frame.loc[len(frame)] = {**frame.iloc[1].to_dict(), "operator": "flip", "level": 0.1}
    figure = mask_noise_figure(frame, smoke=True, confidence=0.95)
    rates = [axis for axis in figure.axes if axis.get_xlabel() == "flip rate (dashed)"]
    assert len(rates) == 3 and [c.get_label() for c in rates[0].containers] == ["flip"]


@pytest.mark.slow
def test_tiny_ablation_runs_and_reports(tmp_path):
    """The embedded check end to end (two subjects, one prompt): shared trainings, every switch,
    the ablation table with the published rows beside ours."""
    from tests.helpers import run_cli

    out = tmp_path / "run"
    result = run_cli("run", "hifi_ablation_tiny", "--out", str(out), "--quiet", "subjects=teapot,dog",
                     "protocol.prompts=[0]", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [p for p in (out / "states").glob("*/*/*") if (p / "DONE").is_file()]
    # ti, +c_s, +mask, the shared +reg/+stepwise/+reference_guidance, the shared DreamBooth pair,
    # and the sweep points 0 and 1e-2 (its 1e-3 is +reg's training): 7 per subject.
    assert len(states) == 2 * 7
    table = (out / "report" / "ablation.md").read_text()
    assert "0.665 (published)" in table and "| +stepwise |" in table and "Smoke numbers" in table
