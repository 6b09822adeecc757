"""The report's pages other than leaderboard and gallery: tables, plots, and the index.

Each page is written as HTML and (for tables) Markdown from the same rows, so the two never
disagree.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from benchmark.store import LIVE_EVERY_S
from reports.render import (
    Cell,
    estimate,
    fmt,
    html_table,
    image_counts,
    markdown_table,
    number,
    page,
    smoke_banner,
    smoke_markdown,
    text,
)
from reports.rundata import RunData
from reports.schema import COLUMNS, METRIC_MEANING, metric_label

TABLE_NOTES = {
    "summary": "All images of each method entry (cell @ checkpoint). Mean [95% CI].",
    "by_kind": "Split by subject kind (live: cats and dogs; object: everything else). A row from a single subject "
    "has no interval (between-subject variation needs two subjects).",
    "by_category": "Split by prompt category (DreamBooth Sec. 4.1). PRES is scored on class-prior images only (category 'prior').",
    "per_subject": "Per subject: plain means over the subject's images (no interval: one subject is one sample).",
    "clip_t_scales": "CLIP-T in the scales published tables use: raw cosine (DreamBooth), 100·cos (torchmetrics), "
    "CLIPScore 2.5·max(cos, 0) (Hessel et al. 2021; clamped per image, so its mean is bootstrapped on its own).",
    "cost": "Preparation (training / encoding) per subject from the state's DONE record; state size = files of the "
    "learned state on disk (one state holds all checkpoints of a sweep); generation seconds per image = batch time / batch size. Peak memory: CUDA where measured, "
    "else the process's peak RSS (which includes everything the process loaded before). One-time pre-training (an "
    "encoder pre-trained once for all subjects, e.g. the tuning encoder) is read from the checkpoint's record and is "
    "not part of the per-subject seconds. 'device hours' add each cell's preparation and generation seconds over the "
    "processes that ran them: with several workers sharing a GPU they exceed the GPU's own time (see Run time).",
    "run_time": "Each `subjectbench run` on this folder (a rerun that resumes is one more): wall seconds per stage, "
    "the executor, the GPUs its workers shared and how many workers per GPU. GPU-hours = wall seconds × GPUs: what the "
    "run took of the hardware. The total adds every invocation, so work an interrupted invocation did and a rerun "
    "redid counts twice; none is given when an invocation's GPU count is unknown (Ray) or it ran on a CPU. An "
    "invocation killed outright (SIGKILL, the OOM killer, a machine taken away) is counted to its last heartbeat "
    f"(every {LIVE_EVERY_S:g} s; 'stopped_in' says '(killed)'): it ran up to {LIVE_EVERY_S:g} s longer. 'config' is the "
    "hash of its resolved config (configs/<time>-<hash>.yaml).",
}
TABLE_TITLES = {
    "summary": "Summary per method entry",
    "by_kind": "By subject kind",
    "by_category": "By prompt category",
    "per_subject": "Per subject",
    "clip_t_scales": "CLIP-T in published scales",
    "cost": "Cost",
    "run_time": "Run time",
}


def _metrics_in(table: pd.DataFrame) -> list[str]:
    return [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]


def metric_rows(table: pd.DataFrame, keys: list[str], intervals: bool = True) -> tuple[list[str], list[list[Cell]]]:
    metrics = _metrics_in(table)
    headers = [k.replace("_", " ") for k in keys] + [metric_label(m) for m in metrics] + ["images"]
    rows = []
    for _, row in table.iterrows():
        cells = [text(row[k]) for k in keys]
        for m in metrics:
            cells.append(estimate(row[f"{m}_mean"], row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high"),
                                  n_subjects=row.get(f"{m}_n_subjects")) if intervals else number(row[f"{m}_mean"]))
        cells.append(image_counts(row, metrics))
        rows.append(cells)
    return headers, rows


def _seconds(value, device: str) -> str:
    return "—" if pd.isna(value) else f"{value:.3g} {device}-s"


def _pretraining_text(row) -> str:
    seconds = row.get("pretrain_seconds", np.nan)
    if pd.isna(seconds):
        return "—"
    return f"{_seconds(seconds, row['pretrain_device'])} ({int(row['pretrain_steps'])} steps, {int(row['pretrain_images'])} images)"


def cost_rows(cost: pd.DataFrame) -> tuple[list[str], list[list[Cell]]]:
    headers = ["method cell", "prepared", "prepare s/subject", "prepare s total", "prepare peak MB", "state MB/subject",
               "images", "s/image", "generate peak MB", "device hours", "one-time pre-training"]
    rows = []
    for _, row in cost.iterrows():
        rows.append([
            text(row["cell_id"]),
            Cell(f"{row['subjects_prepared']}/{row['subjects_planned']}"),
            Cell(_seconds(row["prepare_seconds_per_subject"], row["prepare_device"])),
            Cell(_seconds(row["prepare_seconds_total"], row["prepare_device"])),
            Cell(f"{fmt(row['prepare_peak_mb'], 0)} ({row['prepare_peak_kind']})" if not pd.isna(row["prepare_peak_mb"]) else "—"),
            number(row["state_mb_per_subject"], 3),
            Cell(f"{row['images_done']}/{row['images_planned']}"),
            Cell(_seconds(row["seconds_per_image"], row["generate_device"])),
            Cell(f"{fmt(row['generate_peak_mb'], 0)} ({row['generate_peak_kind']})" if not pd.isna(row["generate_peak_mb"]) else "—"),
            number(row.get("device_hours", np.nan), 4),
            Cell(_pretraining_text(row)),
        ])
    return headers, rows


def run_time_rows(run_time: pd.DataFrame) -> tuple[list[str], list[list[Cell]]] | tuple[None, None]:
    if run_time is None or run_time.empty:
        return None, None
    headers = ["invocation", "started (UTC)", "config", "device", "executor", "GPUs × workers", "plan s", "execute s", "score s",
               "wall s", "images made", "GPU-hours"]
    rows = []
    for _, row in run_time.iterrows():
        total = row["invocation"] == "total"
        gpus = row["gpus"]
        layout = "" if total else (f"{int(gpus)} × {int(row['workers_per_gpu'] or 1)}{' MPS' if row['mps'] else ''}"
                                   if isinstance(gpus, (int, float)) and not pd.isna(gpus) and gpus > 0
                                   else ("cpu" if gpus == 0 else "unknown"))
        stopped = "" if total or pd.isna(row["stopped_in"]) or not row["stopped_in"] else f" (stopped in {row['stopped_in']})"
        rows.append([
            text(row["invocation"]), text("" if total else str(row["started"] or "")),
            text("" if total or pd.isna(row["config"]) else str(row["config"])),
            text("" if total else str(row["device_name"] or "")), text("" if total else str(row["executor"] or "")),
            text(layout), number(row["plan_seconds"], 1), number(row["execute_seconds"], 1),
            number(row["score_seconds"], 1), Cell(f"{fmt(row['wall_seconds'], 1)}{stopped}"),
            number(row["images_generated"], 0), number(row["gpu_hours"], 4),
        ])
    return headers, rows


TABLE_KEYS = {
    "summary": ["entry"],
    "by_kind": ["entry", "kind"],
    "by_category": ["entry", "category"],
    "per_subject": ["entry", "subject", "kind"],
    "clip_t_scales": ["entry"],
}


def _empty(name: str) -> str:
    return ("none recorded (the run predates invocations.jsonl)" if name == "run_time" else "no scored images")


def _sections(tables: dict[str, pd.DataFrame], cost: pd.DataFrame, run_time: pd.DataFrame | None = None):
    for name in ("summary", "by_kind", "by_category", "per_subject", "clip_t_scales"):
        table = tables.get(name, pd.DataFrame())
        if table.empty:
            yield name, None, None
            continue
        yield name, *metric_rows(table, TABLE_KEYS[name], intervals=name != "per_subject")
    yield "cost", *cost_rows(cost)
    yield "run_time", *run_time_rows(run_time)


def tables_html(run: RunData, tables: dict[str, pd.DataFrame], cost: pd.DataFrame, explanation: str,
                run_time: pd.DataFrame | None = None) -> str:
    body = ["<h1>Tables</h1>", smoke_banner(run.smoke_reasons()), f"<p class='note'>{html.escape(explanation)}</p>"]
    body.append("<p class='note'>" + " · ".join(f"<a href='#{n}'>{TABLE_TITLES[n]}</a>" for n in TABLE_TITLES) + "</p>")
    for name, headers, rows in _sections(tables, cost, run_time):
        body.append(f"<h2 id='{name}'>{TABLE_TITLES[name]}</h2><p class='note'>{html.escape(TABLE_NOTES[name])} "
                    f"CSV: <a href='tables/{name}.csv'>tables/{name}.csv</a></p>")
        body.append(html_table(headers, rows) if headers else f"<p class='empty'>— {html.escape(_empty(name))}</p>")
    return page("Tables", "".join(body), run_name=run.config.get("name", ""))


def tables_markdown(run: RunData, tables: dict[str, pd.DataFrame], cost: pd.DataFrame, explanation: str,
                    run_time: pd.DataFrame | None = None) -> str:
    parts = ["# Tables\n", smoke_markdown(run.smoke_reasons()), explanation + "\n"]
    for name, headers, rows in _sections(tables, cost, run_time):
        parts.append(f"\n## {TABLE_TITLES[name]}\n\n{TABLE_NOTES[name]}\n")
        parts.append(markdown_table(headers, rows) if headers else f"— {_empty(name)}\n")
    return "\n".join(parts)


def plots_html(run: RunData, plots: list[tuple[str, str]], explanation: str) -> str:
    body = ["<h1>Pareto plots</h1>", smoke_banner(run.smoke_reasons()), f"<p class='note'>{html.escape(explanation)}</p>"]
    for base, title in plots:
        body.append(f"<h2>{html.escape(title)}</h2><p><a href='{base}.svg'><img src='{base}.png' alt='{html.escape(title)}' "
                    f"style='max-width:100%'></a></p><p class='note'>PNG: <a href='{base}.png'>{base}.png</a> · "
                    f"SVG: <a href='{base}.svg'>{base}.svg</a></p>")
    return page("Pareto plots", "".join(body), run_name=run.config.get("name", ""))


def index_html(run: RunData, leaderboard_body: str, plots: list[tuple[str, str]], files: list[tuple[str, str]]) -> str:
    config = run.config
    planned = len(run.plan)
    done = len(run.images)
    failures = len(run.failures)
    metrics = ", ".join(f"{metric_label(m)} ({(info.get('fingerprint') or {}).get('weights', 'weights not recorded')})"
                        for m, info in run.fingerprints.items()) or "none scored"
    facts = [
        ("run directory", str(run.root)),
        ("suite", f"{config.get('name', '?')} — {config.get('description', '')}"),
        ("backbone", f"{config.get('backbone', '?')} ({', '.join(sorted(set(run.images['backbone'].dropna().astype(str)))) or 'no images yet'})"),
        ("images", f"{done} of {planned} planned finished; {failures} recorded failure(s)" + (" — see failures/ and `subjectbench status`" if failures else "")),
        ("metrics", metrics),
        ("scores", f"{len(run.long)} (image, metric) rows"),
    ]
    configs = run.store.config_history()
    if len(configs) > 1:
        facts.append(("configs", f"this directory ran {len(configs)} different configs: "
                      + ", ".join(p.name for p in configs) + " (in configs/); this report follows the latest, config.yaml"))
    body = ["<h1>subjectbench report</h1>", smoke_banner(run.smoke_reasons())]
    if len(configs) > 1:
        body.append(f"<div class='warning'><strong>This run directory holds {len(configs)} different configs.</strong> "
                    "The report shows the plan of the latest one (config.yaml); images of the earlier ones stay in "
                    "the store but are not in these tables. Their configs: "
                    + html.escape(", ".join(f"configs/{p.name}" for p in configs)) + ".</div>")
    body.append("<table>" + "".join(f"<tr><th class='text'>{html.escape(k)}</th><td class='text'>{html.escape(v)}</td></tr>" for k, v in facts) + "</table>")
    body.append("<h2>Contents</h2><ul>" + "".join(f"<li><a href='{href}'>{html.escape(name)}</a></li>" for href, name in files) + "</ul>")
    body.append(leaderboard_body)
    body.append("<h2>Pareto plots</h2><div class='plots'>" + "".join(
        f"<a href='plots.html'><img src='{base}.png' alt='{html.escape(title)}'></a>" for base, title in plots) + "</div>")
    body.append("<h2>Metrics</h2><ul>" + "".join(
        f"<li><b>{metric_label(m)}</b>: {html.escape(meaning)}</li>" for m, meaning in METRIC_MEANING.items()) + "</ul>")
    body.append(
        "<h2>Data</h2><p>Every (image, metric) value of this run, one row each:</p>"
        "<pre>import pandas as pd\nresults = pd.read_parquet(\"RUN_DIR/report/results.parquet\")\n"
        "# or, rebuilt from the store: from reports import load_results; results = load_results(\"RUN_DIR\")</pre>"
        + html_table(["column", "meaning"], [[text(k), text(v)] for k, v in COLUMNS.items()])
    )
    return page("subjectbench report", "".join(body), run_name=config.get("name", ""))
