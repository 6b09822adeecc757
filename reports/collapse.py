"""The attention-collapse plot: cross-attention entropy and subject share against training step.

Reads the ``attention_collapse`` record that DreamBooth-trained states keep in ``state.json``
(``methods.attention_collapse`` says what each value means) — only the store, no model. One row
per (trainer state, checkpoint, resolution); states shared by several entries (DreamBlend on
DreamBooth) are counted once. The plot shows the mean over subjects per resolution, with the
per-subject range as a band.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reports.rundata import RunData

COLUMNS = ["trainer", "subject", "checkpoint", "training_step", "resolution", "entropy", "subject_share", "word_mass"]
PANELS = (
    ("entropy", "entropy over prompt words (normalised; 1 = even)"),
    ("subject_share", "subject token's share of the words' attention"),
)


def collapse_frame(run: RunData) -> pd.DataFrame:
    """Rows of every finished state's diagnostic (empty when no state has one)."""
    rows, seen = [], set()
    states = run.states
    if states.empty or "done" not in states:
        return pd.DataFrame(columns=COLUMNS)
    for state in states[states["done"]].itertuples():
        # States live under the trainer's name (a DreamBlend entry reads DreamBooth's state).
        folder = run.store.state_dir(getattr(state, "trainer", state.method), state.subject, state.prepare_key)
        path = folder / "state.json"
        if folder.resolve() in seen or not path.is_file():
            continue
        seen.add(folder.resolve())
        data = json.loads(path.read_text())
        record = data.get("attention_collapse")
        if not record:
            continue
        for checkpoint, entries in record["rows"].items():
            for entry in entries:
                rows.append({"trainer": data.get("method", state.method), "subject": state.subject,
                             "checkpoint": checkpoint, **entry})
    return pd.DataFrame(rows, columns=COLUMNS)


def collapse_figure(frame: pd.DataFrame, smoke: bool = False) -> Figure:
    """Two panels (entropy, subject share) against training step, one line per trainer × resolution."""
    figure = Figure(figsize=(10.5, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    if smoke:
        figure.suptitle("SMOKE NUMBERS — random-init backbone; not a measurement", color="#c2410c", fontweight="bold")
    groups = list(frame.groupby(["trainer", "resolution"], sort=True)) if not frame.empty else []
    palette = matplotlib.colormaps["tab10"]
    for ax, (column, title) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(True, color="#e3e7ee", linewidth=0.7)
        if not groups:
            ax.text(0.5, 0.5, "no state has the diagnostic", ha="center", va="center", transform=ax.transAxes)
            continue
        for index, ((trainer, resolution), rows) in enumerate(groups):
            by_step = rows.groupby("training_step")[column].agg(["mean", "min", "max"]).sort_index()
            color = palette(index % palette.N)
            ax.plot(by_step.index, by_step["mean"], marker="o", color=color, label=f"{trainer} · {resolution}×{resolution}")
            if rows["subject"].nunique() > 1:
                ax.fill_between(by_step.index, by_step["min"], by_step["max"], color=color, alpha=0.15, linewidth=0)
        ax.set_ylim(0, 1.02)
    if groups:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="trainer · attention grid")
    return figure


def write_collapse(run: RunData, out: Path, smoke: bool) -> tuple[str, str] | None:
    """Table and plot under ``out`` when the run has the diagnostic; returns (plot base, title)."""
    from reports.pareto import save_figure

    frame = collapse_frame(run)
    if frame.empty:
        return None
    from data.common import atomic_write_text

    atomic_write_text(out / "tables" / "attention_collapse.csv", frame.to_csv(index=False))
    base = "plots/attention_collapse"
    save_figure(collapse_figure(frame, smoke), out / base)
    return base, "Attention collapse: cross-attention entropy and subject share vs training step (mean over subjects, band = range)"
