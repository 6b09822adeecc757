"""HiFi Tuner reports: the Table 2 ablation table and the mask-noise sensitivity plot.

Written by ``build_report`` when a run has the rows of ``hifi_ablation`` / ``hifi_ablation_tiny``
(labels below) or cells with a ``mask_corruption`` grid (``mask_noise`` / ``mask_noise_tiny``).

Ablation table (``ablation.md``/``.csv``/``.html``): per row, each metric's mean with its
hierarchical-bootstrap CI (``reports.stats``), the delta to the previous row of its chain with a
*paired* CI (per-image differences of the same subject, prompt and k — the seed rule gives every
cell of a subject the same seeds — bootstrapped over subjects, then prompts), and the published
Table 2 row of HiFi Tuner (arXiv 2312.00079) beside it, marked "published".

Mask-noise plot (``plots/mask_noise.png``/``.svg``, ``mask_noise.csv``): DINO / CLIP-I / CLIP-T of
the mask-guided variant trained on corrupted masks, against the corruption level and against the
masks' IoU with the clean ones (read from each training's ``state.json``), with CIs, one curve per
operator; the clean run is every curve's level-0 / IoU-1 point. Ours: no paper has this figure.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from reports.stats import hierarchical_bootstrap

METRICS = ("dino", "clip_i", "clip_t")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
# HiFi Tuner, Table 2 (re-run baselines, TI at 1000 steps): DINO, CLIP-I, CLIP-T.
PUBLISHED_TABLE2 = {
    "ti_baseline": (0.567, 0.786, 0.293),
    "+mask": (0.606, 0.788, 0.292),
    "+reg": (0.612, 0.789, 0.294),
    "+stepwise": (0.626, 0.790, 0.292),
    "+reference_guidance": (0.665, 0.807, 0.291),
    "dreambooth_400": (0.662, 0.803, 0.315),
    "dreambooth_400+reference_guidance": (0.680, 0.809, 0.317),
}
CHAINS = (
    ("ti_baseline", "+output_embedding", "+mask", "+reg", "+stepwise", "+reference_guidance"),
    ("dreambooth_400", "dreambooth_400+reference_guidance"),
)
SWEEP_LABEL = "reg_sweep"
PAIR_KEYS = ["subject", "prompt_index", "k"]


def _values(long: pd.DataFrame, entry: str, metric: str) -> pd.DataFrame:
    rows = long[(long["entry"] == entry) & (long["metric"] == metric) & (long["role"] == "eval")]
    return rows[[*PAIR_KEYS, "value"]]


def paired_delta(long: pd.DataFrame, entry: str, previous: str, metric: str, **bootstrap):
    """Mean difference (entry − previous) over matched images, with its paired bootstrap CI."""
    pairs = _values(long, entry, metric).merge(_values(long, previous, metric), on=PAIR_KEYS, suffixes=("", "_prev"))
    return hierarchical_bootstrap(
        (pairs["value"] - pairs["value_prev"]).to_numpy(), pairs["subject"].to_numpy(), pairs["prompt_index"].to_numpy(), **bootstrap
    )


def _sweep_weight(entry: str) -> float | None:
    """reg_weight of a sweep cell, from its entry name 'reg_sweep[reg_weight=0.01]'."""
    match = re.fullmatch(rf"{re.escape(SWEEP_LABEL)}\[reg_weight=([^,\]]+)\]", entry)
    return float(match.group(1)) if match else None


def _chains(entries: list[str], reg_row_weight: float | None = None) -> list[list[str]]:
    """The ablation chains present, then the reg_weight sweep in weight order; "+reg" joins the
    sweep at its own weight (the suite leaves that point out of the grid so as not to repeat it)."""
    chains = [[e for e in chain if e in entries] for chain in CHAINS]
    weights = {e: _sweep_weight(e) for e in entries if _sweep_weight(e) is not None}
    if weights and "+reg" in entries and reg_row_weight is not None:
        weights["+reg"] = reg_row_weight
    sweep = sorted(weights, key=lambda e: weights[e])
    return [c for c in [*chains, sweep] if c]


def ablation_table(
    long: pd.DataFrame, resamples: int = 2000, seed: int = 0, confidence: float = 0.95, reg_row_weight: float | None = None
) -> pd.DataFrame:
    """One row per ablation entry present in ``long``: means, CIs, paired deltas, published values."""
    if long.empty:
        return pd.DataFrame()
    bootstrap = dict(resamples=resamples, seed=seed, confidence=confidence)
    entries = list(dict.fromkeys(long["entry"]))
    rows = []
    for chain in _chains(entries, reg_row_weight):
        for position, entry in enumerate(chain):
            row = {"entry": entry, "previous": chain[position - 1] if position else None}
            for index, metric in enumerate(METRICS):
                values = long[(long["entry"] == entry) & (long["metric"] == metric) & (long["role"] == "eval")]
                estimate = hierarchical_bootstrap(values["value"], values["subject"], values["prompt_index"], **bootstrap)
                row.update({metric: estimate.mean, f"{metric}_low": estimate.low, f"{metric}_high": estimate.high,
                            "subjects": estimate.n_subjects, "images": estimate.n_images})
                if position:
                    delta = paired_delta(long, entry, chain[position - 1], metric, **bootstrap)
                    row.update({f"{metric}_delta": delta.mean, f"{metric}_delta_low": delta.low,
                                f"{metric}_delta_high": delta.high})
                published = PUBLISHED_TABLE2.get(entry)
                row[f"{metric}_published"] = published[index] if published else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean, low, high, signed: bool = False) -> str:
    if mean is None or not np.isfinite(mean):
        return "—"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def ablation_markdown(table: pd.DataFrame, smoke: list[str], confidence: float) -> str:
    header = ["row"]
    for metric in METRICS:
        header += [LABELS[metric], f"Δ {LABELS[metric]} (paired)", f"{LABELS[metric]} published"]
    lines = [
        "# HiFi Tuner (reconstructed) ablation",
        "",
        f"Means over images with {confidence:.0%} hierarchical-bootstrap CIs; Δ = this row − the row above it "
        "in its chain, a paired CI over the same subjects, prompts and seeds. 'published' = HiFi Tuner's "
        "Table 2 (arXiv 2312.00079), not measured here; comparable only on the full protocol with a real "
        "backbone and pretrained metric weights.",
    ]
    if smoke:
        lines += ["", f"**Smoke numbers, not measurements:** {'; '.join(smoke)}."]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row["entry"]]
        for metric in METRICS:
            cells.append(_cell(row[metric], row[f"{metric}_low"], row[f"{metric}_high"]))
            cells.append(_cell(row.get(f"{metric}_delta"), row.get(f"{metric}_delta_low"), row.get(f"{metric}_delta_high"), True)
                         if row["previous"] else "—")
            published = row[f"{metric}_published"]
            cells.append(f"{published:.3f} (published)" if np.isfinite(published) else "—")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- mask noise


def _corruption(grid: str) -> str | None:
    try:
        parsed = json.loads(grid) if isinstance(grid, str) and grid else {}
    except ValueError:
        return None
    return parsed.get("mask_corruption")


def mask_noise_frame(run, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Per corruption cell: operator, level, mean IoU with the clean masks, metrics with CIs."""
    long = run.long
    if long.empty or "grid" not in long:
        return pd.DataFrame()
    corruption = long["grid"].map(_corruption)
    long = long.assign(corruption=corruption)[corruption.notna()]
    if long.empty:
        return pd.DataFrame()
    ious = _state_ious(run)
    rows = []
    for (cell_id, spec), frame in long.groupby(["cell_id", "corruption"], sort=False):
        operator, _, level = spec.partition(":")
        row = {"cell_id": cell_id, "corruption": spec or "clean", "operator": operator or "clean",
               "level": float(level) if level else (0.0 if not operator else np.nan),
               "iou": float(np.mean(ious.get(cell_id, [np.nan])))}
        for metric in METRICS:
            values = frame[(frame["metric"] == metric) & (frame["role"] == "eval")]
            estimate = hierarchical_bootstrap(values["value"], values["subject"], values["prompt_index"],
                                              resamples=resamples, seed=seed, confidence=confidence)
            row.update({metric: estimate.mean, f"{metric}_low": estimate.low, f"{metric}_high": estimate.high})
        rows.append(row)
    return pd.DataFrame(rows)


def _state_ious(run) -> dict[str, list[float]]:
    """cell_id -> the mean IoU with the clean masks of each of its trainings (state.json)."""
    plan = run.plan
    if plan.empty:
        return {}
    trainer = plan["trainer"] if "trainer" in plan else plan["label"]
    out: dict[str, list[float]] = {}
    for (cell_id, name, subject, key), _ in plan.assign(trainer=trainer).groupby(
        ["cell_id", "trainer", "subject", "prepare_key"], sort=False
    ):
        path = run.store.state_dir(name, subject, key) / "state.json"
        if path.is_file():
            masks = (json.loads(path.read_text()).get("hifi") or {}).get("masks") or {}
            if "mean_iou_with_clean" in masks:
                out.setdefault(cell_id, []).append(masks["mean_iou_with_clean"])
    return out


def mask_noise_figure(frame: pd.DataFrame, smoke: bool, confidence: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 7), layout="constrained")
    axes = figure.subplots(2, len(METRICS), squeeze=False)
    clean = frame[frame["operator"] == "clean"]
    operators = [o for o in dict.fromkeys(frame["operator"]) if o != "clean"]
    for column, metric in enumerate(METRICS):
        for row, x in enumerate(("level", "iou")):
            axis = axes[row][column]
            # Flip rates (0-1) get their own axis on top of the level panel; radii are pixels.
            rate_axis = axis.twiny() if x == "level" and "flip" in operators else None
            for number, operator in enumerate(operators):
                own = frame[frame["operator"] == operator]
                if own[x].isna().all():  # bbox/empty/full have no level
                    continue
                points = pd.concat([clean, own]).dropna(subset=[x])
                points = points.sort_values(x)
                errors = [points[metric] - points[f"{metric}_low"], points[f"{metric}_high"] - points[metric]]
                target = rate_axis if rate_axis is not None and operator == "flip" else axis
                target.errorbar(points[x], points[metric], yerr=errors, marker="o", capsize=3, label=operator,
                                color=f"C{number}", linestyle="--" if target is rate_axis else "-")
            if rate_axis is not None:
                rate_axis.set_xlabel("flip rate (dashed)")
            axis.set_xlabel("level: radius / jitter, px" if x == "level"
                            else "mask IoU with the clean mask")
            axis.set_ylabel(LABELS[metric])
            if x == "iou":
                axis.invert_xaxis()
            axis.grid(alpha=0.3)
    axes[1][0].legend(fontsize=8)  # every operator has an IoU
    title = f"Mask-noise sensitivity (mask-guided HiFi Tuner, reconstructed); whiskers = {confidence:.0%} CIs"
    figure.suptitle(title + (" — SMOKE NUMBERS" if smoke else ""))
    return figure


def _reg_row_weight(config: dict) -> float | None:
    """The reg_weight of the suite's "+reg" row (its params, else HiFi Tuner's default)."""
    for entry in config.get("methods") or []:
        if entry.get("label") == "+reg" and entry.get("name") == "hifi_tuner":
            from methods.hifi_tuner import HifiTunerParams

            value = (entry.get("params") or {}).get("reg_weight", HifiTunerParams().reg_weight)
            return float(value) if not isinstance(value, list) else None
    return None


def write_hifi_reports(run, out: Path, resamples: int, seed: int, confidence: float) -> list[tuple[str, str]]:
    """Write the ablation table and mask-noise plot when the run has them; returns index links."""
    from data.common import atomic_write_text
    from reports.pareto import save_figure
    from reports.render import page

    files = []
    smoke = run.smoke_reasons()
    name = run.config.get("name", run.root.name)
    table = ablation_table(run.long, resamples, seed, confidence, _reg_row_weight(run.config))
    if not table.empty:
        markdown = ablation_markdown(table, smoke, confidence)
        atomic_write_text(out / "ablation.md", markdown)
        atomic_write_text(out / "ablation.csv", table.to_csv(index=False))
        body = f"<pre>{html.escape(markdown)}</pre>"
        atomic_write_text(out / "ablation.html", page("HiFi Tuner ablation", body, run_name=name))
        files.append(("ablation.html", "HiFi Tuner ablation table with paired deltas and published Table 2 (also .md, .csv)"))
    noise = mask_noise_frame(run, resamples, seed, confidence)
    if not noise.empty:
        atomic_write_text(out / "mask_noise.csv", noise.to_csv(index=False))
        save_figure(mask_noise_figure(noise, bool(smoke), confidence), out / "plots" / "mask_noise")
        files.append(("plots/mask_noise.png", "Mask-noise sensitivity: metrics vs corruption level and vs IoU (also mask_noise.csv)"))
    return files
