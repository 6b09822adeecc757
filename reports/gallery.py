"""The image gallery: static HTML pages that open from the file system, no server.

``report/gallery/index.html`` lists the subjects (with their reference images) and, per method
entry, one sample image per subject; ``report/gallery/<subject>.html`` shows the subject's
reference images, then one row per prompt with the generated images of every entry side by side.
Images link relatively to ``RUN_DIR/images``; images larger than a thumbnail get a JPEG
thumbnail under ``report/thumbs`` (rebuilt only when the image is newer). Reference images live
outside the run directory, so they are copied (as thumbnails) under ``report/gallery/references``.
"""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from PIL import Image

from data.common import atomic_write_image
from reports.leaderboard import slug
from reports.render import MISSING, fmt, page, smoke_banner
from reports.rundata import RunData
from reports.schema import metric_label, ordered_metrics
from reports.tables import entry_order

THUMB_PX = 192  # larger images get a thumbnail of this size (2x the displayed 96 px)


def _safe_name(subject: str) -> str:
    """A file name for a subject id, unique per id: ids that are already plain lower-case names
    keep them; any other id gets its slug plus a short hash ('a#b' and 'a_b' stay apart, and so do
    'Dog' and 'dog' on case-insensitive disks)."""
    if re.fullmatch(r"[a-z0-9_-]+", subject):
        return subject
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", subject).strip("_").lower() or "subject"
    return f"{readable}-{hashlib.sha1(subject.encode()).hexdigest()[:8]}"


def _subject_file(subject: str) -> str:
    return f"s-{_safe_name(subject)}.html"


def _url(path: str) -> str:
    """A relative path as a link: '#', '?', '%' and spaces in names must not end the path."""
    return quote(path, safe="/")


def _thumbnail(source: Path, target: Path, size: int = THUMB_PX) -> bool:
    """Write a JPEG thumbnail of ``source`` to ``target`` unless an up-to-date one exists."""
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return True
    try:
        with Image.open(source) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            atomic_write_image(target, image, "JPEG", quality=85)
        return True
    except OSError:
        return False


class _Images:
    """Where the gallery's <img> for a run image points (relative to report/gallery/)."""

    def __init__(self, run: RunData, report_dir: Path):
        self.run = run
        self.report_dir = report_dir

    def links(self, relative: str) -> tuple[str, str]:
        """(thumbnail src, full image href), both relative to report/gallery/."""
        source = self.run.root / relative
        full = _url("../../" + Path(relative).as_posix())
        try:
            with Image.open(source) as image:
                small = max(image.size) <= THUMB_PX
        except OSError:
            return full, full
        if small:
            return full, full
        thumb = self.report_dir / "thumbs" / Path(relative).with_suffix(".jpg")
        if _thumbnail(source, thumb):
            return _url("../" + thumb.relative_to(self.report_dir).as_posix()), full
        return full, full


def _reference_strip(run: RunData, subject: dict, report_dir: Path, limit: int | None = None, small: bool = False) -> str:
    images = subject.get("images", [])[:limit] if limit else subject.get("images", [])
    out = []
    for i, path in enumerate(images):
        source = Path(path)
        target = report_dir / "gallery" / "references" / _safe_name(subject["id"]) / f"{i:02d}-{source.stem}.jpg"
        if source.is_file() and _thumbnail(source, target, 256):
            src = _url(target.relative_to(report_dir / "gallery").as_posix())
            out.append(f"<img src='{html.escape(src)}' alt='reference {i}' title='{html.escape(str(source), quote=True)}' loading='lazy'>")
        else:
            out.append(f"<span class='empty'>reference not found: {html.escape(str(source))}</span>")
    return f"<div class='refs-strip{' small' if small else ''}'>{''.join(out)}</div>"


def _tooltips(run: RunData) -> dict[str, str]:
    """Per image key: its metric values, for the image's hover text."""
    if run.long.empty:
        return {}
    wide = run.long.pivot_table(index="key", columns="metric", values="value", aggfunc="first")
    metrics = ordered_metrics(wide.columns)
    return {key: "; ".join(f"{metric_label(m)} {fmt(row[m])}" for m in metrics if not pd.isna(row[m])) for key, row in wide.iterrows()}


def _image_cell(units: pd.DataFrame, done: set[str], links: _Images, tips: dict[str, str], failures: dict) -> str:
    out = []
    for _, unit in units.sort_values("k").iterrows():
        if unit["key"] in done:
            src, href = links.links(unit["image"])
            tip = f"k={unit['k']} seed={unit['seed']}" + (f" — {tips[unit['key']]}" if unit["key"] in tips else "")
            out.append(f"<a href='{html.escape(href)}'><img src='{html.escape(src)}' alt='{html.escape(unit['prompt_text'])}' "
                       f"title='{html.escape(tip, quote=True)}' loading='lazy'></a>")
        else:
            failed = unit["key"] in failures or unit["prepare_key"] in failures
            out.append(f"<span class='empty' title='{'failed: see failures/' if failed else 'not generated yet'}'>"
                       f"{MISSING} {'failed' if failed else 'pending'}</span>")
    return f"<div class='thumbs'>{''.join(out)}</div>"


def _planned(run: RunData) -> pd.DataFrame:
    """Every planned unit with the entry name and image path the gallery shows."""
    from reports.long import entry_names

    plan = run.plan.copy()
    plan["entry"] = entry_names(plan)
    plan["image"] = [
        str(run.store.image_path(m, s, k).relative_to(run.root)) for m, s, k in zip(plan["label"], plan["subject"], plan["key"])
    ]
    return plan


def build_gallery(run: RunData, report_dir: Path) -> Path:
    """Write the gallery pages under ``report_dir/gallery``; returns the index page."""
    gallery_dir = report_dir / "gallery"
    gallery_dir.mkdir(parents=True, exist_ok=True)
    plan = _planned(run)
    order = entry_order(plan)
    done = set(run.images["key"]) if not run.images.empty else set()
    links = _Images(run, report_dir)
    tips = _tooltips(run)
    banner = smoke_banner(run.smoke_reasons())
    subjects = {s["id"]: s for s in run.subjects}
    name = run.config.get("name", run.root.name)
    subject_ids = list(dict.fromkeys(plan["subject"]))

    for subject_id in subject_ids:
        units = plan[plan["subject"] == subject_id]
        first = units.iloc[0]
        body = [f"<h1>{html.escape(subject_id)} <span class='muted'>({html.escape(first['class_noun'])}, {html.escape(first['kind'])})</span></h1>", banner]
        heading = "Reference images"
        if subjects.get(subject_id, {}).get("scene"):  # the scene + instance task: scene, then instance
            scene = {**subjects[subject_id], "id": f"{subject_id}-scene", "images": subjects[subject_id]["scene"]}
            body.append("<h2>Scene</h2>" + _reference_strip(run, scene, report_dir))
            heading = "Instance (reference images)"
        body.append(f"<h2>{heading}</h2>" + (_reference_strip(run, subjects[subject_id], report_dir) if subject_id in subjects else ""))
        body.append("<h2>Generated images</h2><p class='note'>One row per prompt, one column per method entry; "
                    "hover an image for its seed and scores, click for the full image.</p>")
        headers = "".join(f"<th class='text' id='{slug(e)}'>{html.escape(e)}</th>" for e in order)
        rows = []
        prompts = units.drop_duplicates(["role", "template"]).sort_values(["role", "prompt_index"])
        for _, prompt in prompts.iterrows():
            same = units[(units["role"] == prompt["role"]) & (units["template"] == prompt["template"])]
            cells = "".join(
                f"<td>{_image_cell(same[same['entry'] == e], done, links, tips, run.failures)}</td>" if (same["entry"] == e).any() else "<td></td>"
                for e in order
            )
            label = html.escape(prompt["eval_text"] if prompt["role"] == "prior" else prompt["prompt_text"])
            rows.append(f"<tr><td class='prompt'>{label}<br><span class='cat'>{html.escape(prompt['category'])}</span></td>{cells}</tr>")
        body.append(f"<table class='gallery'><thead><tr><th class='text'>prompt</th>{headers}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        (gallery_dir / _subject_file(subject_id)).write_text(
            page(f"{subject_id} — gallery", "".join(body), depth=1, run_name=name), encoding="utf-8"
        )

    body = ["<h1>Gallery</h1>", banner,
            "<p class='note'>One row per subject: its reference images (green frame), then one sample per method "
            "entry (first prompt, k = 0). Click a subject or a sample for every prompt and image of that subject.</p>"]
    evaluated = plan[plan["role"] == "eval"]
    headers = "".join(f"<th class='text' id='{slug(e)}'>{html.escape(e)}</th>" for e in order)
    rows = []
    for subject_id in subject_ids:
        units = plan[plan["subject"] == subject_id]
        first = units.iloc[0]
        strip = _reference_strip(run, subjects[subject_id], report_dir, limit=4, small=True) if subject_id in subjects else ""
        cells = []
        for entry in order:
            samples = evaluated[(evaluated["subject"] == subject_id) & (evaluated["entry"] == entry)]
            if samples.empty:
                cells.append("<td></td>")
                continue
            unit = samples.sort_values(["prompt_index", "k"]).iloc[0]
            link = f"{_subject_file(subject_id)}#{slug(entry)}"
            if unit["key"] in done:
                src, _ = links.links(unit["image"])
                cells.append(f"<td><a href='{html.escape(link)}'><img class='thumb' src='{html.escape(src)}' loading='lazy' "
                             f"title='{html.escape(unit['prompt_text'], quote=True)}'></a></td>")
            else:
                failed = unit["key"] in run.failures or unit["prepare_key"] in run.failures
                cells.append(f"<td><a class='empty' href='{html.escape(link)}'>{MISSING} {'failed' if failed else 'pending'}</a></td>")
        name_cell = (f"<td class='prompt'><a href='{_subject_file(subject_id)}'><b>{html.escape(subject_id)}</b></a><br>"
                     f"<span class='cat'>{html.escape(first['class_noun'])}, {html.escape(first['kind'])}</span></td>")
        rows.append(f"<tr>{name_cell}<td>{strip}</td>{''.join(cells)}</tr>")
    body.append(f"<table class='gallery'><thead><tr><th class='text'>subject</th><th class='text'>references</th>{headers}"
                f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    index = gallery_dir / "index.html"
    index.write_text(page("Gallery", "".join(body), depth=1, run_name=name), encoding="utf-8")
    return index
