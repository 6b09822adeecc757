"""Honest checkpoint selection (reports.selection): fixed choice, best on test prompts, held-out 2-fold."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from reports.ranking import paired_draws
from reports.rundata import ReportError
from reports.selection import Criterion, select_cells, selection_markdown, selection_table

# Templates whose alphabetical order is not the protocol order: the split must follow prompt_index.
TEMPLATES = ["z {0} {1}", "a {0} {1}", "m {0} {1}", "b {0} {1}"]  # prompt_index 0, 1, 2, 3
HALF_A, HALF_B = [TEMPLATES[0], TEMPLATES[2]], [TEMPLATES[1], TEMPLATES[3]]


def _long(cells: dict[tuple[str, str], np.ndarray], method: str = "dreambooth", method_name: str = "dreambooth",
          metric: str = "dino", grids: dict | None = None) -> pd.DataFrame:
    """cells: (cell_id, checkpoint) -> values of shape (subjects, prompts, images)."""
    checkpoint_order = sorted({c for _, c in cells}, key=lambda c: (c == "final", c))
    rows = []
    for (cell_id, checkpoint), values in cells.items():
        several = len({c for cid, c in cells if cid == cell_id}) > 1
        entry = f"{cell_id} @ {checkpoint}" if several else cell_id
        for (s, p, k), value in np.ndenumerate(values):
            rows.append({"method": method, "method_name": method_name, "cell_id": cell_id, "entry": entry,
                         "checkpoint": checkpoint, "checkpoint_index": checkpoint_order.index(checkpoint),
                         "grid": json.dumps((grids or {}).get(cell_id, {})), "subject": f"s{s}",
                         "template": TEMPLATES[p], "prompt_index": p, "role": "eval", "k": k, "metric": metric,
                         "value": float(value)})
    return pd.DataFrame(rows)


def _plain_mean(long: pd.DataFrame, entry: str, templates: list[str]) -> float:
    return float(long[(long["entry"] == entry) & long["template"].isin(templates)]["value"].mean())


@pytest.fixture
def crossing():
    """Cell 'final' is best on half A and poor on B; 'step-500' the reverse and a little better overall."""
    rng = np.random.default_rng(0)
    subjects = rng.normal(0, 0.02, (6, 1, 1))
    a_good = np.array([0.9, 0.1, 0.9, 0.1])[None, :, None]
    b_good = np.array([0.2, 0.85, 0.2, 0.85])[None, :, None]
    return _long({
        ("dreambooth", "final"): a_good + subjects + rng.normal(0, 0.01, (6, 4, 2)),
        ("dreambooth", "step-500"): b_good + subjects + rng.normal(0, 0.01, (6, 4, 2)),
    })


def test_held_out_selection_never_scores_a_cell_on_the_prompts_it_was_chosen_on(crossing):
    [result] = select_cells(crossing, Criterion.parse("dino"), resamples=300, seed=4)
    final, step = "dreambooth @ final", "dreambooth @ step-500"
    assert result.fixed == final and result.best == step  # step-500 is better over all prompts
    assert (result.chosen_on_a, result.chosen_on_b) == (final, step)  # the halves disagree
    # pooled image-weighted: final on half B's prompts, step-500 on half A's — never the prompts each won on
    scored = pd.concat([crossing[(crossing["entry"] == final) & crossing["template"].isin(HALF_B)],
                        crossing[(crossing["entry"] == step) & crossing["template"].isin(HALF_A)]])
    assert result.held_out_scores[0] == pytest.approx(scored["value"].mean(), abs=1e-12)
    assert result.held_out_scores[0] < 0.2 < result.fixed_scores[0] < result.best_scores[0]
    assert result.fixed_scores[0] == pytest.approx(_plain_mean(crossing, final, TEMPLATES), abs=1e-12)
    assert result.best_scores[0] == pytest.approx(_plain_mean(crossing, step, TEMPLATES), abs=1e-12)
    table = selection_table([result], Criterion.parse("dino")).set_index("choice")
    assert list(table.index) == ["fixed", "best_on_test", "held_out"]
    assert table.loc["held_out", "gain_vs_fixed"] < 0 < table.loc["best_on_test", "gain_vs_fixed"]
    assert "chosen on A, scored on B" in table.loc["held_out", "cells"] and "optimistic" in table.loc["best_on_test", "note"]
    assert table.loc["held_out", "ci_low"] <= table.loc["held_out", "value"] <= table.loc["held_out", "ci_high"]


def test_every_replicate_redoes_the_choice_on_one_half_and_scores_it_on_the_other(crossing):
    """Replicates checked against a plain reimplementation over the same subject/prompt draws."""
    noisy = crossing.assign(value=crossing["value"] + np.random.default_rng(1).normal(0, 0.3, len(crossing)))
    [result] = select_cells(noisy, Criterion.parse("dino"), resamples=40, seed=7)
    subjects = sorted(noisy["subject"].unique())
    by_subject = {s: sorted(noisy[noisy["subject"] == s]["template"].unique()) for s in subjects}  # the grid's slot order
    draws = paired_draws(np.array([len(by_subject[s]) for s in subjects]), 40, 7)
    for b in range(40):
        drawn = [(subjects[s], by_subject[subjects[s]][p])
                 for s, p, u in zip(draws.subjects[b].ravel(), draws.prompts[b].ravel(), draws.used[b].ravel()) if u]
        sample = pd.concat([noisy[(noisy["subject"] == s) & (noisy["template"] == t)] for s, t in drawn])

        def mean(entry, templates, sample=sample):
            part = sample[(sample["entry"] == entry) & sample["template"].isin(templates)]["value"]
            return part.sum(), len(part)

        cells = result.cells
        pick_a = max(cells, key=lambda e: (lambda t, n: t / n if n else -np.inf)(*mean(e, HALF_A)))
        pick_b = max(cells, key=lambda e: (lambda t, n: t / n if n else -np.inf)(*mean(e, HALF_B)))
        (t1, n1), (t2, n2) = mean(pick_a, HALF_B), mean(pick_b, HALF_A)
        expected = (t1 + t2) / (n1 + n2) if n1 + n2 else np.nan
        assert result.held_out_scores[b + 1] == pytest.approx(expected, abs=1e-12, nan_ok=True)
        best = max(cells, key=lambda e: (lambda t, n: t / n)(*mean(e, TEMPLATES)))
        assert result.best_scores[b + 1] == pytest.approx((lambda t, n: t / n)(*mean(best, TEMPLATES)), abs=1e-12)


@pytest.mark.parametrize("metric", ["dino", "pres"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_on_test_prompts_is_never_worse_than_the_fixed_choice(metric, seed):
    rng = np.random.default_rng(seed)
    cells = {("dreambooth", c): 0.5 + rng.normal(0, 0.05, (5, 1, 1)) + rng.normal(0, 0.1, (5, 4, 2))
             for c in ("step-100", "step-200", "step-300", "final")}
    criterion = Criterion.parse(metric)
    [result] = select_cells(_long(cells, metric=metric), criterion, resamples=200, seed=seed)
    assert result.fixed == "dreambooth @ final"
    assert (result.best_scores >= result.fixed_scores).all()  # internal scores: higher is better, every replicate
    table = selection_table([result], criterion).set_index("choice")
    if metric == "pres":  # shown in the metric's units: lower is better
        assert table.loc["best_on_test", "value"] <= table.loc["fixed", "value"]
    else:
        assert table.loc["best_on_test", "value"] >= table.loc["fixed", "value"]
    assert table.loc["best_on_test", "gain_vs_fixed"] >= 0 and table.loc["best_on_test", "gain_ci_low"] >= 0


def test_a_single_cell_family_is_one_row_without_selection(crossing):
    single = _long({("textual_inversion", "final"): np.full((3, 4, 2), 0.4)}, method="textual_inversion",
                   method_name="textual_inversion")
    results = select_cells(pd.concat([crossing, single]), Criterion.parse("dino"), resamples=50)
    table = selection_table(results, Criterion.parse("dino"))
    rows = table[table["family"] == "textual_inversion"]
    assert len(rows) == 1 and rows["choice"].iloc[0] == "only" and rows["cells"].iloc[0] == "textual_inversion"
    assert rows["value"].iloc[0] == pytest.approx(0.4) and np.isnan(rows["gain_vs_fixed"].iloc[0])
    assert len(table[table["family"] == "dreambooth"]) == 3
    markdown = selection_markdown(table, Criterion.parse("dino"), 50, 0.95)
    assert "## Checkpoint and cell selection" in markdown and "only cell (no selection)" in markdown


def test_the_fixed_choice_is_the_final_checkpoint_at_the_method_defaults():
    values = np.full((2, 4, 1), 0.5)
    grids = {"dreambooth[learning_rate=1e-06]": {"learning_rate": 1e-6},
             "dreambooth[learning_rate=5e-06]": {"learning_rate": 5e-6}}  # DreamBooth's default: 5e-6 (paper)
    cells = {(cell, checkpoint): values + i * 0.01 for i, (cell, checkpoint) in
             enumerate((c, k) for c in grids for k in ("step-10", "final"))}
    [result] = select_cells(_long(cells, grids=grids), Criterion.parse("dino"), resamples=20)
    assert result.fixed == "dreambooth[learning_rate=5e-06] @ final"
    off_default = {k: v for k, v in cells.items() if k[0].endswith("1e-06]")}
    [result] = select_cells(_long(off_default, grids=grids), Criterion.parse("dino"), resamples=20)
    assert result.fixed is None and "learning_rate=5e-06" in result.fixed_note and np.isnan(result.fixed_scores).all()
    sampler = {"dreambooth[guidance=3.0]": {"guidance": 3.0}, "dreambooth[guidance=7.5]": {"guidance": 7.5}}
    cells = {(c, "final"): values for c in sampler}
    [result] = select_cells(_long(cells, grids=sampler), Criterion.parse("dino"), resamples=20)
    assert result.fixed == "dreambooth[guidance=7.5]"  # the protocol sampler's default guidance
    unknown = {(c, k): v for (c, k), v in {("x", "final"): values, ("x", "step-1"): values}.items()}
    [result] = select_cells(_long(unknown, method_name="not_installed"), Criterion.parse("dino"), resamples=20)
    assert result.fixed is None and "cannot be loaded" in result.fixed_note


def test_a_combined_criterion_pools_each_metric_then_weighs():
    rng = np.random.default_rng(3)
    frames = []
    for metric, scale in (("dino", 1.0), ("clip_t", 0.3)):
        cells = {("dreambooth", c): scale * (0.5 + rng.normal(0, 0.2, (4, 4, 2))) for c in ("step-5", "final")}
        frames.append(_long(cells, metric=metric))
    long = pd.concat(frames)
    criterion = Criterion.parse("0.7*dino+0.3*clip_t", valid=["dino", "clip_t"])
    assert not criterion.single and criterion.label == "0.7·DINO + 0.3·CLIP-T"
    [result] = select_cells(long, criterion, resamples=20)

    def score(entry, templates):
        return sum(w * _plain_mean(long[long["metric"] == m], entry, templates) for m, w in criterion.terms)

    cells = result.cells
    pick_a, pick_b = max(cells, key=lambda e: score(e, HALF_A)), max(cells, key=lambda e: score(e, HALF_B))
    assert (result.chosen_on_a, result.chosen_on_b) == (pick_a, pick_b)
    pooled = 0.0
    for m, w in criterion.terms:
        part = long[long["metric"] == m]
        chosen = pd.concat([part[(part["entry"] == pick_a) & part["template"].isin(HALF_B)],
                            part[(part["entry"] == pick_b) & part["template"].isin(HALF_A)]])
        pooled += w * chosen["value"].mean()
    assert result.held_out_scores[0] == pytest.approx(pooled, abs=1e-12)
    assert result.best_scores[0] == pytest.approx(max(score(e, TEMPLATES) for e in cells), abs=1e-12)


def test_criterion_parsing_and_errors():
    assert Criterion.parse("dino").single and Criterion.parse("dino").higher_is_better
    assert not Criterion.parse("pres").higher_is_better
    assert Criterion.parse("dino + 2*pres").signs == (1.0, -1.0)
    with pytest.raises(ReportError, match="not a metric of this run"):
        Criterion.parse("dinov2", valid=["dino", "clip_t"])
    with pytest.raises(ReportError, match="cannot read"):
        Criterion.parse("dino*0.5")
    with pytest.raises(ReportError, match="each metric once"):
        Criterion.parse("dino+dino")
    with pytest.raises(ReportError, match="no better direction"):
        Criterion.parse("no_such_metric")


def test_the_report_shows_the_selection_table_of_a_real_run(tmp_path, capsys):
    """A run through the real pipeline (dummy method, fake metrics): a grid family and a checkpoint
    sweep get three rows each on the leaderboard page and in tables/selection.csv."""
    from benchmark.cli import main
    from benchmark.config import load_config
    from benchmark.driver import run_benchmark
    from tests.report_fakes import use_fakes

    with pytest.MonkeyPatch.context() as patch:
        use_fakes(patch)
        overrides = ["methods=dummy,sweep_dummy", "methods.dummy.fidelity=[0.3,0.7]", "metrics.names=[dino,clip_t]",
                     "metrics.weights=random", "protocol.prior_images=0"]
        run_benchmark(load_config("default", overrides), tmp_path / "run", quiet=True)
        assert main(["report", str(tmp_path / "run"), "--resamples", "200", "--select-by", "dino+clip_t"]) == 0
        assert main(["report", str(tmp_path / "run"), "--resamples", "200", "--select-by", "dino+lpips"]) == 2
    assert "'lpips' is not a metric of this run" in capsys.readouterr().err
    report = tmp_path / "run" / "report"
    table = pd.read_csv(report / "tables" / "selection.csv")
    assert set(table["criterion"]) == {"dino+clip_t"}
    dummy = table[table["family"] == "dummy"].set_index("choice")
    assert list(dummy.index) == ["fixed", "best_on_test", "held_out"]
    assert dummy.loc["fixed", "cells"] == "dummy[fidelity=0.7]"  # the method's default fidelity
    assert dummy.loc["best_on_test", "value"] >= dummy.loc["fixed", "value"]
    sweep = table[table["family"] == "sweep_dummy"].set_index("choice")
    assert sweep.loc["fixed", "cells"] == "sweep_dummy @ final" and sweep["n_cells"].eq(3).all()
    page = (report / "leaderboard.html").read_text(encoding="utf-8")
    assert "id='selection'" in page and "class='optimistic'" in page
    assert "## Checkpoint and cell selection" in (report / "leaderboard.md").read_text(encoding="utf-8")


def test_one_prompt_per_subject_has_no_held_out_choice():
    one_prompt = _long({("dreambooth", c): np.full((3, 1, 2), v) for c, v in (("step-5", 0.4), ("final", 0.5))})
    [result] = select_cells(one_prompt, Criterion.parse("dino"), resamples=20)
    table = selection_table([result], Criterion.parse("dino")).set_index("choice")
    assert table.loc["fixed", "value"] == pytest.approx(0.5) and table.loc["best_on_test", "cells"] == "dreambooth @ final"
    assert np.isnan(table.loc["held_out", "value"]) and "at least two evaluated prompts" in table.loc["held_out", "note"]
