"""``subjectbench status``: done / failed / pending per method cell and stage."""

from __future__ import annotations

import pandas as pd

from benchmark.results import current_fingerprints, load_plan, read_score_parts, run_time_line
from benchmark.store import Store


def _metric_role(metric: str) -> str | None:
    from metrics.registry import get_metric_class

    try:
        return get_metric_class(metric).role
    except Exception:  # noqa: BLE001 - a metric no longer installed: count every finished image
        return None


def status_frame(store: Store, plan: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict[str, dict]]:
    plan = load_plan(store) if plan is None else plan
    if "trainer" not in plan:  # plans written before trainings were shared across cells
        plan = plan.assign(trainer=plan["label"])
    failures = store.failures()
    rows, finished = [], set()
    for cell_id, cell in plan.groupby("cell_id", sort=False):
        prepare = cell.drop_duplicates("prepare_key")
        states_done = sum(
            store.state_done(trainer, subject, key)
            for trainer, subject, key in zip(prepare["trainer"], prepare["subject"], prepare["prepare_key"])
        )
        states_failed = sum(key in failures for key in prepare["prepare_key"])
        images_done = store.done_mask(cell)
        done_count = sum(images_done)
        # Each image is exactly one of done / failed (itself, or its prepare) / pending, so the
        # counts add up; a finished image never counts as failed, whatever a file says.
        images_failed = sum(
            not done and (key in failures or prepare_key in failures)
            for done, key, prepare_key in zip(images_done, cell["key"], cell["prepare_key"])
        )
        row = {
            "method": cell_id,
            "prepare done": f"{states_done}/{len(prepare)}",
            "prepare failed": states_failed,
            "images done": f"{done_count}/{len(cell)}",
            "images failed": images_failed,
            "images pending": len(cell) - done_count - images_failed,
        }
        done_keys = set(cell["key"][images_done])
        finished |= done_keys
        for metric, info in current_fingerprints(store).items():
            scored = set(read_score_parts(store.scores_dir(metric, info["hash"]))["image_key"])
            # Out of the finished images the metric applies to (PRES: the class-prior images).
            role = _metric_role(metric)
            eligible = {k for k, r in zip(cell["key"], cell["role"]) if k in done_keys and (role is None or r == role)}
            row[f"{metric} scored"] = f"{len(eligible & scored)}/{len(eligible)}"
        rows.append(row)
    return pd.DataFrame(rows), {key: f for key, f in failures.items() if key not in finished}


def _resume_points(store: Store) -> list[str]:
    """One line per training with a saved resume point: its subjects and each loop's step."""
    import json

    lines = []
    for points in sorted((store.root / "resume").glob("*/points")):
        loops = []
        for path in sorted(points.glob("loop-*.json"), key=lambda p: int(p.stem.split("-")[1])):
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
                loops.append(f"{path.stem} at step {meta['step']}/{meta['identity']['steps']}")
            except (OSError, ValueError, KeyError):
                loops.append(f"{path.stem} unreadable (the training starts over)")
        subjects = sorted(p.name.rsplit("-", 1)[0] for p in (points.parent / "work").glob("*"))  # <subject>-<key>
        if loops:
            lines.append(f"{points.parent.name} ({', '.join(subjects) or '?'}): {'; '.join(loops)}")
    return lines


def run_status(run_dir) -> tuple[str, int]:
    store = Store(run_dir)
    plan = load_plan(store)
    frame, failures = status_frame(store, plan)
    lines = [f"run {store.root}", frame.to_string(index=False) if not frame.empty else "(empty plan)"]
    if not plan.empty:
        trainings = plan["prepare_key"].nunique()
        cells = plan["cell_id"].nunique()
        lines.append(
            f"trainings: {trainings} for {cells} method cells × {plan['subject'].nunique()} subjects"
            + (" (cells that differ only in generation settings share one training)" if trainings < cells * plan["subject"].nunique() else "")
        )
    run_time = run_time_line(store)
    if run_time:
        lines.append(run_time)
    resumable = _resume_points(store)
    if resumable:
        lines.append(f"interrupted trainings that the next run resumes ({len(resumable)}; training.resume_every):")
        lines += [f"  {line}" for line in resumable]
    if failures:
        lines.append(f"failures ({len(failures)}; tracebacks in {store.root / 'failures'}):")
        for failure in failures.values():
            lines.append(
                f"  [{failure.get('stage')}/{failure.get('kind')}] {failure.get('cell_id')} {failure.get('subject')}: {failure.get('message')}"
            )
    return "\n".join(lines), 1 if failures else 0
