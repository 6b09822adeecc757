"""``build_report(run_dir)``: every report artefact of a run, rebuilt from its store alone.

Writes under ``RUN_DIR/report/``:
  index.html                     run facts, smoke warning, leaderboard, plots, data dictionary, links
  results.parquet                the long format (one row per image × metric; reports.long)
  fingerprints.json              metric fingerprints and method fingerprints behind the numbers
  leaderboard.html / .md / .csv  ranked entries with published figures beside them, and rank confidence
  tables/rank_probabilities.csv, tables/rank_beats.csv   P(rank k) per entry, P(A beats B) (reports.ranking)
  tables/selection.csv           per method family: fixed choice, best on test prompts, held-out choice (reports.selection)
  tables.html / tables.md        summary, by kind, by category, per subject, CLIP-T scales, cost
  conventions.html / .md         the entries under every metric convention scored, and which one each paper uses
  tables/<name>.csv              the same tables, numeric (mean, ci_low, ci_high, n per metric)
  plots.html, plots/pareto_<y>_vs_<x>.png/.svg   DINO vs CLIP-T and CLIP-I vs CLIP-T
  plots/fronts_<y>_vs_<x>.png/.svg, tables/fronts_*.csv   families' pareto fronts, hypervolumes with CIs
  plots/attention_collapse.png/.svg, tables/attention_collapse.csv   when states hold the diagnostic
  gallery/index.html, gallery/s-<subject>.html   images per subject × prompt × entry
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from data.common import atomic_write_bytes, atomic_write_text
from reports import leaderboard as lb
from reports.ablation import write_hifi_reports
from reports.collapse import write_collapse
from reports.conventions import conventions_html, conventions_markdown
from reports.gallery import build_gallery
from reports.long import REPORT_DIR, RESULTS_FILE
from reports.pages import index_html, plots_html, tables_html, tables_markdown
from reports.pareto import PLOTS, pareto_figure, plot_points, save_figure, write_fronts
from reports.ranking import rank_confidence, rank_confidence_html, rank_confidence_markdown
from reports.render import FEW_NOTE, page
from reports.rundata import ReportError, RunData, read_run
from reports.schema import METRIC_ORDER, metric_direction, metric_label
from reports.selection import (
    Criterion,
    select_cells,
    selection_html,
    selection_markdown,
    selection_table,
)
from reports.single_image import single_image_html, single_image_markdown, single_image_table
from reports.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from reports.tables import cost_table, run_time_table, summary_tables


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def _fingerprints(run: RunData) -> dict:
    methods = {}
    if not run.images.empty:
        for cell_id, frame in run.images.groupby("cell_id", sort=False):
            methods[cell_id] = sorted(set(frame["method_fingerprint"].dropna()))
    return {"metrics": run.fingerprints, "method_fingerprint_hashes": methods, "config": run.config}


def write_single_image(run: RunData, out: Path, resamples: int, seed: int, confidence: float) -> list[tuple[str, str]]:
    """The one-image vs all-images table, when the run has both tracks (else nothing)."""
    table = single_image_table(run.long, resamples, seed, confidence)
    if table.empty:
        return []
    _write_csv(out / "tables" / "single_image.csv", table)
    atomic_write_text(out / "single_image.md", single_image_markdown(table, confidence))
    atomic_write_text(out / "single_image.html", page("One image vs all images", single_image_html(table, confidence),
                                                      run_name=run.config.get("name", run.root.name)))
    return [("single_image.html", "One image vs all images: the drop per method and metric, paired CIs "
                                  "(also single_image.md, tables/single_image.csv)")]


def check_rank_by(rank_by: str, run: RunData) -> None:
    valid = list(dict.fromkeys([*METRIC_ORDER, *run.fingerprints]))
    if rank_by not in valid:
        raise ReportError(f"--rank-by {rank_by!r} is not a metric of this report; valid: {', '.join(valid)}")


def build_report(
    run_dir: str | Path,
    rank_by: str = lb.DEFAULT_RANK_BY,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    select_by: str | None = None,
) -> Path:
    """Build the report of ``run_dir``; returns the path of ``report/index.html``. ``select_by``:
    the checkpoint-selection criterion (reports.selection; default: ``rank_by``)."""
    run = read_run(run_dir)
    check_rank_by(rank_by, run)
    criterion = Criterion.parse(select_by or rank_by, valid=list(dict.fromkeys([*METRIC_ORDER, *run.fingerprints])))
    out = run.root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    smoke = run.smoke_reasons()
    name = run.config.get("name", run.root.name)

    _write_parquet(out / RESULTS_FILE, run.long)
    atomic_write_text(out / "fingerprints.json", json.dumps(_fingerprints(run), indent=1, sort_keys=True, default=str))

    tables = summary_tables(run, resamples, seed, confidence)
    cost = cost_table(run)
    if not tables["summary"].empty:
        # The cost of a cell beside its quality, for one-file analyses (all checkpoints share it).
        cost_columns = ["prepare_device", "prepare_seconds_per_subject", "prepare_peak_mb", "state_mb_per_subject",
                        "seconds_per_image", "generate_peak_mb"]
        tables["summary"] = tables["summary"].merge(cost[["cell_id", *cost_columns]], on="cell_id", how="left")
    run_time = run_time_table(run)
    for table_name, table in {**tables, "cost": cost, "run_time": run_time}.items():
        _write_csv(out / "tables" / f"{table_name}.csv", table)
    explanation = (
        f"Means over images with {confidence:.0%} confidence intervals from a hierarchical bootstrap "
        f"({resamples} resamples of subjects, then prompts within subjects; seed {seed}). Missing values show as —. "
        f"{FEW_NOTE} 'images' counts the images each metric averaged (PRES: the class-prior images)."
    )
    files_extra = write_single_image(run, out, resamples, seed, confidence)
    atomic_write_text(out / "tables.html", tables_html(run, tables, cost, explanation, run_time))
    atomic_write_text(out / "tables.md", tables_markdown(run, tables, cost, explanation, run_time))
    atomic_write_text(out / "conventions.html", page("Conventions", conventions_html(run, tables), run_name=name))
    atomic_write_text(out / "conventions.md", conventions_markdown(run, tables))

    partial = "" if smoke else lb.partial_protocol(run.images, run.config)
    board = lb.leaderboard_frame(tables["summary"], rank_by, smoke=bool(smoke), apart=bool(partial))
    coverage = lb.coverage_note(run.images) + (f". Not ranked among the published figures: {partial}" if partial else "")
    ranks = rank_confidence(run.long, rank_by, metric_direction(rank_by) is not False, resamples, seed, confidence)
    for table_name in ("rank_probabilities", "rank_beats"):  # no stale tables from an earlier build
        (out / "tables" / f"{table_name}.csv").unlink(missing_ok=True)
    if ranks is not None:
        _write_csv(out / "tables" / "rank_probabilities.csv", ranks.rank_table())
        _write_csv(out / "tables" / "rank_beats.csv", ranks.beats_table())
    selection = selection_table(select_cells(run.long, criterion, resamples, seed), criterion, confidence)
    (out / "tables" / "selection.csv").unlink(missing_ok=True)
    if not selection.empty:
        _write_csv(out / "tables" / "selection.csv", selection)
    body = lb.leaderboard_html(board, rank_by, smoke, coverage, resamples, confidence)
    body += rank_confidence_html(ranks, metric_label(rank_by))
    body += selection_html(selection, criterion, resamples, confidence)
    atomic_write_text(out / "leaderboard.html", page("Leaderboard", body, run_name=name))
    atomic_write_text(out / "leaderboard.md", lb.leaderboard_markdown(board, rank_by, smoke, coverage, resamples, confidence)
                      + rank_confidence_markdown(ranks, metric_label(rank_by))
                      + selection_markdown(selection, criterion, resamples, confidence))
    _write_csv(out / "leaderboard.csv", lb.leaderboard_csv(board))

    plots = []
    for y_metric, x_metric in PLOTS:
        base = f"plots/pareto_{y_metric}_vs_{x_metric}"
        figure = pareto_figure(plot_points(tables["summary"], y_metric, x_metric), y_metric, x_metric, bool(smoke), confidence)
        save_figure(figure, out / base)
        plots.append((base, f"{metric_label(y_metric)} vs {metric_label(x_metric)}"))
    plot_note = (
        "One point per method entry (cell @ checkpoint), whiskers = "
        f"{confidence:.0%} bootstrap CIs; dashed: pareto frontier (no other entry is better on both axes); arrows join "
        "a checkpoint sweep in step order." + (" Published figures are hollow diamonds." if not smoke else
                                                " Published figures are left out: smoke numbers are on another scale.")
    )
    for y_metric, x_metric in PLOTS:
        plots.append(write_fronts(run, out, y_metric, x_metric, bool(smoke), resamples, seed, confidence))
    collapse = write_collapse(run, out, bool(smoke))
    if collapse is not None:
        plots.append(collapse)
    atomic_write_text(out / "plots.html", plots_html(run, plots, plot_note))

    build_gallery(run, out)
    hifi_files = write_hifi_reports(run, out, resamples, seed, confidence)

    files = [
        ("leaderboard.html", "Leaderboard with rank confidence and checkpoint selection (also leaderboard.md, "
                             "leaderboard.csv, tables/rank_*.csv, tables/selection.csv)"),
        ("tables.html", "Tables: summary, by kind, by category, per subject, CLIP-T scales, cost (also tables.md, tables/*.csv)"),
        ("plots.html", "Pareto plots (PNG and SVG in plots/)"),
        ("conventions.html", "Conventions: the entries under every metric convention scored, and which one each "
                             "published source uses (also conventions.md)"),
        ("gallery/index.html", "Gallery: reference and generated images per subject, prompt and method"),
        (RESULTS_FILE, "results.parquet: every (image, metric) value"),
        ("fingerprints.json", "fingerprints.json: metric and method fingerprints behind these numbers"),
        *hifi_files,
        *files_extra,
    ]
    leaderboard_fragment = lb.leaderboard_html(board, rank_by, [], coverage, resamples, confidence, heading="h2")
    index = out / "index.html"
    atomic_write_text(index, index_html(run, leaderboard_fragment, plots, files))
    return index
