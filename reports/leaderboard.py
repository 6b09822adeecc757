"""The leaderboard: our method entries ranked by one metric, published figures beside them.

Ranking: by the mean of ``rank_by`` (default DINO), in the metric's direction (PRES: lower
first); entries without a value for it come last, unranked; entries whose displayed values are
equal share a rank (no order is claimed below the shown precision). Published rows are placed
where their value would rank but get no rank number, are styled and labelled as published
figures with their citation, and never enter our statistics. They interleave only with rows
that measure the full protocol: smoke runs and runs on other subjects, fewer prompts or fewer
images get them in a separate table, with the reason stated.
"""

from __future__ import annotations

import hashlib
import html
import re

import numpy as np
import pandas as pd

from reports.anchors import CITATIONS, CONVENTIONS, PUBLISHED, citation_numbers, reference
from reports.render import (
    FEW_NOTE,
    Cell,
    estimate,
    fmt_int,
    html_table,
    image_counts,
    markdown_table,
    smoke_banner,
    smoke_markdown,
)
from reports.schema import METRIC_MEANING, metric_direction, metric_label, ordered_metrics

DEFAULT_RANK_BY = "dino"
SHOWN_METRICS = ("dino", "clip_i", "clip_t", "div", "pres")
SHOWN_DIGITS = 3  # the precision values are displayed, and ranked, at
FULL_PROTOCOL = {"subjects": 30, "prompts": 25, "images": 4}


def slug(name: str) -> str:
    """An HTML id for an entry; the hash keeps 'lr=0.1' and 'lr=0-1' apart."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return f"m-{readable}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def partial_protocol(images: pd.DataFrame, config: dict) -> str:
    """Why this run does not measure the full DreamBooth protocol ('' when it does)."""
    reasons = []
    source = (config.get("dataset") or {}).get("source")
    if source != "dreambooth":
        reasons.append(f"its subjects are not the DreamBooth dataset (dataset.source={source})")
    evaluated = images[images["role"] == "eval"] if not images.empty else images
    if evaluated.empty:
        return "; ".join(reasons or ["it has no finished images"])
    subjects = evaluated["subject"].nunique()
    prompts = int(evaluated.groupby("subject")["template"].nunique().min())
    per_prompt = int(evaluated.groupby(["entry", "subject", "template"]).size().min())
    if subjects < FULL_PROTOCOL["subjects"] or prompts < FULL_PROTOCOL["prompts"] or per_prompt < FULL_PROTOCOL["images"]:
        reasons.append(
            f"it covers {subjects} subject(s) × {prompts} prompt(s) × {per_prompt} image(s) per prompt, "
            "not the full 30 × 25 × 4"
        )
    return "; ".join(reasons)


def leaderboard_frame(
    summary: pd.DataFrame, rank_by: str = DEFAULT_RANK_BY, smoke: bool = False, apart: bool = False
) -> pd.DataFrame:
    """Ranked rows: ours (source 'this run') and published anchors (source 'published').

    ``apart``: this run does not cover the full protocol; published rows follow ours, as for smoke."""
    metrics = ordered_metrics([*SHOWN_METRICS, *[c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]])
    higher = metric_direction(rank_by)
    ours = summary.copy()
    ours["source"] = "this run"
    ours["citation"] = ""
    ours["smoke"] = smoke
    ours["apart"] = smoke or apart
    anchors = pd.DataFrame(
        [
            {
                "entry": anchor.name,
                "source": "published",
                "citation": anchor.source,
                "smoke": False,
                "apart": False,
                **{f"{m}_mean": (np.nan if anchor.value(m) is None else anchor.value(m)) for m in metrics},
            }
            for anchor in PUBLISHED
        ]
    )
    for metric in metrics:
        for column in (f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high"):
            if column not in ours:
                ours[column] = np.nan
    key = f"{rank_by}_mean"
    shown = ours[key].astype(float).round(SHOWN_DIGITS)
    ours["rank"] = shown.rank(method="min", ascending=not higher) if len(ours) else []
    board = pd.concat([ours, anchors], ignore_index=True)
    board["_order"] = board[key] if higher is False else -board[key]
    board["_published"] = board["source"] == "published"
    # Smoke rows are on another scale, partial ones measure another thing: published rows then
    # follow ours instead of interleaving.
    keys = ["_published", "_order"] if smoke or apart else ["_order", "_published"]
    board = board.sort_values(keys, kind="stable", na_position="last")
    return board.drop(columns=["_order", "_published"]).reset_index(drop=True)


def coverage_note(images: pd.DataFrame) -> str:
    """How much of the protocol this run covers, next to what the published figures cover."""
    evaluated = images[images["role"] == "eval"] if not images.empty else images
    if evaluated.empty:
        return "no finished images"
    subjects = evaluated["subject"].nunique()
    prompts = evaluated.groupby("subject")["template"].nunique().max()
    per_prompt = evaluated.groupby(["entry", "subject", "template"]).size().max()
    return (
        f"this run: {subjects} subject(s) × up to {prompts} prompt(s) × up to {per_prompt} image(s) per entry; "
        "published figures: 30 subjects × 25 prompts × 4 images"
    )


def _rows(board: pd.DataFrame, metrics: list[str], gallery_prefix: str, numbers: dict[str, int]):
    rows, classes = [], []
    for _, row in board.iterrows():
        published = row["source"] == "published"
        rank = "" if published or pd.isna(row.get("rank")) else str(int(row["rank"]))
        if published:
            number = numbers[row["citation"]]
            name = Cell(
                f"{row['entry']} (published [{number}])",
                f"{html.escape(row['entry'])}<span class='badge pub'>published [{number}]</span>",
                align_text=True,
            )
        else:
            badge = "<span class='badge smoke'>SMOKE</span>" if row["smoke"] else ""
            link = f"{gallery_prefix}gallery/index.html#{slug(row['entry'])}"
            name = Cell(
                f"{row['entry']}{' (smoke)' if row['smoke'] else ''}",
                f"<a href='{link}'>{html.escape(row['entry'])}</a>{badge}",
                align_text=True,
            )
        cells = [Cell(rank, classes="rank"), name]
        for metric in metrics:
            cells.append(estimate(row.get(f"{metric}_mean"), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"),
                                  n_subjects=np.nan if published else row.get(f"{metric}_n_subjects")))
        n_subjects = row.get(f"{metrics[0]}_n_subjects") if not published else np.nan
        cells += [Cell(fmt_int(n_subjects) if not published else "30"), image_counts(row, metrics) if not published else Cell("3000")]
        rows.append(cells)
        classes.append("published" if published else "")
    return rows, classes


def _headers(metrics: list[str], rank_by: str) -> tuple[list[str], list[str]]:
    headers = ["#", "Method"]
    titles = ["rank among this run's entries", "method cell (@ checkpoint); published rows are not ranked"]
    for metric in metrics:
        arrow = "↑" if metric_direction(metric) else ("↓" if metric_direction(metric) is False else "")
        headers.append(f"{metric_label(metric)} {arrow}{' (rank)' if metric == rank_by else ''}")
        titles.append(METRIC_MEANING.get(metric, metric))
    return [*headers, "subjects", "images"], [
        *titles, "subjects with values", "images each metric averaged (PRES: the class-prior images)"
    ]


def explanation(rank_by: str, resamples: int, confidence: float) -> str:
    direction = "higher first" if metric_direction(rank_by) is not False else "lower first"
    return (
        f"Ranked by {metric_label(rank_by)} ({direction}); entries whose shown values are equal share a rank. "
        "Values are means over images "
        f"with {confidence:.0%} confidence intervals from a hierarchical bootstrap ({resamples} resamples of subjects, "
        "then prompts within subjects; seeded). ↑ higher is better, ↓ lower is better. Published rows are the papers' "
        f"own figures on the full DreamBooth protocol, shown for orientation and never ranked. {FEW_NOTE}"
    )


SMOKE_SEPARATOR = (
    "Published figures — full DreamBooth protocol with real models and metric weights; "
    "not comparable with the smoke rows above"
)


NOTHING_SCORED = (
    "Nothing was scored: this run has no metric values (its metrics.names is empty, or scoring has not run), "
    "so there is no ranking. Score it with `subjectbench score RUN_DIR metrics.names=[clip_t,clip_i,dino,div,pres]`."
)


def nothing_scored(board: pd.DataFrame) -> bool:
    """True when none of this run's entries has a value for any metric."""
    ours = board[board["source"] == "this run"]
    columns = [c for c in ours.columns if c.endswith("_mean")]
    return ours.empty or not ours[columns].notna().any().any()


PARTIAL_SEPARATOR = (
    "Published figures — full DreamBooth protocol (30 subjects × 25 prompts × 4 images); "
    "this run measures less, so its rows are not ranked among them"
)


def _blocks(board: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """One table, or — for smoke runs — ours and the published figures in separate tables.
    When nothing was scored, only the published figures, under a title that says so."""
    if nothing_scored(board):
        return [("Published figures only (this run has no scores)", board[board["source"] == "published"])]
    if not board["apart"].astype(bool).any():
        return [(None, board)]
    published = board["source"] == "published"
    title = SMOKE_SEPARATOR if board["smoke"].astype(bool).any() else PARTIAL_SEPARATOR
    return [(None, board[~published]), (title, board[published])]


def leaderboard_html(
    board: pd.DataFrame, rank_by: str, smoke_reasons: list[str], coverage: str, resamples: int, confidence: float, heading: str = "h1"
) -> str:
    metrics = list(SHOWN_METRICS)
    numbers = citation_numbers()
    headers, titles = _headers(metrics, rank_by)
    tables = ""
    for title, part in _blocks(board):
        rows, classes = _rows(part, metrics, "", numbers)
        tables += (f"<h3>{html.escape(title)}</h3>" if title else "") + html_table(headers, rows, classes, titles)
    references = "".join(f"<li value='{n}'>{html.escape(reference(key))}</li>" for key, n in numbers.items())
    return (
        f"<{heading}>Leaderboard</{heading}>"
        + smoke_banner(smoke_reasons)
        + (f"<p class='warning'><strong>{html.escape(NOTHING_SCORED)}</strong></p>" if nothing_scored(board) else "")
        + f"<p class='note'>{html.escape(explanation(rank_by, resamples, confidence))}</p>"
        + f"<p class='note'>{html.escape(coverage)}. Method names link to their images in the gallery.</p>"
        + tables
        + f"<h3>Sources of the published figures</h3><ol class='refs'>{references}</ol>"
    )


def leaderboard_markdown(board: pd.DataFrame, rank_by: str, smoke_reasons: list[str], coverage: str, resamples: int, confidence: float) -> str:
    metrics = list(SHOWN_METRICS)
    numbers = citation_numbers()
    headers, _ = _headers(metrics, rank_by)
    tables = ""
    for title, part in _blocks(board):
        rows, _ = _rows(part, metrics, "", numbers)
        tables += (f"\n### {title}\n\n" if title else "") + markdown_table(headers, rows)
    references = "\n".join(f"[{n}] {reference(key)}" for key, n in numbers.items())
    return (
        "# Leaderboard\n\n"
        + smoke_markdown(smoke_reasons)
        + (f"**{NOTHING_SCORED}**\n\n" if nothing_scored(board) else "")
        + explanation(rank_by, resamples, confidence)
        + f"\n\n{coverage}.\n\n"
        + tables
        + f"\nSources of the published figures:\n\n{references}\n"
    )


def leaderboard_csv(board: pd.DataFrame) -> pd.DataFrame:
    keep = ["rank", "entry", "source", "citation", "smoke", "method", "cell_id", "checkpoint"]
    metric_columns = [c for c in board.columns if c.endswith(("_mean", "_ci_low", "_ci_high", "_n_subjects", "_n_images"))]
    out = board[[c for c in keep if c in board.columns] + metric_columns].copy()
    out["convention"] = [CONVENTIONS.get(c, "") for c in out["citation"]]
    out["citation"] = [CITATIONS.get(c, "") for c in out["citation"]]
    return out
