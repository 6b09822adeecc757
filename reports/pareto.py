"""Pareto plots: subject fidelity (DINO or CLIP-I) against prompt fidelity (CLIP-T).

One point per method entry (cell @ checkpoint) with its bootstrap-CI whiskers; the pareto
frontier (entries no other entry beats on both axes) as a dashed staircase; checkpoint sweeps
joined in step order with arrows; published figures as hollow diamonds (only when the run is a
measurement — smoke numbers live on another scale). Labels are placed by a greedy search over
offsets around each point so that no two label boxes overlap (``place_labels``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox
from numpy.typing import ArrayLike

from reports.anchors import PUBLISHED
from reports.schema import metric_direction, metric_label

PLOTS = (("dino", "clip_t"), ("clip_i", "clip_t"))  # (y, x)
AXIS_MEANING = {"dino": "subject fidelity", "clip_i": "subject fidelity", "clip_t": "prompt fidelity"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
FIGSIZE = (8.6, 6.4)
DPI = 110


def plot_points(summary: pd.DataFrame, y_metric: str, x_metric: str) -> pd.DataFrame:
    """Entries that have both metrics, with means and CI bounds as x/y columns."""
    needed = [f"{y_metric}_mean", f"{x_metric}_mean"]
    if summary.empty or any(c not in summary for c in needed):
        return pd.DataFrame(columns=["entry", "cell_id", "checkpoint", "checkpoint_index", "x", "y"])
    points = summary.dropna(subset=needed).copy()
    for axis, metric in (("x", x_metric), ("y", y_metric)):
        points[axis] = points[f"{metric}_mean"]
        points[f"{axis}_low"] = points.get(f"{metric}_ci_low", points[axis])
        points[f"{axis}_high"] = points.get(f"{metric}_ci_high", points[axis])
    return points.reset_index(drop=True)


def pareto_mask(x: ArrayLike, y: ArrayLike, x_higher: bool = True, y_higher: bool = True) -> np.ndarray:
    """True for points that no other point is at least as good as on both axes and better on one."""
    sx = np.asarray(x, dtype=float) * (1 if x_higher else -1)
    sy = np.asarray(y, dtype=float) * (1 if y_higher else -1)
    keep = np.ones(len(sx), dtype=bool)
    for i in range(len(sx)):
        dominated = (sx >= sx[i]) & (sy >= sy[i]) & ((sx > sx[i]) | (sy > sy[i]))
        keep[i] = not dominated.any()
    return keep


def frontier_path(x: ArrayLike, y: ArrayLike, x_higher: bool = True, y_higher: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The staircase bounding the region the frontier points dominate (through the points, never
    through a better corner that no entry reaches)."""
    sign_x, sign_y = (1 if x_higher else -1), (1 if y_higher else -1)
    sx, sy = np.asarray(x, float) * sign_x, np.asarray(y, float) * sign_y
    order = np.argsort(sx)
    sx, sy = sx[order], sy[order]
    path_x, path_y = [sx[0]], [sy[0]]
    for i in range(1, len(sx)):
        path_x += [sx[i - 1], sx[i]]
        path_y += [sy[i], sy[i]]
    return np.array(path_x) * sign_x, np.array(path_y) * sign_y


def _overlap(a: Bbox, b: Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _candidate_offsets():
    """(dx, dy) in points, nearest first: 16 directions on growing rings."""
    for radius in (7, 14, 22, 32, 44, 58, 74, 92, 112):
        for step in range(16):
            angle = np.pi / 4 + step * np.pi / 8
            yield radius * np.cos(angle), radius * np.sin(angle)


def _align(annotation, dx: float, dy: float) -> None:
    annotation.set_ha("left" if dx > 1 else ("right" if dx < -1 else "center"))
    annotation.set_va("bottom" if dy > 1 else ("top" if dy < -1 else "center"))


def place_labels(
    ax: Axes,
    xs: np.ndarray,
    ys: np.ndarray,
    labels: list[str],
    fontsize: float = 8.0,
    color: str | list | None = None,
    whiskers: list[tuple[float, float, float, float]] | tuple = (),
) -> list[Annotation]:
    """Annotate (x, y) points with ``labels`` so that label boxes overlap neither each other nor
    the points; a label moved away from its point gets a thin leader line. ``whiskers``: data
    boxes (x0, y0, x1, y1) of CI whiskers, avoided when possible.

    The figure's layout must be final (call ``figure.draw_without_rendering()`` and fix the
    layout first): boxes are measured in pixels, and a later relayout would move the points.
    """
    renderer = ax.figure.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    pixels = ax.transData.transform(np.column_stack([xs, ys])) if len(xs) else np.zeros((0, 2))
    point_boxes = [Bbox.from_extents(px - 4, py - 4, px + 4, py + 4) for px, py in pixels]
    whisker_boxes = []
    for x0, y0, x1, y1 in whiskers:
        (a, b), (c, d) = ax.transData.transform([(x0, y0), (x1, y1)])
        whisker_boxes.append(Bbox.from_extents(min(a, c) - 2, min(b, d) - 2, max(a, c) + 2, max(b, d) + 2))
    colors = list(color) if isinstance(color, (list, tuple)) else [color] * len(labels)
    placed: list[Bbox] = []
    annotations = []
    # Labels of crowded points first: they have the fewest free places.
    density = [sum(_overlap(b.expanded(12, 6), o) > 0 for o in point_boxes) for b in point_boxes]
    for index in sorted(range(len(labels)), key=lambda i: -density[i]):
        style = {"fontsize": fontsize, "color": colors[index] or "black", "zorder": 6,
                 "bbox": {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}}
        probe = ax.annotate(labels[index], (xs[index], ys[index]), xytext=(0, 0), textcoords="offset points", **style)
        best, best_cost = None, None
        for dx, dy in _candidate_offsets():
            probe.set_position((dx, dy))
            _align(probe, dx, dy)
            box = probe.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for other in placed)
            cost += sum(_overlap(box, other) for other in point_boxes)
            cost += 0.5 * sum(_overlap(box, other) for other in whisker_boxes)
            cost += 10 * (box.width * box.height - _overlap(box, axes_box))
            if best_cost is None or cost < best_cost:
                best, best_cost = (dx, dy, box), cost
            if cost == 0:
                break
        probe.remove()
        dx, dy, box = best
        leader = {"arrowstyle": "-", "color": "#9aa3b2", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4}
        annotation = ax.annotate(
            labels[index], (xs[index], ys[index]), xytext=(dx, dy), textcoords="offset points",
            arrowprops=leader if np.hypot(dx, dy) > 10 else None, **style,
        )
        _align(annotation, dx, dy)
        placed.append(box)
        annotations.append(annotation)
    return annotations


def label_boxes(annotations: list[Annotation]) -> list[Bbox]:
    """Pixel boxes of the label texts (leader lines excluded), for checking that none overlap."""
    from matplotlib.text import Text

    renderer = annotations[0].figure.canvas.get_renderer() if annotations else None
    # Annotation.get_window_extent would include the leader line; the text box is what must not collide.
    return [Text.get_window_extent(a, renderer) for a in annotations]


def _axis_label(metric: str, axis: str) -> str:
    meaning = AXIS_MEANING.get(metric, "")
    higher = metric_direction(metric) is not False
    arrow = {("x", True): "→ better", ("x", False): "← better", ("y", True): "↑ better", ("y", False): "↓ better"}[(axis, higher)]
    return f"{metric_label(metric)} (cosine similarity{', ' + meaning if meaning else ''}; {arrow})"


def pareto_figure(
    points: pd.DataFrame,
    y_metric: str,
    x_metric: str,
    smoke: bool = False,
    confidence: float = 0.95,
) -> Figure:
    """The plot of ``points`` (from :func:`plot_points`)."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.grid(True, color="#e3e7ee", linewidth=0.7)
    ax.set_axisbelow(True)
    ax.set_xlabel(_axis_label(x_metric, "x"))
    ax.set_ylabel(_axis_label(y_metric, "y"))
    title = f"{metric_label(y_metric)} vs {metric_label(x_metric)}: one point per method entry, {confidence:.0%} CI whiskers"
    ax.set_title(title, fontsize=10.5)
    if smoke:
        figure.suptitle("SMOKE NUMBERS — random-init backbone or metric weights; not a measurement",
                        color="#c2410c", fontsize=11, fontweight="bold")
    if points.empty:
        ax.text(0.5, 0.5, f"no entry has both {metric_label(y_metric)} and {metric_label(x_metric)}",
                ha="center", va="center", transform=ax.transAxes, color="#5b6475")
        return figure
    cells = list(dict.fromkeys(points["cell_id"]))
    palette = matplotlib.colormaps["tab10"] if len(cells) <= 10 else matplotlib.colormaps["tab20"]
    style = {cell: (palette(i % palette.N), MARKERS[i % len(MARKERS)]) for i, cell in enumerate(cells)}
    label_x, label_y, label_text, label_color = [], [], [], []
    for cell in cells:
        rows = points[points["cell_id"] == cell].sort_values("checkpoint_index")
        color, marker = style[cell]
        xerr = np.abs(np.vstack([rows["x"] - rows["x_low"], rows["x_high"] - rows["x"]]).astype(float))
        yerr = np.abs(np.vstack([rows["y"] - rows["y_low"], rows["y_high"] - rows["y"]]).astype(float))
        ax.errorbar(rows["x"], rows["y"], xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), fmt=marker,
                    color=color, ecolor=color, elinewidth=0.9, capsize=2.5, markersize=7, alpha=0.95,
                    label=cell, zorder=4, markeredgecolor="white", markeredgewidth=0.6)
        sweep = len(rows) > 1
        if sweep:
            xs, ys = rows["x"].to_numpy(float), rows["y"].to_numpy(float)
            for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys)):
                ax.annotate("", (x1, y1), (x0, y0), zorder=3,
                            arrowprops={"arrowstyle": "-|>", "color": color, "linewidth": 1.2, "shrinkA": 5, "shrinkB": 5,
                                        "mutation_scale": 10, "alpha": 0.8})
        for _, row in rows.iterrows():
            label_x.append(row["x"])
            label_y.append(row["y"])
            label_text.append(row["checkpoint"] if sweep else cell)
            label_color.append(color)
    x_higher = metric_direction(x_metric) is not False
    y_higher = metric_direction(y_metric) is not False
    front = pareto_mask(points["x"].to_numpy(), points["y"].to_numpy(), x_higher, y_higher)
    if front.any():
        xs, ys = frontier_path(points["x"].to_numpy()[front], points["y"].to_numpy()[front], x_higher, y_higher)
        ax.plot(xs, ys, linestyle="--", color="#343a40", linewidth=1.1, zorder=2, label="pareto frontier")
    if not smoke:
        published = [(a.value(x_metric), a.value(y_metric), a.name) for a in PUBLISHED]
        published = [(x, y, name) for x, y, name in published if x is not None and y is not None]
        if published:
            ax.scatter([p[0] for p in published], [p[1] for p in published], marker="D", facecolors="none",
                       edgecolors="#6b5b95", s=40, zorder=4, label="published figures (not this run)")
            for x, y, name in published:
                label_x.append(x)
                label_y.append(y)
                label_text.append(f"{name} (published)")
                label_color.append("#6b5b95")
    _pad_limits(ax, np.array(label_x, float), np.array(label_y, float), points)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="method entry", title_fontsize=8.5)
    # Freeze the layout before measuring label boxes in pixels (see place_labels).
    figure.draw_without_rendering()
    figure.set_layout_engine("none")
    whiskers = [(lo, y, hi, y) for lo, hi, y in zip(points["x_low"], points["x_high"], points["y"])]
    whiskers += [(x, lo, x, hi) for lo, hi, x in zip(points["y_low"], points["y_high"], points["x"])]
    whiskers = [w for w in whiskers if not np.isnan(w).any()]
    place_labels(ax, np.array(label_x, float), np.array(label_y, float), label_text, color=label_color, whiskers=whiskers)
    return figure


def _pad_limits(ax, xs: np.ndarray, ys: np.ndarray, points: pd.DataFrame) -> None:
    """Limits that hold every point and whisker, with room around them for labels."""
    lows_x = np.concatenate([xs, points["x_low"].dropna().to_numpy(float)])
    highs_x = np.concatenate([xs, points["x_high"].dropna().to_numpy(float)])
    lows_y = np.concatenate([ys, points["y_low"].dropna().to_numpy(float)])
    highs_y = np.concatenate([ys, points["y_high"].dropna().to_numpy(float)])
    for setter, low, high in ((ax.set_xlim, lows_x.min(), highs_x.max()), (ax.set_ylim, lows_y.min(), highs_y.max())):
        span = high - low if high > low else max(abs(high), 1e-3) * 0.1
        setter(low - 0.18 * span, high + 0.18 * span)


def save_figure(figure: Figure, base: Path) -> list[Path]:
    """PNG and SVG next to each other; the SVG without a date, so rebuilds are byte-stable."""
    base.parent.mkdir(parents=True, exist_ok=True)
    png, svg = base.with_suffix(".png"), base.with_suffix(".svg")
    figure.savefig(png, dpi=DPI, metadata={"Software": None})
    with matplotlib.rc_context({"svg.hashsalt": "subjectbench"}):
        figure.savefig(svg, metadata={"Date": None})
    return [png, svg]


# ----------------------------------------------------------------------------- families' fronts


def hypervolume(
    x: ArrayLike, y: ArrayLike, reference: tuple[float, float], x_higher: bool = True, y_higher: bool = True
) -> float:
    """Area dominated by the points and dominating ``reference`` (2-D hypervolume).

    The union of the rectangles spanned by ``reference`` and each point, in the metrics' units
    (points no better than the reference on an axis add nothing).
    """
    sign_x, sign_y = (1 if x_higher else -1), (1 if y_higher else -1)
    sx, sy = np.asarray(x, float) * sign_x, np.asarray(y, float) * sign_y
    rx, ry = reference[0] * sign_x, reference[1] * sign_y
    keep = (sx > rx) & (sy > ry) & ~np.isnan(sx) & ~np.isnan(sy)
    area, best_y = 0.0, ry
    for index in np.argsort(-sx[keep], kind="stable"):
        px, py = sx[keep][index], sy[keep][index]
        if py > best_y:
            area += (px - rx) * (py - best_y)
            best_y = py
    return float(area)


def front_hypervolumes(
    per_subject: pd.DataFrame,
    x_higher: bool = True,
    y_higher: bool = True,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame, tuple[float, float]]:
    """Each family's pareto front, its hypervolume with a bootstrap CI over subjects, and the
    paired differences between families.

    ``per_subject``: one row per (family, point, subject) with the subject's mean ``x`` and ``y``
    for that point (a point = a method entry, cell @ checkpoint). A point's value is the mean over
    subjects. The reference point is the worst observed point value on each axis over all
    families (shared, so the families' hypervolumes compare within a plot; not across runs).
    Each bootstrap replicate draws subjects with replacement — the same draw for every family,
    so differences are paired — recomputes every point's mean, each family's front and its
    hypervolume. Returns (fronts: family, hypervolume, ci_low, ci_high, n_subjects, n_points,
    frontier; differences: family_a, family_b, difference, ci_low, ci_high; reference).
    """
    columns = ["family", "hypervolume", "ci_low", "ci_high", "n_subjects", "n_points", "frontier"]
    diff_columns = ["family_a", "family_b", "difference", "ci_low", "ci_high"]
    frame = per_subject.dropna(subset=["x", "y"])
    if frame.empty:
        return pd.DataFrame(columns=columns), pd.DataFrame(columns=diff_columns), (np.nan, np.nan)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    subjects = sorted(frame["subject"].astype(str).unique())
    subject_index = {s: i for i, s in enumerate(subjects)}
    families = list(dict.fromkeys(frame["family"]))
    # (family, point) -> per-subject values as dense arrays (NaN where a subject lacks the point)
    tables = {}
    for family in families:
        rows = frame[frame["family"] == family]
        points = list(dict.fromkeys(rows["point"]))
        xs = np.full((len(points), len(subjects)), np.nan)
        ys = np.full_like(xs, np.nan)
        for row in rows.itertuples():
            xs[points.index(row.point), subject_index[str(row.subject)]] = row.x
            ys[points.index(row.point), subject_index[str(row.subject)]] = row.y
        tables[family] = (points, xs, ys)

    def means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        present = ~np.isnan(values)
        total = np.where(present, values, 0.0) @ weights
        count = present.astype(float) @ weights
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count

    ones = np.ones(len(subjects))
    observed = {family: (means(xs, ones), means(ys, ones)) for family, (_, xs, ys) in tables.items()}
    all_x = np.concatenate([mx for mx, _ in observed.values()])
    all_y = np.concatenate([my for _, my in observed.values()])
    reference = (
        float(np.nanmin(all_x) if x_higher else np.nanmax(all_x)),
        float(np.nanmin(all_y) if y_higher else np.nanmax(all_y)),
    )
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(subjects), size=(resamples, len(subjects)))
    replicate = {family: np.empty(resamples) for family in families}
    for b in range(resamples):
        weights = np.bincount(draws[b], minlength=len(subjects)).astype(float)
        for family, (_, xs, ys) in tables.items():
            replicate[family][b] = hypervolume(means(xs, weights), means(ys, weights), reference, x_higher, y_higher)
    alpha = (1.0 - confidence) / 2.0
    rows = []
    for family in families:
        points, xs, _ = tables[family]
        mx, my = observed[family]
        front = pareto_mask(np.nan_to_num(mx, nan=-np.inf if x_higher else np.inf),
                            np.nan_to_num(my, nan=-np.inf if y_higher else np.inf), x_higher, y_higher)
        low, high = np.nanquantile(replicate[family], [alpha, 1.0 - alpha]) if len(subjects) > 1 else (np.nan, np.nan)
        rows.append({
            "family": family,
            "hypervolume": hypervolume(mx, my, reference, x_higher, y_higher),
            "ci_low": float(low), "ci_high": float(high),
            "n_subjects": int((~np.isnan(xs)).any(axis=0).sum()), "n_points": len(points),
            "frontier": [p for p, on in zip(points, front) if on],
        })
    fronts = pd.DataFrame(rows, columns=columns)
    differences = []
    for a, b in itertools.combinations(families, 2):
        delta = replicate[a] - replicate[b]
        low, high = np.nanquantile(delta, [alpha, 1.0 - alpha]) if len(subjects) > 1 else (np.nan, np.nan)
        value = float(fronts.loc[fronts["family"] == a, "hypervolume"].iloc[0] - fronts.loc[fronts["family"] == b, "hypervolume"].iloc[0])
        differences.append({"family_a": a, "family_b": b, "difference": value, "ci_low": float(low), "ci_high": float(high)})
    return fronts, pd.DataFrame(differences, columns=diff_columns), reference


def per_subject_points(long: pd.DataFrame, y_metric: str, x_metric: str) -> pd.DataFrame:
    """(family, point, subject, x, y) from the long results: family = method entry label, point =
    entry (cell @ checkpoint), values = the subject's mean over its images."""
    wanted = long[long["metric"].isin([x_metric, y_metric])]
    if wanted.empty:
        return pd.DataFrame(columns=["family", "point", "subject", "x", "y"])
    grouped = wanted.groupby(["method", "entry", "subject", "metric"], sort=False)["value"].mean().unstack("metric")
    grouped = grouped.reindex(columns=[x_metric, y_metric]).reset_index()
    return grouped.rename(columns={"method": "family", "entry": "point", x_metric: "x", y_metric: "y"})[
        ["family", "point", "subject", "x", "y"]
    ]


def fronts_figure(
    points: pd.DataFrame, fronts: pd.DataFrame, y_metric: str, x_metric: str, smoke: bool = False
) -> Figure:
    """Every family's points in one colour and marker, its pareto front as a staircase in that
    colour, and the frontier entries named. ``points``: family, point, x, y (means)."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.grid(True, color="#e3e7ee", linewidth=0.7)
    ax.set_axisbelow(True)
    ax.set_xlabel(_axis_label(x_metric, "x"))
    ax.set_ylabel(_axis_label(y_metric, "y"))
    ax.set_title(f"{metric_label(y_metric)} vs {metric_label(x_metric)}: method families and their pareto fronts", fontsize=10.5)
    if smoke:
        figure.suptitle("SMOKE NUMBERS — random-init backbone or metric weights; not a measurement",
                        color="#c2410c", fontsize=11, fontweight="bold")
    points = points.dropna(subset=["x", "y"])
    if points.empty:
        ax.text(0.5, 0.5, f"no entry has both {metric_label(y_metric)} and {metric_label(x_metric)}",
                ha="center", va="center", transform=ax.transAxes, color="#5b6475")
        return figure
    x_higher = metric_direction(x_metric) is not False
    y_higher = metric_direction(y_metric) is not False
    palette = matplotlib.colormaps["tab10"]
    label_x, label_y, label_text, label_color = [], [], [], []
    for index, family in enumerate(dict.fromkeys(points["family"])):
        rows = points[points["family"] == family]
        color, marker = palette(index % palette.N), MARKERS[index % len(MARKERS)]
        info = fronts[fronts["family"] == family]
        legend = family
        if not info.empty:
            hv = info.iloc[0]
            interval = "" if np.isnan(hv["ci_low"]) else f" [{hv['ci_low']:.2g}, {hv['ci_high']:.2g}]"
            legend = f"{family} (HV {hv['hypervolume']:.2g}{interval})"
        ax.scatter(rows["x"], rows["y"], marker=marker, color=color, s=30, alpha=0.75, label=legend, zorder=4,
                   edgecolors="white", linewidths=0.5)
        front = rows[rows["point"].isin(info.iloc[0]["frontier"] if not info.empty else [])]
        if len(front):
            xs, ys = frontier_path(front["x"].to_numpy(), front["y"].to_numpy(), x_higher, y_higher)
            ax.plot(xs, ys, linestyle="--", color=color, linewidth=1.3, zorder=3)
            for row in front.itertuples():
                label_x.append(row.x)
                label_y.append(row.y)
                label_text.append(str(row.point))
                label_color.append(color)
    all_points = points.assign(x_low=points["x"], x_high=points["x"], y_low=points["y"], y_high=points["y"])
    _pad_limits(ax, points["x"].to_numpy(float), points["y"].to_numpy(float), all_points)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title="family (hypervolume [CI])", title_fontsize=8.5)
    figure.draw_without_rendering()
    figure.set_layout_engine("none")
    place_labels(ax, np.array(label_x, float), np.array(label_y, float), label_text, fontsize=7.0, color=label_color)
    return figure


def write_fronts(
    run, out: Path, y_metric: str, x_metric: str, smoke: bool, resamples: int, seed: int, confidence: float
) -> tuple[str, str]:
    """The families' fronts plot and its tables (hypervolumes, paired differences) under ``out``;
    returns (plot base, title naming each front's hypervolume and frontier entries)."""
    from data.common import atomic_write_text

    x_higher = metric_direction(x_metric) is not False
    y_higher = metric_direction(y_metric) is not False
    per_subject = per_subject_points(run.long, y_metric, x_metric)
    fronts, differences, reference = front_hypervolumes(per_subject, x_higher, y_higher, resamples, seed, confidence)
    means = per_subject.groupby(["family", "point"], sort=False)[["x", "y"]].mean().reset_index()
    name = f"fronts_{y_metric}_vs_{x_metric}"
    table = fronts.assign(frontier=fronts["frontier"].map("; ".join),
                          reference_x=reference[0], reference_y=reference[1])
    atomic_write_text(out / "tables" / f"{name}.csv", table.to_csv(index=False))
    atomic_write_text(out / "tables" / f"{name}_differences.csv", differences.to_csv(index=False))
    save_figure(fronts_figure(means, fronts, y_metric, x_metric, smoke), out / "plots" / name)
    parts = []
    for row in fronts.itertuples():
        interval = "" if np.isnan(row.ci_low) else f" [{row.ci_low:.3g}, {row.ci_high:.3g}]"
        parts.append(f"{row.family}: hypervolume {row.hypervolume:.3g}{interval}, front = {', '.join(row.frontier)}")
    for row in differences.itertuples():
        interval = "" if np.isnan(row.ci_low) else f" [{row.ci_low:.3g}, {row.ci_high:.3g}]"
        parts.append(f"{row.family_a} − {row.family_b}: {row.difference:.3g}{interval}")
    title = (f"Method families' fronts, {metric_label(y_metric)} vs {metric_label(x_metric)} "
             f"(hypervolume above the worst observed point, {confidence:.0%} bootstrap CI over subjects). "
             + ("; ".join(parts) if parts else "no entry has both metrics"))
    return f"plots/{name}", title
