"""``subjectbench compare BASELINE CURRENT``: the paired regression check between two runs.

BASELINE may be a result bundle (``subjectbench export``): it records each image's sha256, so
the comparison is the same as against the run directory it was exported from.

Pairing. Two images are the same unit when they agree on their identity: method label, cell_id
(label + grid point), checkpoint, subject, role, prompt template, k and seed. The unit *key* is
deliberately not used: it hashes the method's fingerprint, so a changed method (new code
version, new default) gets new keys — and that change is exactly what a regression check
compares. Units only one run has are counted and listed, never compared.

Per method entry (cell @ checkpoint) × metric, over the paired images that both runs scored:
delta = mean(current − baseline), with a hierarchical bootstrap interval of the per-image
differences (subjects, then prompts within subjects; ``reports.stats``). A metric is
*significantly worse* when its whole interval lies beyond the tolerance on the bad side:
``ci_high < −tolerance`` when higher is better, ``ci_low > tolerance`` when lower is better
(PRES). Images are also compared byte for byte (SHA-256 of the PNG): when every paired image and
score is equal, the row reports exact equality instead of a statistic.

Beside the delta, each row gives P(current beats baseline) from the paired hierarchical bootstrap
of ``reports.ranking`` (the one used for the leaderboard's rank confidence) over the shared
(subject, prompt, image) units: each replicate draws subjects, then prompts, once for both runs,
and compares the two runs' means on that draw (an exact tie counts half). ``tie`` marks rows the
data cannot separate: neither run is better in more than the confidence level of the replicates
(at 95 %: 2.5 % < P < 97.5 %). Two identical runs give 50 % and a tie. This says how sure the
order is; the verdict (tolerance) says whether a change matters.

Exit code: 0 when nothing is significantly worse, 1 when something is (or, with
``fail_on_difference``, when any paired image or score differs), 2 for unusable input.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from reports.bundle import image_digests, read_source
from reports.ranking import percent, rank_confidence
from reports.render import Cell, estimate, fmt, markdown_table, text
from reports.rundata import ReportError, RunData, read_run
from reports.schema import metric_direction, metric_label, ordered_metrics
from reports.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    hierarchical_bootstrap,
)

IDENTITY = ["method", "cell_id", "checkpoint", "subject", "role", "template", "k", "seed"]
ENTRY = ["method", "cell_id", "checkpoint", "entry"]
DEFAULT_TOLERANCE = 0.01


@dataclass(frozen=True)
class Tolerance:
    """Absolute tolerance in each metric's own units; ``per_metric`` overrides ``default``."""

    default: float = DEFAULT_TOLERANCE
    per_metric: dict = field(default_factory=dict)

    def of(self, metric: str) -> float:
        return float(self.per_metric.get(metric, self.default))

    @classmethod
    def parse(cls, items: list[str] | None) -> Tolerance:
        """From CLI values: '0.02' sets the default, 'dino=0.01' one metric."""
        default, per_metric = DEFAULT_TOLERANCE, {}
        for item in items or []:
            name, _, value = item.rpartition("=")
            try:
                number = float(value)
            except ValueError:
                raise ReportError(f"--tolerance {item!r}: expected a number (0.01) or METRIC=NUMBER (dino=0.01)") from None
            if number < 0:
                raise ReportError(f"--tolerance {item!r}: a tolerance cannot be negative")
            if name:
                per_metric[name] = number
            else:
                default = number
        return cls(default, per_metric)


@dataclass
class Comparison:
    baseline: Path
    current: Path
    rows: pd.DataFrame  # one per entry × metric
    images: pd.DataFrame  # one per entry: pairs, identical, only-in-one-run
    warnings: list[str]
    tolerance: Tolerance
    resamples: int
    seed: int
    confidence: float
    fail_on_difference: bool = False

    @property
    def regressions(self) -> pd.DataFrame:
        return self.rows[self.rows["verdict"] == "worse"]

    @property
    def differs(self) -> bool:
        images_differ = (self.images["identical_images"] < self.images["pairs"]).any()
        values_differ = not self.rows.empty and (self.rows["verdict"] != "identical").any()
        return bool(images_differ or values_differ)

    @property
    def exit_code(self) -> int:
        if len(self.regressions):
            return 1
        return 1 if self.fail_on_difference and self.differs else 0


def _image_pairs(baseline: RunData, current: RunData) -> tuple[pd.DataFrame, pd.DataFrame]:
    columns = [*IDENTITY, "entry", "image"]
    base = baseline.images[columns] if not baseline.images.empty else pd.DataFrame(columns=columns)
    cur = current.images[columns] if not current.images.empty else pd.DataFrame(columns=columns)
    merged = base.merge(cur, on=IDENTITY, how="outer", suffixes=("_baseline", "_current"), indicator=True)
    merged["entry"] = merged["entry_current"].fillna(merged["entry_baseline"])
    pairs = merged[merged["_merge"] == "both"].copy()
    # A bundle records its images' sha256 instead of holding the PNGs.
    base_digests, current_digests = image_digests(baseline), image_digests(current)
    pairs["identical"] = [
        (a := base_digests.get(b)) is not None and a == current_digests.get(c)
        for b, c in zip(pairs["image_baseline"], pairs["image_current"])
    ]
    rows = []
    for key, frame in merged.groupby(ENTRY, sort=False, dropna=False):
        both = pairs.merge(frame[IDENTITY], on=IDENTITY) if len(pairs) else pairs
        rows.append(
            {
                **dict(zip(ENTRY, key)),
                "pairs": int((frame["_merge"] == "both").sum()),
                "identical_images": int(both["identical"].sum()) if len(both) else 0,
                "baseline_only": int((frame["_merge"] == "left_only").sum()),
                "current_only": int((frame["_merge"] == "right_only").sum()),
            }
        )
    return pairs, pd.DataFrame(rows, columns=[*ENTRY, "pairs", "identical_images", "baseline_only", "current_only"])


def _verdict(higher: bool | None, low: float, high: float, tolerance: float) -> str:
    if higher is None or math.isnan(low):
        return "no direction" if higher is None else "no data"
    worse = high < -tolerance if higher else low > tolerance
    better = low > tolerance if higher else high < -tolerance
    return "worse" if worse else ("better" if better else "no significant change")


def beat_probability(
    frame: pd.DataFrame, higher: bool | None, resamples: int, seed: int, confidence: float
) -> tuple[float, bool]:
    """P(current beats baseline) and whether the data cannot separate them, from the paired
    bootstrap of ``reports.ranking`` over the units both runs have a value for (NaN, False when
    the metric has no direction or no such unit)."""
    both = frame[frame["value_baseline"].notna() & frame["value_current"].notna()]
    if higher is None or both.empty:
        return float("nan"), False
    units = both[["subject", "template"]]
    long = pd.concat([units.assign(entry="baseline", value=both["value_baseline"].to_numpy(float)),
                      units.assign(entry="current", value=both["value_current"].to_numpy(float))]).assign(metric="paired")
    result = rank_confidence(long, "paired", higher, resamples, seed, confidence)
    current, baseline = result.entries.index("current"), result.entries.index("baseline")
    return float(result.beats[current, baseline]), not result.separable(current, baseline)


def compare_runs(
    baseline_dir: str | Path,
    current_dir: str | Path,
    tolerance: Tolerance | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    fail_on_difference: bool = False,
) -> Comparison:
    tolerance = tolerance or Tolerance()
    baseline, current = read_source(baseline_dir), read_run(current_dir)
    pairs, images = _image_pairs(baseline, current)
    if pairs.empty:
        raise ReportError(
            f"{baseline.root} and {current.root} share no finished image units (same method label, cell, "
            "checkpoint, subject, prompt, k and seed); compare runs of the same suite and protocol"
        )
    warnings = []
    for metric in sorted(set(baseline.fingerprints) & set(current.fingerprints)):
        b, c = baseline.fingerprints[metric]["hash"], current.fingerprints[metric]["hash"]
        if b != c:
            warnings.append(
                f"metric {metric}: fingerprint differs (baseline {b}, current {c}); its deltas mix a metric change with a method change"
            )
    for metric in sorted(set(baseline.fingerprints) ^ set(current.fingerprints)):
        warnings.append(f"metric {metric} is scored in only one of the runs; it is not compared")
    if (images["baseline_only"] > 0).any() or (images["current_only"] > 0).any():
        warnings.append(
            f"{int(images['baseline_only'].sum())} image unit(s) only in the baseline and "
            f"{int(images['current_only'].sum())} only in the current run are not compared"
        )
    value_columns = [*IDENTITY, "metric", "value"]
    scored = baseline.long[value_columns].merge(current.long[value_columns], on=[*IDENTITY, "metric"], suffixes=("_baseline", "_current"))
    scored = scored.merge(pairs[[*IDENTITY, "entry", "identical"]], on=IDENTITY)
    rows = []
    for (method, cell_id, checkpoint, entry, metric), frame in scored.groupby([*ENTRY, "metric"], sort=False):
        before = frame["value_baseline"].to_numpy(float)
        after = frame["value_current"].to_numpy(float)
        difference = after - before
        higher = metric_direction(metric, current.fingerprints.get(metric, {}).get("fingerprint"))
        same_values = bool(np.array_equal(before, after, equal_nan=True))
        identical = same_values and bool(frame["identical"].all())
        result = hierarchical_bootstrap(difference, frame["subject"].to_numpy(), frame["template"].to_numpy(), resamples, seed, confidence)
        verdict = "identical" if identical else _verdict(higher, result.low, result.high, tolerance.of(metric))
        p_better, tie = beat_probability(frame, higher, resamples, seed, confidence)
        rows.append(
            {
                "method": method, "cell_id": cell_id, "checkpoint": checkpoint, "entry": entry, "metric": metric,
                "pairs": len(frame), "subjects": result.n_subjects,
                "identical_images": int(frame["identical"].sum()), "identical_values": int((before == after).sum()),
                "baseline_mean": float(np.nanmean(before)) if (~np.isnan(before)).any() else np.nan,
                "current_mean": float(np.nanmean(after)) if (~np.isnan(after)).any() else np.nan,
                "delta": result.mean, "ci_low": result.low, "ci_high": result.high,
                "higher_is_better": higher, "tolerance": tolerance.of(metric), "verdict": verdict,
                "p_current_better": p_better, "tie": tie,
            }
        )
    columns = ["method", "cell_id", "checkpoint", "entry", "metric", "pairs", "subjects", "identical_images",
               "identical_values", "baseline_mean", "current_mean", "delta", "ci_low", "ci_high", "higher_is_better",
               "tolerance", "verdict", "p_current_better", "tie"]
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        warnings.append("no metric is scored in both runs: only image bytes are compared")
    else:
        rank = {m: i for i, m in enumerate(ordered_metrics(table["metric"].unique()))}
        entry_rank = {e: i for i, e in enumerate(images["entry"])}
        table = table.assign(_e=table["entry"].map(entry_rank), _m=table["metric"].map(rank)).sort_values(["_e", "_m"]).drop(columns=["_e", "_m"])
    return Comparison(baseline.root, current.root, table.reset_index(drop=True), images, warnings, tolerance,
                      resamples, seed, confidence, fail_on_difference)


def _json_value(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def comparison_json(comparison: Comparison) -> dict:
    def records(frame: pd.DataFrame) -> list[dict]:
        return [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict("records")]

    return {
        "baseline": str(comparison.baseline),
        "current": str(comparison.current),
        "exit_code": comparison.exit_code,
        "regressions": len(comparison.regressions),
        "pairing": IDENTITY,
        "tolerance": {"default": comparison.tolerance.default, **comparison.tolerance.per_metric},
        "bootstrap": {"resamples": comparison.resamples, "seed": comparison.seed, "confidence": comparison.confidence,
                      "method": "hierarchical (subjects, then prompts within subjects) over paired per-image differences"},
        "fail_on_difference": comparison.fail_on_difference,
        "warnings": comparison.warnings,
        "metrics": records(comparison.rows),
        "images": records(comparison.images),
    }


def _probability(p: float, tie: bool) -> str:
    return f"{percent(p)} (tie)" if tie and not pd.isna(p) else percent(p)


def comparison_markdown(comparison: Comparison) -> str:
    verdict = "FAIL: significant regression" if len(comparison.regressions) else (
        "FAIL: outputs differ (--fail-on-difference)" if comparison.exit_code else "PASS")
    lines = [
        "# Comparison", "",
        f"- baseline: `{comparison.baseline}`",
        f"- current: `{comparison.current}`",
        f"- result: **{verdict}** (exit code {comparison.exit_code})",
        f"- delta = current − baseline over paired images; {comparison.confidence:.0%} CI from a hierarchical bootstrap "
        f"({comparison.resamples} resamples of subjects, then prompts; seed {comparison.seed}); 'worse' = the whole CI beyond "
        f"the tolerance on the bad side (default tolerance {comparison.tolerance.default:g}"
        + "".join(f", {m} {t:g}" for m, t in comparison.tolerance.per_metric.items()) + ")",
        f"- P(current better): share of the replicates of the leaderboard's rank-confidence bootstrap (subjects, then "
        f"prompts, drawn once for both runs; same seed) in which the current run's mean is better; 'tie' = the data cannot "
        f"separate the runs (neither better in more than {1 - (1 - comparison.confidence) / 2:.1%} of replicates)",
        f"- images paired by {', '.join(IDENTITY)} (not by key, which changes with the method's fingerprint)", "",
    ]
    lines += [f"> warning: {w}" for w in comparison.warnings]
    if comparison.warnings:
        lines.append("")
    headers = ["entry", "metric", "pairs", "baseline", "current", "delta [CI]", "P(current better)", "tolerance", "verdict"]
    rows = []
    for _, row in comparison.rows.iterrows():
        arrow = {True: " ↑", False: " ↓"}.get(row["higher_is_better"], "")
        if row["verdict"] == "identical":
            delta = Cell(f"0 (exact: {row['identical_images']}/{row['pairs']} images bit-identical)")
        else:
            delta = estimate(row["delta"], row["ci_low"], row["ci_high"], 4)
        verdict_text = row["verdict"].upper() if row["verdict"] == "worse" else row["verdict"]
        rows.append([text(row["entry"]), text(metric_label(row["metric"]) + arrow), Cell(str(row["pairs"])),
                     Cell(fmt(row["baseline_mean"], 4)), Cell(fmt(row["current_mean"], 4)), delta,
                     Cell(_probability(row["p_current_better"], row["tie"])), Cell(f"{row['tolerance']:g}"), text(verdict_text)])
    lines.append(markdown_table(headers, rows))
    headers = ["entry", "paired images", "bit-identical", "baseline only", "current only"]
    rows = [[text(r["entry"]), Cell(str(r["pairs"])), Cell(str(r["identical_images"])), Cell(str(r["baseline_only"])),
             Cell(str(r["current_only"]))] for _, r in comparison.images.iterrows()]
    lines += ["## Images", "", markdown_table(headers, rows)]
    return "\n".join(lines)


def write_comparison(comparison: Comparison, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, document = out_dir / "compare.md", out_dir / "compare.json"
    markdown.write_text(comparison_markdown(comparison), encoding="utf-8")
    document.write_text(json.dumps(comparison_json(comparison), indent=1), encoding="utf-8")
    return markdown, document
