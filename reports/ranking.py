"""Rank confidence: how sure the data are of the leaderboard's order.

A **paired** hierarchical bootstrap (the resampling of ``reports.stats``: subjects with
replacement, then prompts with replacement within each drawn subject, every image of a drawn
prompt kept) in which one replicate draws its subjects and prompts **once for all entries**, so
every entry is scored on the same resampled benchmark. Per replicate the entries are ranked by
their image-weighted means of the ranking metric, in its direction.

- ``P(rank k)``: the share of replicates in which the entry has rank k. Entries with equal
  replicate means share their ranks evenly (two entries tied at ranks 1–2 get ½ of each), so
  two identical entries get 50/50, never 100/100.
- ``P(A beats B)``: the share of replicates in which A's mean is better than B's, counting an
  exact tie as half. ``P(A beats B) + P(B beats A) = 1``.
- **Ties the data cannot separate**: A and B when neither beats the other in more than the
  confidence level of the replicates (at 95 %: 2.5 % < P(A beats B) < 97.5 %). Each entry lists
  them (``tied_with``); the rank interval is the central ``confidence`` range of its ranks.

Entries without any value of the metric are left out. A (subject, prompt) that an entry has no
value for adds nothing to that entry's replicate; an entry with no values in a replicate ranks
last in it. The RNG is ``numpy.random.default_rng(seed)``: a rebuilt report gives the same table.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.render import Cell, html_table, markdown_table
from reports.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED


@dataclass(frozen=True)
class RankConfidence:
    metric: str
    higher_is_better: bool
    entries: list[str]  # in order of their mean, best first
    means: np.ndarray  # (E,) plain means over images
    rank_probabilities: np.ndarray  # (E, E): [entry, k-1] = P(rank k)
    beats: np.ndarray  # (E, E): [a, b] = P(a beats b); diagonal NaN
    rank_low: np.ndarray  # (E,) central-interval bounds of the bootstrap ranks
    rank_high: np.ndarray
    expected_rank: np.ndarray
    n_subjects: int
    resamples: int
    confidence: float

    def separable(self, a: int, b: int) -> bool:
        alpha = (1.0 - self.confidence) / 2.0
        return not alpha < self.beats[a, b] < 1.0 - alpha

    def tied_with(self, a: int) -> list[str]:
        return [self.entries[b] for b in range(len(self.entries)) if b != a and not self.separable(a, b)]

    def rank_table(self) -> pd.DataFrame:
        """One row per entry: mean, expected rank, rank interval, P(rank k) columns, tied_with."""
        table = pd.DataFrame({
            "entry": self.entries,
            f"{self.metric}_mean": self.means,
            "expected_rank": self.expected_rank,
            "rank_low": self.rank_low,
            "rank_high": self.rank_high,
        })
        for k in range(len(self.entries)):
            table[f"p_rank_{k + 1}"] = self.rank_probabilities[:, k]
        table["tied_with"] = ["; ".join(self.tied_with(a)) for a in range(len(self.entries))]
        return table

    def beats_table(self) -> pd.DataFrame:
        """Square: row A, column B holds P(A beats B)."""
        return pd.DataFrame(self.beats, index=pd.Index(self.entries, name="entry"), columns=self.entries).reset_index()


def paired_cells(frame: pd.DataFrame, entries: list[str]):
    """Sums and counts per (entry, subject, prompt slot) on one shared (subject, prompt) grid.

    ``frame``: columns entry, subject, template, value (no NaN). Returns (sums, counts) of shape
    (entries, subjects, widest prompt count), the prompt count of each subject, and the grid
    itself: a frame of (subject, template, s, slot) naming what each (subject index, slot) holds."""
    subjects = frame["subject"].astype(str).to_numpy()
    prompts = frame["template"].astype(str).to_numpy()
    subject_codes, subject_index = np.unique(subjects, return_inverse=True)
    pairs = pd.DataFrame({"s": subject_index, "p": prompts}).drop_duplicates().sort_values(["s", "p"])
    pairs["slot"] = pairs.groupby("s").cumcount()
    slot_of = {(s, p): slot for s, p, slot in pairs[["s", "p", "slot"]].itertuples(index=False)}
    prompt_counts = np.bincount(pairs["s"].to_numpy(), minlength=len(subject_codes))
    entry_index = {e: i for i, e in enumerate(entries)}
    sums = np.zeros((len(entries), len(subject_codes), int(prompt_counts.max())))
    counts = np.zeros_like(sums)
    e = frame["entry"].map(entry_index).to_numpy()
    slots = np.array([slot_of[(s, p)] for s, p in zip(subject_index, prompts)], dtype=np.int64)
    np.add.at(sums, (e, subject_index, slots), frame["value"].to_numpy(dtype=np.float64))
    np.add.at(counts, (e, subject_index, slots), 1.0)
    grid = pd.DataFrame({"subject": subject_codes[pairs["s"].to_numpy()], "template": pairs["p"].to_numpy(),
                         "s": pairs["s"].to_numpy(), "slot": pairs["slot"].to_numpy()})
    return sums, counts, prompt_counts, grid


@dataclass(frozen=True)
class PairedDraws:
    """One hierarchical bootstrap draw per replicate, shared by every entry: ``subjects[b, i]`` is
    the i-th subject drawn in replicate b, ``prompts[b, i, j]`` the j-th prompt slot drawn within it
    (``used`` masks the slots beyond that subject's prompt count)."""

    subjects: np.ndarray  # (B, S, P)
    prompts: np.ndarray  # (B, S, P)
    used: np.ndarray  # (B, S, P) bool

    def totals(self, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per replicate and entry, the drawn values' sum and count: two (B, E) arrays."""
        n_entries = sums.shape[0]
        total = np.empty((self.used.shape[0], n_entries))
        count = np.empty_like(total)
        for e in range(n_entries):  # the same draws for every entry: a paired bootstrap
            total[:, e] = np.where(self.used, sums[e][self.subjects, self.prompts], 0.0).sum(axis=(1, 2))
            count[:, e] = np.where(self.used, counts[e][self.subjects, self.prompts], 0.0).sum(axis=(1, 2))
        return total, count


def paired_draws(prompt_counts: np.ndarray, resamples: int, seed: int) -> PairedDraws:
    """Subjects with replacement, then prompts with replacement within each drawn subject."""
    n_subjects, max_prompts = len(prompt_counts), int(np.max(prompt_counts))
    rng = np.random.default_rng(seed)
    drawn_subjects = rng.integers(0, n_subjects, size=(resamples, n_subjects))
    drawn_counts = prompt_counts[drawn_subjects][..., None]
    drawn_prompts = np.floor(rng.random((resamples, n_subjects, max_prompts)) * drawn_counts).astype(np.int64)
    used = np.arange(max_prompts)[None, None, :] < drawn_counts
    rows = np.broadcast_to(drawn_subjects[..., None], drawn_prompts.shape)
    return PairedDraws(rows, drawn_prompts, used)


def _shared_ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate (rows), each entry's share of every rank: ties split their ranks evenly.

    ``scores``: (B, E), larger is better, NaN worst. Returns (B, E, E) shares and (B, E) mid-ranks."""
    filled = np.where(np.isnan(scores), -np.inf, scores)
    better = (filled[:, None, :] > filled[:, :, None]).sum(axis=2)  # how many beat each entry
    equal = (filled[:, None, :] == filled[:, :, None]).sum(axis=2)  # itself included
    ranks = np.arange(scores.shape[1])[None, None, :]  # 0-based rank positions
    first, size = better[..., None], equal[..., None]
    shares = np.where((ranks >= first) & (ranks < first + size), 1.0 / size, 0.0)
    return shares, better + (equal + 1) / 2.0


def rank_confidence(
    long: pd.DataFrame,
    metric: str,
    higher_is_better: bool = True,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> RankConfidence | None:
    """Rank probabilities and pairwise win probabilities of the entries of ``long`` (columns
    entry, subject, template, metric, value) on ``metric``; None when fewer than two entries have
    values for it."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    frame = long[(long["metric"] == metric) & long["value"].notna()] if not long.empty else long
    if frame.empty or frame["entry"].nunique() < 2:
        return None
    sign = 1.0 if higher_is_better else -1.0
    means = frame.groupby("entry", sort=False)["value"].mean()
    order = means.sort_values(ascending=not higher_is_better, kind="stable").index
    entries = [str(e) for e in order]
    sums, counts, prompt_counts, _ = paired_cells(frame, entries)
    total, count = paired_draws(prompt_counts, resamples, seed).totals(sums, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = sign * total / count
    shares, mid_ranks = _shared_ranks(scores)
    filled = np.where(np.isnan(scores), -np.inf, scores)
    wins = (filled[:, :, None] > filled[:, None, :]).mean(axis=0)
    ties = (filled[:, :, None] == filled[:, None, :]).mean(axis=0)
    beats = wins + 0.5 * ties
    np.fill_diagonal(beats, np.nan)
    alpha = (1.0 - confidence) / 2.0
    return RankConfidence(
        metric=metric,
        higher_is_better=higher_is_better,
        entries=entries,
        means=means.loc[order].to_numpy(dtype=np.float64),
        rank_probabilities=shares.mean(axis=0),
        beats=beats,
        rank_low=np.floor(np.quantile(mid_ranks, alpha, axis=0)),
        rank_high=np.ceil(np.quantile(mid_ranks, 1.0 - alpha, axis=0)),
        expected_rank=mid_ranks.mean(axis=0),
        n_subjects=len(prompt_counts),
        resamples=resamples,
        confidence=confidence,
    )


def percent(p: float) -> str:
    if np.isnan(p):
        return "—"
    return "<1%" if 0 < p < 0.005 else (">99%" if 0.995 <= p < 1 else f"{p:.0%}")


def explanation(result: RankConfidence, label: str) -> str:
    alpha = (1.0 - result.confidence) / 2.0
    return (
        f"How sure the order by {label} is: a paired bootstrap ({result.resamples} replicates; each draws "
        f"subjects, then prompts within them, once for all entries; {result.n_subjects} subject(s)). "
        f"P(rank k): share of replicates at rank k (exact ties share their ranks). 'ranks' is the central "
        f"{result.confidence:.0%} range of the replicate ranks. 'cannot separate from' lists the entries that "
        f"neither beat nor lose to this one in more than {1 - alpha:.1%} of replicates. The matrix gives "
        "P(row beats column)."
        + (" With one subject only prompts are resampled: this says nothing about other subjects."
           if result.n_subjects < 2 else "")
    )


def _tables(result: RankConfidence):
    headers = ["Method", "mean", "ranks", *[f"P(rank {k + 1})" for k in range(len(result.entries))], "cannot separate from"]
    rows = []
    for a, entry in enumerate(result.entries):
        low, high = int(result.rank_low[a]), int(result.rank_high[a])
        rows.append([
            Cell(entry, align_text=True),
            Cell(f"{result.means[a]:.3f}"),
            Cell(f"{low}" if low == high else f"{low}–{high}"),
            *[Cell(percent(p)) for p in result.rank_probabilities[a]],
            Cell("; ".join(result.tied_with(a)) or "—", align_text=True),
        ])
    matrix_headers = ["P(row beats column)", *result.entries]
    matrix = [
        [Cell(entry, align_text=True), *[Cell("·" if a == b else percent(result.beats[a, b])) for b in range(len(result.entries))]]
        for a, entry in enumerate(result.entries)
    ]
    return headers, rows, matrix_headers, matrix


def rank_confidence_html(result: RankConfidence | None, label: str, heading: str = "h2") -> str:
    if result is None:
        return ""
    headers, rows, matrix_headers, matrix = _tables(result)
    return (
        f"<{heading} id='rank-confidence'>Rank confidence</{heading}>"
        f"<p class='note'>{html.escape(explanation(result, label))}</p>"
        + html_table(headers, rows)
        + html_table(matrix_headers, matrix)
    )


def rank_confidence_markdown(result: RankConfidence | None, label: str) -> str:
    if result is None:
        return ""
    headers, rows, matrix_headers, matrix = _tables(result)
    return (
        f"\n## Rank confidence\n\n{explanation(result, label)}\n\n"
        + markdown_table(headers, rows) + "\n" + markdown_table(matrix_headers, matrix)
    )
