"""Honest checkpoint selection: how much picking the best cell of a sweep buys, and how much of it is real.

When one method entry (a *family*: one suite label, at one single-image choice) holds several
cells — checkpoints of one training, grid points of a sweep — a paper usually reports the best
one, chosen on the very prompts it is scored on. That number is optimistic. Per family the
leaderboard shows three choices, each scored by the selection *criterion*:

(a) **fixed**: the protocol's choice, made before looking at any score: the ``final``
    checkpoint (the configured training length; a method without one: its last checkpoint) at
    the method's default value of every grid parameter (``Params`` defaults; sampler axes: the
    protocol sampler's defaults, DDIM 50 steps, guidance 7.5). A grid that does not hold that
    point has no fixed row value, and says which default is missing.
(b) **best on test prompts** (optimistic): the cell with the best criterion over all prompts,
    scored on those same prompts. (b) ≥ (a) by construction.
(c) **held-out** (2-fold cross-selection): each subject's evaluated prompts, in protocol order
    (``prompt_index``), alternate between half A (1st, 3rd, …) and half B (2nd, 4th, …). The
    cell chosen on A is scored on B, the cell chosen on B is scored on A, and the two folds are
    pooled image-weighted (so every prompt is scored by a cell chosen without it; when both
    halves choose the same cell this is that cell's plain mean).

Criterion: one metric (default: the report's ranking metric, DINO unless ``--rank-by`` says
otherwise) in its own direction, or a weighted sum written ``dino+clip_t`` or ``0.7*dino+0.3*clip_t``
of metric means, where a lower-is-better metric enters negated; higher sums are better. Only
evaluated images (role ``eval``) count. Exact criterion ties keep the fixed choice, then the
earlier cell.

Uncertainty: the paired hierarchical bootstrap of ``reports.ranking`` (subjects, then prompts,
drawn once for every cell), with the **selection redone inside every replicate**, so the
intervals include the luck of the choice. 'gain' is the paired difference to (a) per replicate.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.ranking import paired_cells, paired_draws
from reports.render import Cell, estimate, html_table, markdown_table, text
from reports.rundata import ReportError
from reports.schema import metric_direction, metric_label
from reports.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED

FINAL = "final"
ALL_IMAGES = "all"
CHOICES = {
    "fixed": "fixed (protocol's choice)",
    "best_on_test": "best on test prompts (optimistic)",
    "held_out": "chosen on held-out half (2-fold)",
    "only": "only cell (no selection)",
}
SPLIT = ("each subject's evaluated prompts in protocol order alternate between half A (1st, 3rd, ...) and "
         "half B (2nd, 4th, ...); chosen on A → scored on B, chosen on B → scored on A, pooled")
_TERM = re.compile(r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*$")


@dataclass(frozen=True)
class Criterion:
    """What a selection maximizes: one metric in its direction, or a weighted sum of metric means."""

    terms: tuple[tuple[str, float], ...]  # (metric, weight)
    signs: tuple[float, ...]  # +1 higher is better, −1 lower is better

    @property
    def metrics(self) -> list[str]:
        return [metric for metric, _ in self.terms]

    @property
    def single(self) -> bool:
        return len(self.terms) == 1 and self.terms[0][1] == 1.0

    @property
    def higher_is_better(self) -> bool:
        return not self.single or self.signs[0] > 0

    @property
    def label(self) -> str:
        if self.single:
            return metric_label(self.terms[0][0])
        parts = [("−" if sign < 0 else "") + (f"{w:g}·" if w != 1.0 else "") + metric_label(m)
                 for (m, w), sign in zip(self.terms, self.signs)]
        return " + ".join(parts).replace("+ −", "− ")

    @property
    def spec(self) -> str:
        return "+".join(m if w == 1.0 else f"{w:g}*{m}" for m, w in self.terms)

    @classmethod
    def parse(cls, spec: str, valid: list[str] | None = None) -> Criterion:
        """'dino', 'dino+clip_t' or '0.7*dino+0.3*clip_t'; ``valid``: the metrics this run has."""
        terms, signs = [], []
        for part in str(spec).split("+"):
            match = _TERM.match(part)
            if not match:
                raise ReportError(
                    f"--select-by {spec!r}: cannot read {part.strip()!r}; write a metric (dino), or a weighted "
                    "sum of metrics (dino+clip_t, 0.7*dino+0.3*clip_t)")
            metric, weight = match["metric"], float(match["weight"] or 1.0)
            if valid is not None and metric not in valid:
                raise ReportError(f"--select-by {spec!r}: {metric!r} is not a metric of this run; valid: {', '.join(valid)}")
            direction = metric_direction(metric)
            if direction is None:
                raise ReportError(f"--select-by {spec!r}: {metric!r} has no better direction, so it cannot choose a cell")
            if weight <= 0 or metric in [t for t, _ in terms]:
                raise ReportError(f"--select-by {spec!r}: give each metric once, with a positive weight")
            terms.append((metric, weight))
            signs.append(1.0 if direction else -1.0)
        return cls(tuple(terms), tuple(signs))

    def shown(self, scores: np.ndarray) -> np.ndarray:
        """Internal scores (higher better) in the criterion's shown units (a single metric: its mean)."""
        return scores * self.signs[0] if self.single else scores


@dataclass(frozen=True)
class FamilySelection:
    """One family's three choices; ``*_scores`` hold the point estimate at [0], then one value per replicate."""

    family: str
    cells: list[str]  # entries of the family, fixed choice first
    fixed: str | None  # the fixed choice's entry, or None with ``fixed_note`` saying why
    fixed_note: str
    best: str
    chosen_on_a: str
    chosen_on_b: str
    fixed_scores: np.ndarray
    best_scores: np.ndarray
    held_out_scores: np.ndarray
    n_subjects: int


def _close(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _defaults(method_name: str) -> dict | None:
    """The method's parameter defaults and the protocol sampler's; None when it cannot be loaded."""
    from methods.base import SamplerConfig
    from methods.registry import get_method

    try:
        params = get_method(method_name).Params
    except Exception:  # a method whose plugin is not installed here: no fixed choice, said so
        return None
    values = {f.name: getattr(SamplerConfig(), f.name) for f in dataclasses.fields(SamplerConfig)}
    for f in dataclasses.fields(params):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


def fixed_choice(cells: pd.DataFrame) -> tuple[str | None, str]:
    """The protocol's choice among a family's cells (one row each: entry, checkpoint,
    checkpoint_index, grid, method_name), and a note when there is none."""
    method_name = str(cells["method_name"].iloc[0]) if "method_name" in cells else ""
    defaults = _defaults(method_name)
    if defaults is None:
        return None, f"method {method_name!r} cannot be loaded here, so its defaults are unknown"
    checkpoints = cells["checkpoint"].astype(str)
    if (checkpoints == FINAL).any():
        wanted = FINAL
    else:
        wanted = str(cells.loc[cells["checkpoint_index"].astype(int).idxmax(), "checkpoint"])
    candidates = cells[checkpoints == wanted]
    missing = set()
    for _, row in candidates.iterrows():
        grid = json.loads(row["grid"]) if isinstance(row.get("grid"), str) and row["grid"] else {}
        grid.pop("train_image", None)  # the single-image choice is part of the family, not a selection
        off = [f"{name}={defaults.get(name, '?')}" for name, value in grid.items()
               if name not in defaults or not _close(value, defaults[name])]
        if not off:
            return str(row["entry"]), ""
        missing.update(off)
    return None, "no cell at the defaults " + ", ".join(sorted(missing)) + f" and checkpoint {wanted}"


def _halves(grid: pd.DataFrame, frame: pd.DataFrame, shape: tuple[int, int]) -> np.ndarray:
    """(subjects, slots): 0 for half A, 1 for half B, −1 for padding; prompts alternate in protocol order."""
    by = ["prompt_index"] if "prompt_index" in frame else []  # without it (older tables): template order
    order = frame.drop_duplicates(["subject", "template"])[["subject", "template", *by]]
    order = grid.merge(order.astype({"subject": str, "template": str}), on=["subject", "template"], how="left")
    order = order.sort_values(["s", *by, "template"], kind="stable")
    order["half"] = order.groupby("s").cumcount() % 2
    halves = np.full(shape, -1, dtype=np.int64)
    halves[order["s"].to_numpy(), order["slot"].to_numpy()] = order["half"].to_numpy()
    return halves


def _family_names(frame: pd.DataFrame) -> pd.Series:
    if "train_image" not in frame:
        return frame["method"].astype(str)
    choice = frame["train_image"].astype(str)
    return pd.Series([m if c == ALL_IMAGES else f"{m} [train_image={c}]" for m, c in zip(frame["method"].astype(str), choice)],
                     index=frame.index)


def _pick(scores: np.ndarray) -> np.ndarray:
    """Per replicate (rows), the column with the best score; the first on exact ties; −1 when all NaN."""
    filled = np.where(np.isnan(scores), -np.inf, scores)
    best = filled.argmax(axis=1)
    return np.where(np.isfinite(filled.max(axis=1)), best, -1)


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values (R, C, …) at column index[r] per row r; NaN where index is −1."""
    taken = np.take_along_axis(values, np.maximum(index, 0).reshape(-1, *([1] * (values.ndim - 1))), axis=1)[:, 0]
    return np.where((index < 0).reshape(-1, *([1] * (taken.ndim - 1))), np.nan, taken)


def select_cells(
    long: pd.DataFrame,
    criterion: Criterion,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[FamilySelection]:
    """The three choices of every family of ``long`` (module docstring), in the order families appear."""
    if long.empty:
        return []
    frame = long[long["metric"].isin(criterion.metrics) & long["value"].notna()]
    if "role" in frame:
        frame = frame[frame["role"] == "eval"]
    if frame.empty:
        return []
    frame = frame.assign(family=_family_names(frame))
    info_columns = [c for c in ("entry", "family", "checkpoint", "checkpoint_index", "grid", "method_name") if c in frame]
    cells = frame.drop_duplicates("entry")[info_columns].reset_index(drop=True)
    families = {}
    for family, members in cells.groupby("family", sort=False):
        fixed, note = fixed_choice(members) if len(members) > 1 else (str(members["entry"].iloc[0]), "")
        order = members.sort_values("checkpoint_index", kind="stable") if "checkpoint_index" in members else members
        entries = [str(e) for e in order["entry"]]
        if fixed is not None:
            entries = [fixed, *[e for e in entries if e != fixed]]
        families[family] = (entries, fixed, note)
    entries = [e for members, _, _ in families.values() for e in members]
    metrics = criterion.metrics
    keys = [f"{e}\x1f{m}" for e in entries for m in metrics]
    keyed = frame.assign(entry=frame["entry"].astype(str) + "\x1f" + frame["metric"].astype(str))
    sums, counts, prompt_counts, grid = paired_cells(keyed, keys)
    halves = _halves(grid, frame, sums.shape[1:])
    draws = paired_draws(prompt_counts, resamples, seed)
    per_half = []
    for half in (0, 1):  # point estimate first, then the replicates
        mask = (halves == half)[None]
        total, count = draws.totals(sums * mask, counts * mask)
        point_total, point_count = (sums * mask).sum(axis=(1, 2)), (counts * mask).sum(axis=(1, 2))
        shape = (resamples + 1, len(entries), len(metrics))
        per_half.append((np.vstack([point_total, total]).reshape(shape), np.vstack([point_count, count]).reshape(shape)))
    (total_a, count_a), (total_b, count_b) = per_half
    weights = np.array([w for _, w in criterion.terms]) * np.array(criterion.signs)

    def score(total, count):
        with np.errstate(invalid="ignore", divide="ignore"):
            return (total / count * weights).sum(axis=2)  # a metric missing for a cell makes its score NaN

    results = []
    start = 0
    for family, (members, fixed, note) in families.items():
        columns = slice(start, start + len(members))
        start += len(members)
        full = score(total_a[:, columns] + total_b[:, columns], count_a[:, columns] + count_b[:, columns])
        on_a = score(total_a[:, columns], count_a[:, columns])
        on_b = score(total_b[:, columns], count_b[:, columns])
        best = _pick(full)
        chosen_a, chosen_b = _pick(on_a), _pick(on_b)
        # every prompt scored by a cell chosen without it: A's choice on B's prompts, B's on A's
        pooled_total = _take(total_b[:, columns], chosen_a) + _take(total_a[:, columns], chosen_b)
        pooled_count = _take(count_b[:, columns], chosen_a) + _take(count_a[:, columns], chosen_b)
        held_out = score(pooled_total[:, None], pooled_count[:, None])[:, 0]
        n_subjects = int(frame[frame["entry"].astype(str).isin(members)]["subject"].nunique())
        results.append(FamilySelection(
            family=family, cells=members, fixed=fixed, fixed_note=note,
            best=members[best[0]] if best[0] >= 0 else "",
            chosen_on_a=members[chosen_a[0]] if chosen_a[0] >= 0 else "",
            chosen_on_b=members[chosen_b[0]] if chosen_b[0] >= 0 else "",
            fixed_scores=full[:, 0] if fixed is not None else np.full(resamples + 1, np.nan),
            best_scores=_take(full, best), held_out_scores=held_out, n_subjects=n_subjects,
        ))
    return results


def _interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    kept = replicates[~np.isnan(replicates)]
    if len(kept) == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(kept, [alpha, 1.0 - alpha])
    return float(low), float(high)


COLUMNS = ["family", "choice", "cells", "n_cells", "criterion", "value", "ci_low", "ci_high", "gain_vs_fixed",
           "gain_ci_low", "gain_ci_high", "n_subjects", "note"]


def selection_table(
    results: list[FamilySelection], criterion: Criterion, confidence: float = DEFAULT_CONFIDENCE
) -> pd.DataFrame:
    """One row per family and choice (a single-cell family: one row); values in the criterion's units."""
    rows = []
    for result in results:
        base = {"family": result.family, "n_cells": len(result.cells), "criterion": criterion.spec,
                "n_subjects": result.n_subjects}
        if len(result.cells) == 1:
            choices = [("only", result.cells[0], result.fixed_scores, "")]
        else:
            held_out = (f"{result.chosen_on_a} (both halves)" if result.chosen_on_a == result.chosen_on_b
                        else f"{result.chosen_on_a} (chosen on A, scored on B); {result.chosen_on_b} (chosen on B, scored on A)")
            choices = [
                ("fixed", result.fixed or "", result.fixed_scores, result.fixed_note),
                ("best_on_test", result.best, result.best_scores, "optimistic: chosen and scored on the same prompts"),
                ("held_out", held_out if result.chosen_on_a and result.chosen_on_b else "", result.held_out_scores,
                 SPLIT if not np.isnan(result.held_out_scores[0]) else "no held-out choice: a half of the prompts has no "
                 "values (each subject needs at least two evaluated prompts)"),
            ]
        for choice, cells, scores, note in choices:
            shown = criterion.shown(scores)
            low, high = _interval(shown[1:], confidence)
            gain_shown = scores - result.fixed_scores  # always positive = better than the fixed choice (PRES too)
            gain_low, gain_high = _interval(gain_shown[1:], confidence)
            fixed_row = choice in ("fixed", "only")
            rows.append({**base, "choice": choice, "cells": cells, "value": float(shown[0]), "ci_low": low, "ci_high": high,
                         "gain_vs_fixed": np.nan if fixed_row else float(gain_shown[0]),
                         "gain_ci_low": np.nan if fixed_row else gain_low, "gain_ci_high": np.nan if fixed_row else gain_high,
                         "note": note})
    return pd.DataFrame(rows, columns=COLUMNS)


def explanation(criterion: Criterion, resamples: int, confidence: float) -> str:
    direction = "higher is better" if criterion.higher_is_better else "lower is better"
    combination = ("" if criterion.single else
                   " (a sum of metric means; lower-is-better metrics enter negated)")
    return (
        f"How much choosing the best cell buys. Per method family with several cells (checkpoints, grid points), "
        f"each choice is scored by the selection criterion {criterion.label}{combination}, {direction}. "
        "Fixed: the protocol's choice, made before any score (the final checkpoint at the method's default "
        "parameters). Best on test prompts: the best cell chosen on the very prompts it is scored on — optimistic, "
        "the way a sweep's best number is often reported. Held-out: " + SPLIT + ". "
        f"{confidence:.0%} intervals from the paired bootstrap of the rank confidence ({resamples} replicates of "
        "subjects, then prompts, drawn once for every cell) with the choice redone in every replicate; 'gain' is the "
        "paired difference to the fixed choice (in the criterion's direction: positive = better). The gap between "
        "the optimistic and the held-out row is what choosing on the test prompts adds by luck."
    )


def _rows(table: pd.DataFrame) -> list[list[Cell]]:
    rows = []
    for _, row in table.iterrows():
        gain = (Cell("—") if pd.isna(row["gain_vs_fixed"])
                else estimate(row["gain_vs_fixed"], row["gain_ci_low"], row["gain_ci_high"]))
        note = row["note"] if row["choice"] in ("fixed", "only") or pd.isna(row["value"]) else ""
        rows.append([text(row["family"]), text(CHOICES[row["choice"]]), text(row["cells"] or "—"),
                     estimate(row["value"], row["ci_low"], row["ci_high"], n_subjects=row["n_subjects"]), gain,
                     text(note or "")])
    return rows


HEADERS = ["Family", "Choice", "Cell(s)", "Criterion [CI]", "Gain vs fixed [CI]", "Note"]


def selection_html(table: pd.DataFrame, criterion: Criterion, resamples: int, confidence: float, heading: str = "h2") -> str:
    if table.empty:
        return ""
    classes = ["optimistic" if c == "best_on_test" else "" for c in table["choice"]]
    return (
        f"<{heading} id='selection'>Checkpoint and cell selection</{heading}>"
        f"<p class='note'>{html.escape(explanation(criterion, resamples, confidence))}</p>"
        + html_table(HEADERS, _rows(table), classes)
    )


def selection_markdown(table: pd.DataFrame, criterion: Criterion, resamples: int, confidence: float) -> str:
    if table.empty:
        return ""
    return (f"\n## Checkpoint and cell selection\n\n{explanation(criterion, resamples, confidence)}\n\n"
            + markdown_table(HEADERS, _rows(table)))
