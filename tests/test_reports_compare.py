"""`subjectbench compare`: paired regression check between two runs of the same suite."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from reports.compare import Tolerance, compare_runs
from reports.rundata import ReportError
from tests.report_fakes import FakeDino, use_fakes

FAST = ["--resamples", "500"]
# The fake metrics have known responses to the dummy's fidelity; random-weight real metrics
# (SUBJECTBENCH_REPORT_REAL_METRICS=1) only guarantee that subject fidelity drops.
FAKE_METRICS = os.environ.get("SUBJECTBENCH_REPORT_REAL_METRICS") != "1"


def run(path, *overrides):
    config = load_config("default", ["methods=dummy", "metrics.weights=random", *overrides])
    run_benchmark(config, path, quiet=True)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        use_fakes(patch)
        yield {
            "baseline": run(base / "baseline"),
            "rerun": run(base / "rerun"),
            "less_fidelity": run(base / "less", "methods.dummy.fidelity=0.4"),
            "more_fidelity": run(base / "more", "methods.dummy.fidelity=0.95"),
            "other_subject": run(base / "other", "subjects=teapot"),
            "other_seed": run(base / "seed", "subjects=teapot", "protocol.seed=1"),
        }


def verdicts(path) -> dict:
    document = json.loads((path / "compare.json").read_text())
    return {row["metric"]: row["verdict"] for row in document["metrics"]}


def test_unchanged_rerun_passes_with_exact_equality(runs, tmp_path, capsys):
    code = main(["compare", runs["baseline"], runs["rerun"], "--out", str(tmp_path), *FAST, "--fail-on-difference"])
    output = capsys.readouterr().out
    assert code == 0
    assert "PASS" in output and "bit-identical" in output
    document = json.loads((tmp_path / "compare.json").read_text())
    assert document["exit_code"] == 0 and document["regressions"] == 0
    assert set(verdicts(tmp_path).values()) == {"identical"}
    for row in document["metrics"]:
        assert row["delta"] == 0 and row["identical_images"] == row["pairs"] == row["identical_values"]
        if row["higher_is_better"] is not None:  # identical runs: every replicate a tie, 50/50
            assert row["p_current_better"] == 0.5 and row["tie"] is True
    assert document["images"][0]["pairs"] == document["images"][0]["identical_images"] == 3 * (3 * 2 + 2)
    assert (tmp_path / "compare.md").read_text().startswith("# Comparison")


def test_injected_regression_fails_and_direction_comes_from_the_metric(runs, tmp_path, capsys):
    # Lower fidelity: images drift from the subject. DINO/CLIP-I drop (worse), CLIP-T rises, and
    # PRES drops — an improvement, since lower PRES is better.
    assert main(["compare", runs["baseline"], runs["less_fidelity"], "--out", str(tmp_path), *FAST]) == 1
    assert "FAIL: significant regression" in capsys.readouterr().out
    found = verdicts(tmp_path)
    assert found["dino"] == found["clip_i"] == "worse"
    if FAKE_METRICS:
        assert found["clip_t"] == "better" and found["pres"] == "better"
    rows = {r["metric"]: r for r in json.loads((tmp_path / "compare.json").read_text())["metrics"]}
    assert rows["dino"]["ci_high"] < -0.01 and rows["dino"]["identical_images"] == 0
    assert rows["dino"]["p_current_better"] < 0.01 and rows["dino"]["tie"] is False  # clearly dominated
    assert rows["dino"]["pairs"] == 3 * 3 * 2  # units paired across different keys (fingerprint changed)
    if FAKE_METRICS:  # Higher fidelity: PRES rises, which is worse.
        assert main(["compare", runs["baseline"], runs["more_fidelity"], "--out", str(tmp_path), *FAST]) == 1
        found = verdicts(tmp_path)
        assert found["pres"] == "worse" and found["dino"] == "better"


def test_tolerance_per_metric_and_fail_on_difference(runs, tmp_path):
    loose = ["--tolerance", "dino=1", "--tolerance", "clip_i=1", "--tolerance", "dino_s16_squash=1"]
    assert main(["compare", runs["baseline"], runs["less_fidelity"], "--out", str(tmp_path), *FAST, *loose]) == 0
    assert verdicts(tmp_path)["dino"] == "no significant change"
    assert main(["compare", runs["baseline"], runs["less_fidelity"], "--out", str(tmp_path), *FAST, *loose,
                 "--fail-on-difference"]) == 1
    assert Tolerance.parse(["0.05", "pres=0.2"]).of("dino") == 0.05
    assert Tolerance.parse(["0.05", "pres=0.2"]).of("pres") == 0.2
    with pytest.raises(ReportError, match="expected a number"):
        Tolerance.parse(["dino=abc"])


def test_runs_without_shared_units_are_an_error(runs, capsys):
    assert main(["compare", runs["baseline"], runs["other_subject"] + "-missing"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ReportError, match="share no finished image units"):
        compare_runs(runs["other_subject"], runs["other_seed"], resamples=50)  # seeds differ: no unit is shared
    comparison = compare_runs(runs["baseline"], runs["other_subject"], resamples=50)
    # Only teapot is shared; the other subjects' units are counted, not compared.
    assert comparison.images["pairs"].sum() == 3 * 2 + 2
    assert comparison.images["baseline_only"].sum() == 2 * (3 * 2 + 2)
    assert any("only in the baseline" in w for w in comparison.warnings)
    assert comparison.exit_code == 0


def test_unscored_runs_compare_image_bytes(tmp_path, capsys):
    baseline = run(tmp_path / "a", "metrics.names=[]", "subjects=teapot")
    current = run(tmp_path / "b", "metrics.names=[]", "subjects=teapot", "methods.dummy.noise=0.5")
    assert main(["compare", baseline, baseline, "--out", str(tmp_path / "same"), "--fail-on-difference"]) == 0
    assert main(["compare", baseline, current, "--out", str(tmp_path / "diff")]) == 0
    assert main(["compare", baseline, current, "--out", str(tmp_path / "diff"), "--fail-on-difference"]) == 1
    assert "only image bytes are compared" in capsys.readouterr().out


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class ShiftedDino(FakeDino):
    """A DINO stand-in: subjects differ a lot (0.2 / 0.5 / 0.8), images a little, and with
    ``shift`` set every image moves by about that much (spread a little per subject and image,
    so that the interval is not a point)."""

    shift = 0.0
    offsets: dict = {}

    def score(self, inputs):
        base = ShiftedDino.offsets[inputs.reference_key]
        value = base + 0.01 * np.array([_unit(k) for k in inputs.image_keys])
        if ShiftedDino.shift:
            spread = 0.004 * (np.array([_unit("c" + k) for k in inputs.image_keys]) - 0.5)
            value = value + ShiftedDino.shift + 0.01 * (base - 0.5) + spread
        return value


def _independent_paired_ci(differences, subjects, prompts, resamples=4000, seed=123):
    """Paired hierarchical bootstrap written plainly: subjects, then prompts within subjects."""
    rng = np.random.default_rng(seed)
    by_subject = {}
    for d, s, p in zip(differences, subjects, prompts):
        by_subject.setdefault(s, {}).setdefault(p, []).append(d)
    names = sorted(by_subject)
    means = []
    for _ in range(resamples):
        drawn = []
        for s in rng.choice(names, size=len(names)):
            prompt_names = sorted(by_subject[s])
            for p in rng.choice(prompt_names, size=len(prompt_names)):
                drawn += by_subject[s][p]
        means.append(np.mean(drawn))
    return np.quantile(means, [0.025, 0.975])


def test_small_uniform_shift_is_found_only_by_pairing(tmp_path, monkeypatch):
    """Subjects differ by 0.3 while the regression is −0.02 on every image: a paired analysis
    flags it at the default tolerance (an unpaired one could not), and the interval matches an
    independent paired bootstrap."""
    import metrics.registry
    from data.subjects import load_subjects
    from reports.rundata import read_run

    offsets = {s.data_sha: offset for s, offset in zip(load_subjects("mini"), (0.2, 0.5, 0.8))}
    monkeypatch.setattr(ShiftedDino, "offsets", offsets)
    monkeypatch.setitem(metrics.registry.BUILTIN_METRICS, "dino", f"{__name__}:ShiftedDino")
    overrides = ["metrics.names=[dino]", "protocol.prompts=[0,1,2,3,4]"]
    baseline = run(tmp_path / "baseline", *overrides)
    monkeypatch.setattr(ShiftedDino, "shift", -0.02)
    current = run(tmp_path / "current", *overrides)

    comparison = compare_runs(baseline, current)  # default tolerance and resamples
    row = comparison.rows.set_index("metric").loc["dino"]
    assert row["verdict"] == "worse" and comparison.exit_code == 1
    assert row["ci_high"] < -0.01
    assert row["p_current_better"] == 0.0 and not row["tie"]  # every paired replicate sees the drop
    # an unpaired look cannot see it: the spread between subjects swamps a −0.02 shift
    base_long, cur_long = read_run(baseline).long, read_run(current).long
    base_values = base_long[base_long["metric"] == "dino"]["value"].to_numpy()
    cur_values = cur_long[cur_long["metric"] == "dino"]["value"].to_numpy()
    pooled_sd = np.sqrt((base_values.var(ddof=1) + cur_values.var(ddof=1)) / 2)
    assert pooled_sd > 10 * 0.02
    # the interval agrees with an independent paired bootstrap over the same differences
    identity = ["cell_id", "checkpoint", "subject", "role", "template", "k", "seed"]
    merged = base_long[base_long["metric"] == "dino"].merge(
        cur_long[cur_long["metric"] == "dino"], on=identity, suffixes=("_b", "_c"))
    assert len(merged) == len(base_values) == 3 * 5 * 2
    differences = (merged["value_c"] - merged["value_b"]).to_numpy()
    low, high = _independent_paired_ci(differences, merged["subject"].to_numpy(), merged["template"].to_numpy())
    assert row["delta"] == pytest.approx(differences.mean(), abs=1e-12)
    assert row["ci_low"] == pytest.approx(low, abs=1.5e-3)
    assert row["ci_high"] == pytest.approx(high, abs=1.5e-3)


def test_beat_probability_draws_the_same_units_for_both_runs():
    """A +0.001 gain on every image under a between-subject spread of 0.3 is certain only when every
    replicate draws the same subjects and prompts for both runs; identical values are 50/50 and a tie."""
    import pandas as pd

    from reports.compare import beat_probability

    rng = np.random.default_rng(0)
    subjects = np.repeat([f"s{i}" for i in range(6)], 8)
    templates = np.tile(np.repeat(["p0", "p1", "p2", "p3"], 2), 6)
    baseline = np.repeat(rng.normal(0.5, 0.3, 6), 8) + rng.normal(0, 0.01, 48)
    frame = pd.DataFrame({"subject": subjects, "template": templates, "value_baseline": baseline,
                          "value_current": baseline + 0.001})
    assert beat_probability(frame, True, 500, 0, 0.95) == (1.0, False)
    assert beat_probability(frame, False, 500, 0, 0.95) == (0.0, False)  # lower is better: current loses
    same = frame.assign(value_current=frame["value_baseline"])
    assert beat_probability(same, True, 500, 0, 0.95) == (0.5, True)
    noisy = frame.assign(value_current=frame["value_baseline"] + rng.normal(0, 0.01, 48))
    p, tie = beat_probability(noisy, True, 500, 0, 0.95)
    assert 0.025 < p < 0.975 and tie
    assert np.isnan(beat_probability(frame, None, 500, 0, 0.95)[0])  # no direction: no order
