"""Everything a report reads from one run directory, read once: plan, images, scores, states.

Reports read only the store (benchmark/store.py); nothing here runs a method or a metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.results import current_fingerprints, load_plan, load_records, load_subject_table
from benchmark.store import Store, StoreError
from data.common import UserError
from reports.long import finished_images, results_frame


class ReportError(UserError):
    """A run directory a report cannot be built from; the message names it and the fix."""


def check_run_dir(run_dir: str | Path) -> Store:
    store = Store(run_dir)
    if not store.root.is_dir():
        raise ReportError(f"run directory {store.root} does not exist; pass the --out of a `subjectbench run`")
    if (store.root / "bundle.json").is_file():
        raise ReportError(f"{store.root} is a result bundle, not a run directory; bundles go to `subjectbench leaderboard` "
                          "or are the BASELINE of `subjectbench compare`")
    try:
        store.load_config_dict()
    except StoreError as error:
        raise ReportError(str(error)) from None
    if not (store.root / "plan.parquet").is_file():
        raise ReportError(f"{store.root} has no plan.parquet; rerun `subjectbench run ... --out {store.root}`")
    return store


def _is_random_backbone(name: str) -> bool:
    try:
        from methods.backbones import resolve_backbone

        return resolve_backbone(name).is_random
    except Exception:  # noqa: BLE001 - an unknown backbone is not known to be random
        return False


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@dataclass
class RunData:
    store: Store
    config: dict
    plan: pd.DataFrame  # every planned image unit (latest invocation)
    images: pd.DataFrame  # finished images, one row each, with manifest fields
    long: pd.DataFrame  # one row per (image, metric)
    subjects: list[dict]
    fingerprints: dict[str, dict]  # metric -> {'hash', 'fingerprint'}
    failures: dict[str, dict]
    states: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per prepared state
    invocations: list[dict] = field(default_factory=list)  # each `subjectbench run` on it (invocations.jsonl)

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def metric_weights(self) -> dict[str, str | None]:
        return {m: (info.get("fingerprint") or {}).get("weights") for m, info in self.fingerprints.items()}

    def smoke_reasons(self) -> list[str]:
        """Why this run's numbers are smoke numbers, not measurements (empty when they are not)."""
        reasons = []
        random_backbones = sorted(set(self.images.loc[self.images["backbone_random"].fillna(False).astype(bool), "backbone"].dropna()))
        if self.images.empty:
            random_backbones = [name for name in [self.config.get("backbone")] if name and _is_random_backbone(name)]
        if random_backbones:
            reasons.append(f"the diffusion backbone is random-init ({', '.join(random_backbones)})")
        random_metrics = sorted(m for m, w in self.metric_weights.items() if w == "random")
        if random_metrics:
            reasons.append(f"metric backbones have random weights ({', '.join(random_metrics)})")
        unknown = sorted(m for m, w in self.metric_weights.items() if w is None)
        if unknown:
            reasons.append(f"the metric weights of {', '.join(unknown)} are not recorded in their fingerprints")
        return reasons


def _states(store: Store, plan: pd.DataFrame) -> pd.DataFrame:
    if plan.empty:
        return pd.DataFrame(columns=["method", "cell_id", "subject", "prepare_key"])
    rows = []
    trainers = plan["trainer"] if "trainer" in plan else plan["label"]
    for (label, trainer, cell_id, subject, key), _ in plan.assign(trainer=trainers).groupby(
        ["label", "trainer", "cell_id", "subject", "prepare_key"], sort=False
    ):
        info = store.state_info(trainer, subject, key)
        row = {"method": label, "trainer": trainer, "cell_id": cell_id, "subject": subject, "prepare_key": key,
               "done": info is not None}
        if info is not None:
            row.update(
                prepare_seconds=info.get("seconds"),
                prepare_peak_rss_mb=info.get("peak_rss_mb"),
                prepare_peak_cuda_mb=info.get("peak_cuda_mb"),
                prepare_device=info.get("device"),
                # DONE itself is bookkeeping, not learned weights.
                state_bytes=folder_bytes(store.state_dir(trainer, subject, key)) - (store.state_dir(trainer, subject, key) / "DONE").stat().st_size,
            )
            # One-time cost outside the run (a pre-trained encoder), as its fingerprint records it.
            pretraining = (info.get("fingerprint") or {}).get("pretraining") or {}
            if pretraining:
                row.update({f"pretrain_{k}": pretraining.get(k) for k in ("steps", "seconds", "images", "device")})
        rows.append(row)
    return pd.DataFrame(rows)


def read_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir`` (a `subjectbench run --out` folder) for reporting."""
    store = check_run_dir(run_dir)
    plan = load_plan(store)
    records = load_records(store)
    subjects_file = store.root / "subjects.json"
    return RunData(
        store=store,
        config=store.load_config_dict(),
        plan=plan,
        images=finished_images(store, plan, records),
        long=results_frame(store, plan, records),
        subjects=load_subject_table(store) if subjects_file.is_file() else [],
        fingerprints=current_fingerprints(store),
        failures=store.failures(),
        states=_states(store, plan),
        invocations=store.invocations(),
    )
