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
