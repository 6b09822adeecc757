"""Families' pareto fronts: hypervolume against hand-computed areas, the bootstrap over subjects,
frontier names, and the plot/table files."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from reports.pareto import front_hypervolumes, hypervolume, per_subject_points, write_fronts


def test_hypervolume_matches_hand_computed_areas():
    # staircase (3,1), (2,2), (1,3) over (0,0): 3*1 + 2*1 + 1*1 = 6
    assert hypervolume([3, 2, 1], [1, 2, 3], (0, 0)) == pytest.approx(6.0)
    # a dominated point and one below the reference add nothing
    assert hypervolume([3, 2, 1, 1, -1], [1, 2, 3, 1, 5], (0, 0)) == pytest.approx(6.0)
    # one rectangle: (0.8 - 0.5) * (0.3 - 0.2)
    assert hypervolume([0.8], [0.3], (0.5, 0.2)) == pytest.approx(0.03)
    # lower-is-better x: mirror of the first case around the reference 3
    assert hypervolume([0, 1, 2], [1, 2, 3], (3, 0), x_higher=False) == pytest.approx(6.0)
    assert hypervolume([], [], (0, 0)) == 0.0


def _frame(values: dict[tuple[str, str], list[tuple[float, float]]]) -> pd.DataFrame:
    rows = []
    for (family, point), per_subject in values.items():
        for index, (x, y) in enumerate(per_subject):
            rows.append({"family": family, "point": point, "subject": f"s{index}", "x": x, "y": y})
    return pd.DataFrame(rows)


def test_fronts_hypervolumes_and_paired_differences():
    frame = _frame({
        ("A", "A@1"): [(0.3, 0.9), (0.3, 0.9), (0.3, 0.9)],
        ("A", "A@2"): [(0.9, 0.3), (0.9, 0.3), (0.9, 0.3)],
        ("A", "A@3"): [(0.2, 0.2), (0.2, 0.2), (0.2, 0.2)],  # dominated
        ("B", "B@1"): [(0.5, 0.5), (0.4, 0.4), (0.6, 0.6)],  # mean (0.5, 0.5)
    })
    fronts, differences, reference = front_hypervolumes(frame, resamples=200, seed=1)
    assert reference == pytest.approx((0.2, 0.2))
    a, b = fronts.set_index("family").loc["A"], fronts.set_index("family").loc["B"]
    # A: (0.9,0.3),(0.3,0.9) over (0.2,0.2): 0.7*0.1 + 0.1*0.6 = 0.13; B: 0.3*0.3 = 0.09
    assert a["hypervolume"] == pytest.approx(0.13) and b["hypervolume"] == pytest.approx(0.09)
    assert a["frontier"] == ["A@1", "A@2"] and b["frontier"] == ["B@1"]
    assert a["ci_low"] == pytest.approx(0.13) and a["ci_high"] == pytest.approx(0.13)  # no subject variation
    assert b["ci_low"] < 0.09 < b["ci_high"] and a["n_subjects"] == 3 and a["n_points"] == 3
    (row,) = differences.itertuples()
    assert (row.family_a, row.family_b) == ("A", "B") and row.difference == pytest.approx(0.04)
    assert row.ci_low <= 0.04 <= row.ci_high
    again, _, _ = front_hypervolumes(frame, resamples=200, seed=1)
    pd.testing.assert_frame_equal(fronts, again)
    single, _, _ = front_hypervolumes(frame[frame["subject"] == "s0"], resamples=50)
    assert single["ci_low"].isna().all()


def test_write_fronts_names_frontier_cells(tmp_path):
    rows = []
    for entry, family, clip_t, dino in [("db@step-5", "dreambooth", 0.30, 0.50), ("db@final", "dreambooth", 0.25, 0.70),
                                        ("blend@x", "DreamBlend (reconstructed)", 0.29, 0.68)]:
        for subject, shift in (("dog", 0.0), ("teapot", 0.01)):
            rows += [{"method": family, "entry": entry, "subject": subject, "metric": "clip_t", "value": clip_t + shift},
                     {"method": family, "entry": entry, "subject": subject, "metric": "dino", "value": dino + shift}]
    run = SimpleNamespace(long=pd.DataFrame(rows))
    assert len(per_subject_points(run.long, "dino", "clip_t")) == 6
    base, title = write_fronts(run, tmp_path, "dino", "clip_t", smoke=True, resamples=50, seed=0, confidence=0.95)
    assert (tmp_path / f"{base}.png").is_file() and (tmp_path / f"{base}.svg").is_file()
    table = pd.read_csv(tmp_path / "tables" / "fronts_dino_vs_clip_t.csv")
    assert set(table["family"]) == {"dreambooth", "DreamBlend (reconstructed)"}
    assert "front = db@step-5, db@final" in title and "DreamBlend (reconstructed): hypervolume" in title
    assert np.isfinite(table["hypervolume"]).all()
