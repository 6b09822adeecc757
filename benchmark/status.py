"""``subjectbench status``: done / failed / pending per method cell and stage."""

from __future__ import annotations

import pandas as pd

from benchmark.results import current_fingerprints, load_plan, read_score_parts
from benchmark.store import Store


def status_frame(store: Store) -> tuple[pd.DataFrame, dict[str, dict]]:
    plan = load_plan(store)
    if "trainer" not in plan:  # plans written before trainings were shared across cells
        plan = plan.assign(trainer=plan["label"])
    failures = store.failures()
    rows = []
    for cell_id, cell in plan.groupby("cell_id", sort=False):
        prepare = cell.drop_duplicates("prepare_key")
        states_done = sum(
            store.state_done(trainer, subject, key)
            for trainer, subject, key in zip(prepare["trainer"], prepare["subject"], prepare["prepare_key"])
        )
        states_failed = sum(key in failures for key in prepare["prepare_key"])
        images_done = store.done_mask(cell)
        done_count = sum(images_done)
        images_failed = sum(key in failures for key in cell["key"])
        blocked = sum(
            n for key, n in cell.groupby("prepare_key").size().items() if key in failures
        ) - sum(d for d, key in zip(images_done, cell["prepare_key"]) if key in failures)
        row = {
            "method": cell_id,
            "prepare done": f"{states_done}/{len(prepare)}",
            "prepare failed": states_failed,
            "images done": f"{done_count}/{len(cell)}",
            "images failed": images_failed + max(blocked, 0),
            "images pending": len(cell) - done_count - images_failed - max(blocked, 0),
        }
        done_keys = set(cell["key"][images_done])
        for metric, info in current_fingerprints(store).items():
            scored = set(read_score_parts(store.scores_dir(metric, info["hash"]))["image_key"])
            row[f"{metric} scored"] = len(done_keys & scored)
        rows.append(row)
    return pd.DataFrame(rows), failures


def run_status(run_dir) -> tuple[str, int]:
    store = Store(run_dir)
    frame, failures = status_frame(store)
    lines = [f"run {store.root}", frame.to_string(index=False) if not frame.empty else "(empty plan)"]
    plan = load_plan(store)
    if not plan.empty:
        trainings = plan["prepare_key"].nunique()
        cells = plan["cell_id"].nunique()
        lines.append(
            f"trainings: {trainings} for {cells} method cells × {plan['subject'].nunique()} subjects"
            + (" (cells that differ only in generation settings share one training)" if trainings < cells * plan["subject"].nunique() else "")
        )
    if failures:
        lines.append(f"failures ({len(failures)}; tracebacks in {store.root / 'failures'}):")
        for failure in failures.values():
            lines.append(
                f"  [{failure.get('stage')}/{failure.get('kind')}] {failure.get('cell_id')} {failure.get('subject')}: {failure.get('message')}"
            )
    return "\n".join(lines), 1 if failures else 0
