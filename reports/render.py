"""Rendering: numbers to text ("—" when missing), tables to Markdown and HTML, the page frame.

Pages are self-contained static HTML (CSS inlined, relative links only) so that a report opens
from the file system, copied anywhere together with its run directory.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from importlib import resources

import pandas as pd

from reports.schema import metric_label

MISSING = "—"
NAV = (
    ("index.html", "Report"),
    ("leaderboard.html", "Leaderboard"),
    ("tables.html", "Tables"),
    ("plots.html", "Pareto plots"),
    ("conventions.html", "Conventions"),
    ("gallery/index.html", "Gallery"),
)


@dataclass(frozen=True)
class Cell:
    """One table cell: plain text (Markdown/CSV) and optional HTML; ``text`` cells align left."""

    text: str
    html: str | None = None
    align_text: bool = False
    classes: str = ""

    def as_html(self) -> str:
        return self.html if self.html is not None else html.escape(self.text)


def is_missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: object, digits: int = 3) -> str:
    return MISSING if is_missing(value) else f"{float(value):.{digits}f}"


def fmt_int(value: object) -> str:
    return MISSING if is_missing(value) else f"{int(value)}"


def text(value: object) -> Cell:
    return Cell(str(value), align_text=True)


def number(value: object, digits: int = 3) -> Cell:
    shown = fmt(value, digits)
    return Cell(shown, classes="missing" if shown == MISSING else "")


FEW_SUBJECTS = 5  # an interval from fewer subjects than this carries FEW_MARK
FEW_MARK = "†"
FEW_NOTE = (
    f"{FEW_MARK} the interval comes from fewer than {FEW_SUBJECTS} subjects: the spread between subjects is "
    "barely sampled, so it is rough and likely too narrow."
)


def estimate(mean: object, low: object, high: object, digits: int = 3, n_subjects: object = None) -> Cell:
    """'mean [low, high]'; a mean without an interval shows alone; no mean shows '—'. An interval
    from fewer than FEW_SUBJECTS subjects is marked (FEW_MARK, explained by FEW_NOTE)."""
    if is_missing(mean):
        return Cell(MISSING, classes="missing")
    if is_missing(low) or is_missing(high):
        return Cell(fmt(mean, digits))
    interval = f"[{fmt(low, digits)}, {fmt(high, digits)}]"
    if not is_missing(n_subjects) and int(n_subjects) < FEW_SUBJECTS:
        tip = f"interval from only {int(n_subjects)} subject(s): rough"
        return Cell(
            f"{fmt(mean, digits)} {interval} {FEW_MARK}",
            f"{fmt(mean, digits)}<span class='ci'>{interval}</span><span class='few' title='{tip}'>{FEW_MARK} few subjects</span>",
        )
    return Cell(f"{fmt(mean, digits)} {interval}", f"{fmt(mean, digits)}<span class='ci'>{interval}</span>")


def image_counts(row, metrics: list[str]) -> Cell:
    """How many images each metric averaged: one number when all agree, else the majority count
    and the metrics that differ (PRES averages the class-prior images, not the evaluated ones)."""
    counts = {m: int(row[f"{m}_n_images"]) for m in metrics
              if f"{m}_n_images" in row and not is_missing(row[f"{m}_n_images"])}
    if not counts:
        return Cell(MISSING, classes="missing")
    values = list(counts.values())
    main = max(set(values), key=lambda n: (values.count(n), n))
    others = [f"{metric_label(m)}: {n}" for m, n in counts.items() if n != main]
    return Cell(f"{main}" + (f" ({', '.join(others)})" if others else ""))


def metric_header(metric: str) -> str:
    return metric_label(metric)


def markdown_table(headers: list[str], rows: list[list[Cell]]) -> str:
    def clean(value: str) -> str:
        return value.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(clean(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(clean(c.text) for c in row) + " |")
    return "\n".join(lines) + "\n"


def html_table(
    headers: list[str],
    rows: list[list[Cell]],
    row_classes: list[str] | None = None,
    header_titles: list[str] | None = None,
    table_class: str = "",
) -> str:
    text_columns = [bool(rows) and rows[0][i].align_text for i in range(len(headers))]
    out = [f"<table class='{table_class}'>" if table_class else "<table>", "<thead><tr>"]
    for i, header in enumerate(headers):
        title = f" title='{html.escape(header_titles[i], quote=True)}'" if header_titles and header_titles[i] else ""
        css = " class='text'" if text_columns[i] else ""
        out.append(f"<th{css}{title}>{html.escape(header)}</th>")
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(rows):
        css = f" class='{row_classes[r]}'" if row_classes and row_classes[r] else ""
        out.append(f"<tr{css}>")
        for cell in row:
            classes = " ".join(c for c in ("text" if cell.align_text else "", cell.classes) if c)
            out.append(f"<td class='{classes}'>{cell.as_html()}</td>" if classes else f"<td>{cell.as_html()}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def stylesheet() -> str:
    return resources.files("reports").joinpath("templates", "report.css").read_text(encoding="utf-8")


def page(title: str, body: str, depth: int = 0, run_name: str = "") -> str:
    """A complete HTML page; ``depth`` is how many folders below report/ the page lives."""
    prefix = "../" * depth
    links = "".join(f"<a href='{prefix}{href}'>{html.escape(name)}</a>" for href, name in NAV)
    run = f"<span class='run'>{html.escape(run_name)}</span>" if run_name else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{stylesheet()}</style></head><body><nav>{links}{run}</nav>\n{body}\n</body></html>\n"
    )


def smoke_banner(reasons: list[str]) -> str:
    """The warning every page of a smoke run carries (empty when the run is a measurement)."""
    if not reasons:
        return ""
    items = "".join(f"<li>{html.escape(r)}</li>" for r in reasons)
    return (
        "<div class='warning'><strong>Smoke numbers — not measurements.</strong> This run's rows "
        "cannot be compared with each other as method quality or with published figures, because:"
        f"<ul>{items}</ul>They check that the pipeline runs end to end. Use a real backbone "
        "(e.g. <code>backbone=sd15</code>) and <code>metrics.weights=pretrained</code> for measurements.</div>"
    )


def smoke_markdown(reasons: list[str]) -> str:
    if not reasons:
        return ""
    lines = ["> **WARNING — smoke numbers, not measurements.** This run's rows must not be read as method quality:"]
    lines += [f"> - {reason}" for reason in reasons]
    return "\n".join(lines) + "\n\n"
