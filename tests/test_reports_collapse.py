"""The attention-collapse report: rows read from states (shared states once), the plot drawn."""

from __future__ import annotations

import json

import pandas as pd

from benchmark.store import Store
from reports.collapse import collapse_figure, collapse_frame, write_collapse
from reports.rundata import RunData


def _state(store: Store, label: str, subject: str, key: str, record: dict | None) -> None:
    folder = store.state_dir(label, subject, key)
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"method": "dreambooth", "attention_collapse": record}))
    (folder / "DONE").write_text("{}")


def _record(entropies: dict[str, float]) -> dict:
    steps = {"step-5": 5, "final": 20}
    return {"rows": {name: [{"training_step": steps[name], "resolution": 8, "entropy": value,
                             "subject_share": 1 - value, "word_mass": 0.3}] for name, value in entropies.items()}}


def test_rows_plot_and_table(tmp_path):
    store = Store(tmp_path)
    _state(store, "dreambooth", "dog", "k1", _record({"step-5": 0.9, "final": 0.4}))
    _state(store, "dreambooth", "cat", "k2", _record({"step-5": 0.7, "final": 0.2}))
    _state(store, "textual_inversion", "dog", "k3", None)
    states = pd.DataFrame([
        {"method": "dreambooth", "subject": "dog", "prepare_key": "k1", "done": True},
        {"method": "dreambooth", "subject": "dog", "prepare_key": "k1", "done": True},  # a second entry, same state
        {"method": "dreambooth", "subject": "cat", "prepare_key": "k2", "done": True},
        {"method": "textual_inversion", "subject": "dog", "prepare_key": "k3", "done": True},
    ])
    run = RunData(store, {}, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), [], {}, {}, states)
    frame = collapse_frame(run)
    assert len(frame) == 4  # 2 states x 2 checkpoints, the repeated state once, the TI state has none
    means = frame.groupby("training_step")["entropy"].mean()
    assert means.round(9).to_dict() == {5: 0.8, 20: 0.3}
    figure = collapse_figure(frame)
    line = figure.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [5, 20] and [round(v, 9) for v in line.get_ydata()] == [0.8, 0.3]
    base, title = write_collapse(run, tmp_path / "report", smoke=True)
    assert (tmp_path / "report" / f"{base}.png").is_file() and (tmp_path / "report" / "tables" / "attention_collapse.csv").is_file()
    assert "training step" in title
    empty = RunData(store, {}, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), [], {}, {}, states.iloc[3:])
    assert write_collapse(empty, tmp_path / "r2", smoke=False) is None
