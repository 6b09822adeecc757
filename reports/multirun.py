"""``subjectbench leaderboard SOURCE ... --out SITE``: one static site from many bundles and runs.

Sources (result bundles or run directories, read by ``reports.bundle.read_source``) are grouped
by their comparability key (``reports.comparability``: protocol + metric fingerprints). Each group
is ranked on its own; the largest group comes first, and every other group says what differs
from it. Within a group, one entry is one method cell at one checkpoint with one method
fingerprint: the same entry from several sources is shown once, listing every source, and is
flagged when two sources' confidence intervals of a shown metric do not overlap. Cells with the
same name but other fingerprints (another config under the same label) stay separate rows,
named with their source.

Numbers, tables and plots come from the per-run report code (``reports.tables``,
``reports.leaderboard``, ``reports.pareto``, ``reports.render``); this module only merges.

SITE/
  index.html                sources, comparability groups and why, one leaderboard per group
  group-<x>.html            that group's leaderboard, per-category, per-subject and cost tables, pareto plots
  plots/group-<x>_pareto_<y>_vs_<x>.png/.svg
  leaderboard.csv           every ranked row of every group (group, sources, means, CIs)
  sources.json              each source: path, kind, content hash, comparability key, group, differences
"""

from __future__ import annotations

import html
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data.common import atomic_write_json, atomic_write_text
from reports import leaderboard as lb
from reports.bundle import is_bundle, read_source, resolve_source, verify_bundle
from reports.comparability import (
    differences,
    entry_fingerprints,
    metric_signature,
    protocol_signature,
    signature_key,
)
from reports.pages import cost_rows, metric_rows
from reports.pareto import PLOTS, pareto_figure, plot_points, save_figure
from reports.render import Cell, estimate, fmt, fmt_int, html_table, smoke_banner, stylesheet, text
from reports.rundata import ReportError, RunData
from reports.schema import METRIC_MEANING, metric_direction, metric_label
from reports.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from reports.tables import cost_table, summary_tables


@dataclass
class Source:
    path: Path
    name: str
    kind: str  # "bundle" | "run"
    run: RunData
    content_hash: str | None
    key: str
    tables: dict = field(default_factory=dict)
    url: str | None = None  # hub page of a bundle given as hf://datasets/...
    group: str = ""
    differs: list[str] = field(default_factory=list)


@dataclass
class Group:
    letter: str
    sources: list[Source]
    summary: pd.DataFrame  # merged entries (display names), one row each
    board: pd.DataFrame  # ranked (leaderboard_frame) with sources/flags
    by_category: pd.DataFrame
    per_subject: pd.DataFrame
    duplicates: list[dict]
    smoke: list[str]
    plots: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Site:
    index: Path
    groups: list[Group]
    notes: list[str]


def _load(paths: list[str | Path], resamples: int, seed: int, confidence: float) -> list[Source]:
    sources, names, seen = [], set(), set()
    for given in paths:
        path, url = resolve_source(given)
        if not path.exists():
            raise ReportError(f"{given}: no such bundle or run directory")
        if path in seen:
            raise ReportError(f"{given} is given twice; pass each bundle or run directory once")
        seen.add(path)
        run = read_source(path)
        bundle = is_bundle(path)
        stem = str(given).rstrip("/").split("/")[-1].split("@")[0] if url else path.name
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.add(name)
        key = signature_key(protocol_signature(run), metric_signature(run))
        source = Source(path, name, "bundle" if bundle else "run", run,
                        verify_bundle(path)["content_hash"] if bundle else None, key, url=url)
        source.tables = summary_tables(run, resamples, seed, confidence)
        sources.append(source)
    return sources


def _grouped(sources: list[Source]) -> list[list[Source]]:
    groups: dict[str, list[Source]] = {}
    for source in sources:
        groups.setdefault(source.key, []).append(source)
    # The largest group is the reference the others are described against; ties keep input order.
    ordered = sorted(groups.values(), key=lambda members: -len(members))
    reference = ordered[0][0]
    for letter, members in zip(_letters(), ordered):
        reasons = differences(members[0].run, reference.run) if members[0].key != reference.key else []
        for source in members:
            source.group, source.differs = letter, reasons
    return ordered


def _letters():
    yield from string.ascii_uppercase
    for n in range(27, 10_000):
        yield f"G{n}"


def _disjoint(a: pd.Series, b: pd.Series, metric: str) -> bool:
    low_a, high_a, low_b, high_b = (x.get(f"{metric}_ci_{s}") for x in (a, b) for s in ("low", "high"))
    if any(pd.isna(v) for v in (low_a, high_a, low_b, high_b)):
        return False
    return bool(high_a < low_b or high_b < low_a)


def _merge_entries(sources: list[Source]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict]]:
    """One row per (entry, method fingerprint) over the group's sources; see the module docstring."""
    rows = []
    for position, source in enumerate(sources):
        summary = source.tables["summary"]
        if summary.empty:
            continue
        prints = entry_fingerprints(source.run.images)
        part = summary.assign(source=source.name, _position=position,
                              fingerprint=[prints.get(c, "") for c in summary["cell_id"]])
        rows.append(part)
    if not rows:
        empty = pd.DataFrame()
        return empty, empty, empty, []
    entries = pd.concat(rows, ignore_index=True)
    # A cell name with several fingerprints in the group: each variant is named by its source(s).
    clashing = entries.groupby("cell_id")["fingerprint"].nunique()
    clashing = set(clashing[clashing > 1].index)
    metrics = [m for m in lb.SHOWN_METRICS if f"{m}_mean" in entries]
    merged, duplicates, primaries = [], [], []
    for _, frame in entries.groupby(["entry", "fingerprint"], sort=False):
        counts = frame[[f"{m}_n_images" for m in metrics if f"{m}_n_images" in frame]].max(axis=1)
        primary = frame.loc[counts.idxmax()] if counts.notna().any() else frame.iloc[0]
        names = list(frame["source"])
        row = primary.copy()
        row["sources"] = ", ".join(names)
        row["source_list"] = names
        flags = []
        for _, other in frame.iterrows():
            if other["source"] == primary["source"]:
                continue
            for metric in metrics:
                if _disjoint(primary, other, metric):
                    flags.append(f"{metric_label(metric)}: {primary['source']} {fmt(primary[f'{metric}_mean'])} "
                                 f"vs {other['source']} {fmt(other[f'{metric}_mean'])} (CIs do not overlap)")
        row["disagree"] = "; ".join(flags)
        if row["cell_id"] in clashing:
            display_cell = f"{row['cell_id']} [{'+'.join(names)}]"
            row["entry"] = row["entry"].replace(row["cell_id"], display_cell, 1)
            row["cell_id"] = display_cell
        if len(frame) > 1:
            duplicates.append({"entry": row["entry"], "sources": names, "shown": primary["source"],
                               "disagree": flags, "rows": frame})
        merged.append(row)
        primaries.append((primary["source"], primary["entry"], row["entry"], row["cell_id"]))
    summary = pd.DataFrame(merged).sort_values("_position", kind="stable").reset_index(drop=True)
    renames = pd.DataFrame(primaries, columns=["source", "entry", "display_entry", "display_cell"])

    def displayed(name: str) -> pd.DataFrame:
        parts = []
        for source in sources:
            table = source.tables.get(name, pd.DataFrame())
            if table.empty:
                continue
            kept = table.assign(source=source.name).merge(renames, on=["source", "entry"])
            parts.append(kept.assign(entry=kept["display_entry"], cell_id=kept["display_cell"]).drop(
                columns=["display_entry", "display_cell"]))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    return summary, displayed("by_category"), displayed("per_subject"), duplicates


def rank_ranges(board: pd.DataFrame, rank_by: str) -> list[str]:
    """Per ranked row: the ranks its CI allows ('1–3'): best = 1 + entries whose CI lies wholly
    above, worst = entries whose CI does not lie wholly below (itself included)."""
    higher = metric_direction(rank_by) is not False
    low, high = board.get(f"{rank_by}_ci_low"), board.get(f"{rank_by}_ci_high")
    ranked = board["rank"].notna() & (board["source"] != "published")
    out = []
    for i in board.index:
        if not ranked[i] or low is None or pd.isna(low[i]) or pd.isna(high[i]):
            out.append("")
            continue
        others = ranked & board.index.to_series().ne(i) & low.notna() & high.notna()
        better = (low[others] > high[i]) if higher else (high[others] < low[i])
        worse = (high[others] < low[i]) if higher else (low[others] > high[i])
        best, worst = 1 + int(better.sum()), int(others.sum()) + 1 - int(worse.sum())
        out.append(str(best) if best == worst else f"{best}–{worst}")
    return out


def _source_links(names: list[str]) -> str:
    return ", ".join(f"<a href='index.html#src-{html.escape(n)}'>{html.escape(n)}</a>" for n in names)


def _board_table(board: pd.DataFrame, rank_by: str, show_published: bool) -> str:
    metrics = list(lb.SHOWN_METRICS)
    headers = ["#", "rank range", "Method", "sources"]
    titles = ["rank by the mean", f"ranks allowed by the {metric_label(rank_by)} confidence intervals",
              "method cell (@ checkpoint)", "where the numbers come from (first: the one shown)"]
    for metric in metrics:
        arrow = {True: "↑", False: "↓"}.get(metric_direction(metric), "")
        headers.append(f"{metric_label(metric)} {arrow}{' (rank)' if metric == rank_by else ''}")
        titles.append(METRIC_MEANING.get(metric, metric))
    headers += ["subjects", "images"]
    titles += ["subjects with values", "images with values (largest over metrics)"]
    rows, classes = [], []
    ranges = rank_ranges(board, rank_by)
    for position, (_, row) in enumerate(board.iterrows()):
        published = row["source"] == "published"
        if published and not show_published:
            continue
        if published:
            name = Cell(f"{row['entry']} (published)", f"{html.escape(row['entry'])}<span class='badge pub'>published</span>", True)
            sources = Cell(row["citation"], html.escape(str(row["citation"])), True)
        else:
            flag = "<span class='badge smoke' title='{}'>DISAGREE</span>".format(html.escape(row["disagree"])) if row["disagree"] else ""
            name = Cell(row["entry"], f"{html.escape(row['entry'])}{flag}", True)
            sources = Cell(row["sources"], _source_links(row["source_list"]), True)
        rank = "" if published or pd.isna(row.get("rank")) else str(int(row["rank"]))
        cells = [Cell(rank, classes="rank"), Cell(ranges[position]), name, sources]
        cells += [estimate(row.get(f"{m}_mean"), row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")) for m in metrics]
        counts = [row.get(f"{m}_n_images") for m in metrics if not pd.isna(row.get(f"{m}_n_images", np.nan))]
        cells += [Cell("30" if published else fmt_int(row.get(f"{metrics[0]}_n_subjects"))),
                  Cell("3000" if published else (fmt_int(max(counts)) if counts else "—"))]
        rows.append(cells)
        classes.append("published" if published else "")
    return html_table(headers, rows, classes, titles)


def _page(title: str, body: str, groups: list[Group]) -> str:
    links = "<a href='index.html'>Leaderboard</a>" + "".join(
        f"<a href='group-{g.letter.lower()}.html'>Group {g.letter}</a>" for g in groups)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{stylesheet()}</style></head><body><nav>{links}<span class='run'>subjectbench leaderboard</span></nav>\n"
            f"{body}\n</body></html>\n")


def _relative(path: Path, site: Path) -> str:
    return Path(os.path.relpath(path, site)).as_posix()


def _source_table(sources: list[Source], site: Path) -> str:
    headers = ["source", "kind", "group", "suite", "backbone", "entries", "images", "content hash", "links"]
    rows = []
    for s in sources:
        base = _relative(s.path, site)
        links = [f"<a href='{html.escape(base)}/'>folder</a>"]
        if s.url:
            links = [f"<a href='{html.escape(s.url)}'>hub dataset</a>"]
        elif s.kind == "bundle":
            links.append(f"<a href='{html.escape(base)}/README.md'>dataset card</a>")
        elif (s.path / "report" / "index.html").is_file():
            links.append(f"<a href='{html.escape(base)}/report/index.html'>run report</a>")
        entries = s.tables["summary"]["entry"].nunique() if not s.tables["summary"].empty else 0
        badge = "<span class='badge smoke'>SMOKE</span>" if s.run.smoke_reasons() else ""
        rows.append([
            Cell(s.name, f"<span id='src-{html.escape(s.name)}'>{html.escape(s.name)}</span>{badge}", True),
            text(s.kind), text(s.group), text(s.run.config.get("name", "?")), text(s.run.config.get("backbone", "?")),
            Cell(str(entries)), Cell(str(len(s.run.images))),
            Cell(s.content_hash or "", f"<code title='{s.content_hash}'>{s.content_hash[:16]}…</code>" if s.content_hash
                 else "<span class='muted'>run directory (not hashed)</span>", True),
            Cell(str(s.path), " · ".join(links), True),
        ])
    return html_table(headers, rows)


def _group(letter: str, sources: list[Source], rank_by: str) -> Group:
    summary, by_category, per_subject, duplicates = _merge_entries(sources)
    reasons: dict[str, list[str]] = {}
    for source in sources:
        for reason in source.run.smoke_reasons():
            reasons.setdefault(reason, []).append(source.name)
    smoke = [f"{reason} ({', '.join(names)})" for reason, names in sorted(reasons.items())]
    if summary.empty:
        board = pd.DataFrame()
    else:
        board = lb.leaderboard_frame(summary, rank_by, smoke=bool(smoke))
    return Group(letter, sources, summary, board, by_category, per_subject, duplicates, smoke)


def _check_rank_by(rank_by: str, sources: list[Source]) -> None:
    metrics = sorted({m for s in sources for m in s.run.fingerprints})
    if rank_by not in metrics:
        raise ReportError(f"--rank-by {rank_by!r} is not scored by any source; scored: {', '.join(metrics) or 'nothing'}")


def _group_section(group: Group, reference: Group, rank_by: str, confidence: float, heading: str = "h2") -> str:
    names = ", ".join(s.name for s in group.sources)
    parts = [f"<{heading} id='group-{group.letter.lower()}'>Group {group.letter}: {html.escape(names)}</{heading}>"]
    if group is not reference:
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in group.sources[0].differs)
        parts.append(f"<div class='warning'><strong>Not ranked with group {reference.letter}.</strong> "
                     f"Compared with {html.escape(reference.sources[0].name)}:<ul>{reasons}</ul></div>")
    parts.append(smoke_banner(group.smoke))
    if group.board.empty:
        parts.append("<p class='empty'>— no scored images</p>")
        return "".join(parts)
    direction = "higher first" if metric_direction(rank_by) is not False else "lower first"
    parts.append(f"<p class='note'>Ranked by {html.escape(metric_label(rank_by))} ({direction}); ties share a rank. "
                 f"Means over images with {confidence:.0%} hierarchical-bootstrap CIs, computed per source. "
                 "'rank range': the ranks the CIs allow."
                 + (f" Details: <a href='group-{group.letter.lower()}.html'>tables and plots of group {group.letter}</a>."
                    if heading == "h2" else "") + "</p>")
    parts.append(_board_table(group.board, rank_by, show_published=not group.smoke))
    if group.duplicates:
        items = []
        for d in group.duplicates:
            verdict = ("<strong>disagree</strong>: " + html.escape("; ".join(d["disagree"]))) if d["disagree"] else "agree within their CIs"
            items.append(f"<li>{html.escape(d['entry'])}: submitted by {_source_links(d['sources'])}; shown from "
                         f"{html.escape(d['shown'])}; {verdict}</li>")
        parts.append(f"<h3>Submitted more than once</h3><ul>{''.join(items)}</ul>")
    return "".join(parts)


def _group_page(group: Group, groups: list[Group], rank_by: str, confidence: float) -> str:
    body = [_group_section(group, groups[0], rank_by, confidence, heading="h1")]
    for name, table, keys, intervals in (("By prompt category", group.by_category, ["entry", "category"], True),
                                         ("Per subject", group.per_subject, ["entry", "subject", "kind"], False)):
        body.append(f"<h2>{name}</h2>")
        if table.empty:
            body.append("<p class='empty'>— no scored images</p>")
            continue
        keep = [c for c in table.columns if c in keys or c.endswith(("_mean", "_ci_low", "_ci_high", "_n_images"))]
        headers, rows = metric_rows(table[keep], keys, intervals=intervals)
        body.append(html_table(headers, rows))
    costs = [cost_table(s.run).assign(source=s.name) for s in group.sources]
    costs = pd.concat([c for c in costs if not c.empty], ignore_index=True) if any(not c.empty for c in costs) else pd.DataFrame()
    body.append("<h2>Cost</h2><p class='note'>Per method cell and source, as measured on the source's own hardware "
                "(device class beside each figure).</p>")
    if costs.empty:
        body.append("<p class='empty'>— nothing prepared</p>")
    else:
        headers, rows = cost_rows(costs.assign(cell_id=costs["cell_id"] + " (" + costs["source"] + ")"))
        body.append(html_table(headers, rows))
    body.append("<h2>Pareto plots</h2><div class='plots'>" + "".join(
        f"<a href='{base}.svg'><img src='{base}.png' alt='{html.escape(title)}'></a>" for base, title in group.plots) + "</div>")
    return _page(f"Group {group.letter}", "".join(body), groups)


def _csv(groups: list[Group]) -> pd.DataFrame:
    frames = []
    for group in groups:
        if group.board.empty:
            continue
        ours = group.board[group.board["source"] != "published"]
        keep = ["rank", "entry", "sources", "disagree", "method", "cell_id", "checkpoint", "fingerprint"]
        metrics = [c for c in ours.columns if c.endswith(("_mean", "_ci_low", "_ci_high", "_n_subjects", "_n_images"))]
        frames.append(ours[keep + metrics].assign(group=group.letter))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_site(
    paths: list[str | Path],
    out: str | Path,
    rank_by: str = lb.DEFAULT_RANK_BY,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Site:
    """Merge ``paths`` (bundles or run directories) into a static site under ``out``."""
    if not paths:
        raise ReportError("give at least one bundle or run directory")
    sources = _load(paths, resamples, seed, confidence)
    _check_rank_by(rank_by, sources)
    site = Path(out).expanduser().resolve()
    if any(site == s.path or s.path in site.parents for s in sources) or any(site in s.path.parents for s in sources):
        raise ReportError(f"--out {site} overlaps a source folder; write the site elsewhere")
    site.mkdir(parents=True, exist_ok=True)
    groups = [_group(letter, members, rank_by) for letter, members in zip(_letters(), _grouped(sources))]
    for group in groups:
        for y_metric, x_metric in PLOTS:
            base = f"plots/group-{group.letter.lower()}_pareto_{y_metric}_vs_{x_metric}"
            points = plot_points(group.summary, y_metric, x_metric)
            save_figure(pareto_figure(points, y_metric, x_metric, bool(group.smoke), confidence), site / base)
            group.plots.append((base, f"{metric_label(y_metric)} vs {metric_label(x_metric)}"))
        atomic_write_text(site / f"group-{group.letter.lower()}.html", _group_page(group, groups, rank_by, confidence))

    notes = []
    for group in groups[1:]:
        notes.append(f"group {group.letter} ({', '.join(s.name for s in group.sources)}) is not ranked with group "
                     f"{groups[0].letter}: {'; '.join(group.sources[0].differs)}")
    for group in groups:
        notes += [f"{d['entry']} disagrees between {', '.join(d['sources'])}: {'; '.join(d['disagree'])}"
                  for d in group.duplicates if d["disagree"]]
    body = ["<h1>Leaderboard</h1>",
            f"<p class='note'>{len(sources)} source(s) in {len(groups)} comparability group(s). Entries are ranked "
            "together only when their protocol (dataset checksums, prompts, images per prompt, seed rule, sampler, "
            "resolution) and metric fingerprints match.</p>",
            "<h2>Sources</h2>", _source_table(sources, site)]
    if len(groups) > 1:
        body.append("<div class='info'><strong>Groups not ranked together:</strong><ul>" + "".join(
            f"<li>{html.escape(n)}</li>" for n in notes[:len(groups) - 1]) + "</ul></div>")
    for group in groups:
        body.append(_group_section(group, groups[0], rank_by, confidence))
        body.append("<div class='plots'>" + "".join(
            f"<a href='group-{group.letter.lower()}.html'><img src='{base}.png' alt='{html.escape(title)}'></a>"
            for base, title in group.plots) + "</div>")
    index = site / "index.html"
    atomic_write_text(index, _page("subjectbench leaderboard", "".join(body), groups))
    atomic_write_text(site / "leaderboard.csv", _csv(groups).to_csv(index=False))
    atomic_write_json(site / "sources.json", [
        {"name": s.name, "path": str(s.path), "url": s.url, "kind": s.kind, "content_hash": s.content_hash, "key": s.key,
         "group": s.group, "differs_from_group_" + groups[0].letter: s.differs,
         "protocol": protocol_signature(s.run), "metrics": metric_signature(s.run)}
        for s in sources
    ])
    return Site(index, groups, notes)
