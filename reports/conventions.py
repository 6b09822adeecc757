"""The Conventions page: this run's images under every metric convention it was scored with,
and which convention each published source's figures use.

Published DreamBench figures differ in DINO model (ViT-S/16, ViT-S/8, DINOv2), image input
(resize-and-crop or a 224 × 224 squash), CLIP model, CLIP-T text and scale; a number means
something only next to a figure of the same convention. The page has three parts:
- per family (DINO, CLIP-I, CLIP-T), one table: a row per method entry, a column per convention
  present in the run, all over the same images (the images column says when a metric averaged
  fewer, e.g. after a scoring failure); CLIP-T adds its derived scales;
- the published rows (``reports.anchors``) with, per figure, the column of ours to read it
  against, and one line per source naming its convention;
- the variants this run was not scored with, and the command that adds them (images are not
  regenerated).
The numbers come from the summary table (``reports.tables``), so they equal the Tables page's.
"""

from __future__ import annotations

import html

import pandas as pd

from metrics.conventions import VARIANTS, Convention, variant
from reports.anchors import CITATIONS, CONVENTIONS, PUBLISHED
from reports.render import (
    FEW_NOTE,
    Cell,
    estimate,
    fmt,
    html_table,
    image_counts,
    markdown_table,
    smoke_banner,
    smoke_markdown,
    text,
)
from reports.rundata import RunData
from reports.schema import metric_label

FAMILIES = ("DINO", "CLIP-I", "CLIP-T")
DERIVED_SCALES = {  # pseudo-metrics of reports.tables.with_clip_t_scales, on clip_t's images
    "clip_t_x100": "CLIP-T × 100 (torchmetrics' scale, DreamBench++'s)",
    "clipscore": "2.5·max(CLIP-T, 0) per image (CLIPScore's scale, without Hessel's caption prefix)",
}
DERIVED_LABELS = {"clip_t_x100": "CLIP-T ×100", "clipscore": "2.5·max(CLIP-T, 0)"}
ANCHOR_METRICS = ("dino", "clip_i", "clip_t")

# Which of our metrics each published source's figures correspond to (keys of reports.anchors).
_DREAMBOOTH_COLUMNS = {"dino": "dino", "clip_i": "clip_i_b32", "clip_t": "clip_t"}
SOURCE_METRICS: dict[str, dict[str, str]] = {
    "dreambooth": _DREAMBOOTH_COLUMNS,
    "hifi_tuner": _DREAMBOOTH_COLUMNS,
    "hifi_tuner_sd14": _DREAMBOOTH_COLUMNS,
    "custom_diffusion_issue15": _DREAMBOOTH_COLUMNS,
}
SCALE_NOTES = {
    "dreambooth": "raw cosines",
    "hifi_tuner": "raw cosines",
    "hifi_tuner_sd14": "raw cosines",
    "custom_diffusion_issue15": "raw cosines",
}
# Sources with a convention but no figures on the DreamBooth protocol here.
OTHER_SOURCES = {
    "DreamBench++": (
        "Y. Peng et al. DreamBench++: A Human-Aligned Benchmark for Personalized Image Generation (2024); code "
        "github.com/yuangpeng/dreambench_plus (metrics/dino_score.py, metrics/clip_score.py). Its own 150 subjects "
        "with one reference image each, so its figures are not on the DreamBooth protocol.",
        {"dino": "dino_s8_crop", "dinov2": "dinov2_s14_crop", "clip_i": "clip_i_b32", "clip_t": "clip_t"},
        "all ×100; CLIP-T against the text file stored beside each image (whether that text holds an identifier for "
        "fine-tuned methods is not checked here)",
    ),
    "CLIPScore": (
        "J. Hessel, A. Holtzman, M. Forbes, R. Le Bras, Y. Choi. CLIPScore: A Reference-free Evaluation Metric for "
        "Image Captioning. EMNLP 2021 (reference code clipscore.py).",
        {"clip_t": "clip_t_clipscore"},
        "2.5·max(cos, 0) per image, caption prefixed with \"A photo depicts \"",
    ),
}

INTRO = (
    "Published figures differ in DINO model (ViT-S/16, ViT-S/8, DINOv2 ViT-S/14), image input (resize-and-crop or "
    "a 224×224 squash), CLIP model (ViT-B/32, ViT-L/14), CLIP-T text (without or with the identifier) and scale "
    "(cosine, ×100, CLIPScore). Each table below shows the same images of this run under every convention it was "
    "scored with; the published rows say which column to read each paper's figure against. Means over images with "
    "bootstrap confidence intervals, as on the Tables page."
)


def run_metrics(run: RunData, summary: pd.DataFrame) -> list[str]:
    """Metrics of the run with values in the summary table."""
    return [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")] if not summary.empty else []


def family_columns(family: str, present: list[str]) -> list[Convention]:
    return [row for row in VARIANTS if row.family == family and row.metric in present]


def _header_title(metric: str) -> str:
    row = variant(metric)
    if row is None:
        return DERIVED_SCALES.get(metric, metric)
    parts = [row.model, row.preprocessing] + ([f"text: {row.text}"] if row.text != "—" else []) + [row.scale]
    return f"{row.metric}: " + "; ".join(parts)


def family_table(family: str, summary: pd.DataFrame, scales: pd.DataFrame, present: list[str]):
    """(headers, header titles, rows) of one family, or None when the run has none of it."""
    metrics = [row.metric for row in family_columns(family, present)]
    if not metrics:
        return None
    frame = summary[["entry", *[c for c in summary.columns if any(c.startswith(f"{m}_") for m in metrics)]]]
    if family == "CLIP-T" and "clip_t" in metrics and not scales.empty:
        derived = [m for m in DERIVED_SCALES if f"{m}_mean" in scales]
        frame = frame.merge(scales[["entry", *[c for c in scales.columns if c.startswith(tuple(derived))]]],
                            on="entry", how="left")
        metrics = [*metrics, *derived]
    headers = ["entry", *[DERIVED_LABELS.get(m) or metric_label(m) for m in metrics], "images"]
    titles = ["method cell (@ checkpoint)", *[_header_title(m) for m in metrics],
              "images each metric averaged (one number when all agree)"]
    rows = []
    for _, row in frame.iterrows():
        cells = [text(row["entry"])]
        for metric in metrics:
            cells.append(estimate(row.get(f"{metric}_mean"), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"),
                                  n_subjects=row.get(f"{metric}_n_subjects")))
        cells.append(image_counts(row, metrics))
        rows.append(cells)
    return headers, titles, rows


def _ours(metric: str, present: list[str]) -> str:
    shown = f"{metric_label(metric)} ({metric})"
    if metric == "clip_i_b32" and "clip_i_b32" not in present:
        return shown + " — or CLIP-I (clip_i) when scored with ViT-B/32"
    return shown + ("" if metric in present else " — not in this run")


def published_rows(present: list[str]) -> tuple[list[str], list[list[Cell]]]:
    headers = ["published row", "source", *[f"{metric_label(m)}: figure → our column" for m in ANCHOR_METRICS]]
    rows = []
    for anchor in PUBLISHED:
        mapping = SOURCE_METRICS.get(anchor.source, {})
        cells = [text(anchor.name), text(anchor.source)]
        for metric in ANCHOR_METRICS:
            value = anchor.value(metric)
            if value is None:
                cells.append(Cell("—", classes="missing"))
            elif metric in mapping:
                cells.append(text(f"{fmt(value)} → {_ours(mapping[metric], present)}"))
            else:
                cells.append(text(f"{fmt(value)} → no convention recorded"))
        rows.append(cells)
    return headers, rows


def source_lines(present: list[str]) -> list[tuple[str, str]]:
    """(source, what its figures use and which of our metrics computes it), one per source."""
    lines = []
    for key, citation in CITATIONS.items():
        mapping = SOURCE_METRICS.get(key)
        ours = ("; ".join(f"{metric_label(m)} = {_ours(ours, present)}" for m, ours in mapping.items())
                if mapping else "no mapping to our metrics recorded")
        lines.append((key, f"{citation} Convention: {CONVENTIONS[key]}. Ours: {ours}; {SCALE_NOTES.get(key, 'scale not recorded')}."))
    for name, (citation, mapping, scale) in OTHER_SOURCES.items():
        ours = "; ".join(f"{'DINOv2' if m == 'dinov2' else metric_label(m)} = {_ours(o, present)}" for m, o in mapping.items())
        lines.append((name, f"{citation} Ours: {ours}; {scale}."))
    return lines


def missing_variants(present: list[str]) -> list[Convention]:
    return [row for row in VARIANTS if row.metric not in present]


def add_command(run: RunData, present: list[str]) -> str:
    """The command that scores the run with every variant too (all names: the list replaces the old one)."""
    names = list(dict.fromkeys([*(run.fingerprints or {}), *present, *[row.metric for row in VARIANTS]]))
    return f"subjectbench score {run.root} \"metrics.names=[{','.join(names)}]\""


def _sections(run: RunData, tables: dict[str, pd.DataFrame]):
    summary = tables.get("summary", pd.DataFrame())
    scales = tables.get("clip_t_scales", pd.DataFrame())
    present = run_metrics(run, summary)
    for family in FAMILIES:
        yield family, family_table(family, summary, scales, present) if not summary.empty else None
    yield "published", published_rows(present)
    yield "sources", source_lines(present)
    yield "missing", (missing_variants(present), add_command(run, present))


def conventions_html(run: RunData, tables: dict[str, pd.DataFrame]) -> str:
    body = ["<h1>Conventions</h1>", smoke_banner(run.smoke_reasons()),
            f"<p class='note'>{html.escape(INTRO)} {html.escape(FEW_NOTE)}</p>"]
    for name, content in _sections(run, tables):
        if name in FAMILIES:
            body.append(f"<h2 id='{name.lower()}'>{name}</h2>")
            if content is None:
                body.append(f"<p class='empty'>— this run has no {name} metric</p>")
            else:
                headers, titles, rows = content
                body.append(html_table(headers, rows, header_titles=titles))
        elif name == "published":
            headers, rows = content
            body.append("<h2 id='published'>Published figures and the column to read them against</h2>"
                        "<p class='note'>The papers' own figures (full DreamBooth protocol, real models) — for orientation, "
                        "never part of our statistics.</p>" + html_table(headers, rows))
        elif name == "sources":
            body.append("<h2 id='sources'>Sources and their conventions</h2><ul>"
                        + "".join(f"<li><b>{html.escape(key)}</b>: {html.escape(line)}</li>" for key, line in content) + "</ul>")
        else:
            missing, command = content
            body.append("<h2 id='available'>Conventions available but not in this run</h2>")
            if not missing:
                body.append("<p class='note'>This run was scored with every convention variant.</p>")
            else:
                body.append("<ul>" + "".join(
                    f"<li><b>{html.escape(row.metric)}</b> ({html.escape(row.family)}): {html.escape(row.model)}; "
                    f"{html.escape(row.preprocessing)}; used by {html.escape(row.used_by)}</li>" for row in missing) + "</ul>")
                body.append("<p class='note'>Add them without regenerating any image (the list replaces the run's "
                            f"metric list, so it names the present ones too):</p><pre>{html.escape(command)}</pre>")
    return "".join(body)


def conventions_markdown(run: RunData, tables: dict[str, pd.DataFrame]) -> str:
    parts = ["# Conventions\n", smoke_markdown(run.smoke_reasons()), INTRO + " " + FEW_NOTE + "\n"]
    for name, content in _sections(run, tables):
        if name in FAMILIES:
            parts.append(f"\n## {name}\n")
            parts.append(f"— this run has no {name} metric\n" if content is None else markdown_table(content[0], content[2]))
        elif name == "published":
            parts.append("\n## Published figures and the column to read them against\n")
            parts.append(markdown_table(*content))
        elif name == "sources":
            parts.append("\n## Sources and their conventions\n")
            parts.append("\n".join(f"- **{key}**: {line}" for key, line in content) + "\n")
        else:
            missing, command = content
            parts.append("\n## Conventions available but not in this run\n")
            if not missing:
                parts.append("This run was scored with every convention variant.\n")
            else:
                parts.append("\n".join(f"- `{row.metric}` ({row.family}): {row.model}; {row.preprocessing}; used by "
                                       f"{row.used_by}" for row in missing) + "\n")
                parts.append(f"\nAdd them without regenerating any image:\n\n```\n{command}\n```\n")
    return "\n".join(parts)
