"""PNG plots of calibration and training progress.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through
pyplot, so nothing touches global backend state or pyplot's figure registry (no
display is needed and nothing leaks). Files are written atomically, so a reader
never sees a half-written PNG; ``png_bytes`` renders a figure in memory instead (the
HTML report embeds its figures). Where a figure is both written and embedded, a
``*_figure`` function builds it and the file writer saves that.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from trustmatch.core.fileio import atomic_write_bytes

__all__ = [
    "DataMapPanel",
    "ReliabilityPanel",
    "SelectionSnapshot",
    "csl_selection_scatter",
    "data_map",
    "draw_history",
    "curves_figure",
    "draw_reliability",
    "optimisation_history",
    "overlays_figure",
    "png_bytes",
    "reliability_comparison",
    "reliability_diagram",
    "segmentation_overlays",
    "selection_counts",
    "training_curves",
]

_DPI = 120


def _save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    try:
        atomic_write_bytes(path, FigureCanvasAgg(fig).print_png)
    finally:
        fig.clear()
    return path


def png_bytes(fig: Figure) -> bytes:
    """``fig`` rendered to PNG in memory (then cleared, as ``_save_png`` clears it)."""
    buffer = io.BytesIO()
    try:
        FigureCanvasAgg(fig).print_png(buffer)
    finally:
        fig.clear()
    return buffer.getvalue()


def draw_reliability(top: Axes, bottom: Axes, bins: dict, title: str, ece: float | None = None) -> None:
    """Draw one reliability diagram onto given axes, so single plots and side-by-side reports look alike.

    ``top``: accuracy bars, the diagonal, and the gap to mean bin confidence shaded.
    ``bottom``: sample count per bin, to show which bars rest on little data.
    """
    lower, upper = bins["lower"], bins["upper"]
    centers = [(lo + hi) / 2 for lo, hi in zip(lower, upper)]
    widths = [hi - lo for lo, hi in zip(lower, upper)]
    accuracy, confidence = bins["accuracy"], bins["confidence"]
    gap = [c - a for a, c in zip(accuracy, confidence)]

    top.bar(centers, accuracy, width=widths, color="tab:blue", edgecolor="black", label="accuracy")
    top.bar(
        centers,
        gap,
        bottom=accuracy,
        width=widths,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.set_title(title if ece is None else f"{title}\nECE = {100 * ece:.2f}%")
    top.legend(loc="upper left")

    bottom.bar(centers, bins["count"], width=widths, color="gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="count")


def reliability_diagram(bins: dict, path: Path, title: str, ece: float | None = None) -> Path:
    """Plot per-bin accuracy against confidence, as returned by ``metrics.calibration_bins``."""
    fig = Figure(figsize=(5, 6), dpi=_DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    draw_reliability(top, bottom, bins, title, ece)
    fig.tight_layout()
    return _save_png(fig, path)


@dataclass
class ReliabilityPanel:
    """One diagram of :func:`reliability_comparison`: ``bins`` as :func:`reliability_diagram` takes them."""

    title: str
    bins: dict
    ece: float | None = None


def reliability_comparison(
    columns: Sequence[Sequence[ReliabilityPanel]], header: Sequence[str], rows: Sequence[Sequence[str]], path: Path
) -> Path:
    """One column of diagrams per run (raw above temperature-scaled), the metrics table under them.

    Columns may hold different numbers of diagrams; a shorter column leaves its lower slots empty.
    """
    if not columns:
        raise ValueError("reliability_comparison needs at least one column")
    depth = max(map(len, columns))
    table_height = 0.35 * (len(rows) + 1) + 0.3
    fig = Figure(figsize=(max(4.5 * len(columns), 11), 6 * depth + table_height), dpi=_DPI, layout="constrained")
    grid = fig.add_gridspec(2 * depth + 1, len(columns), height_ratios=[4.5, 1.5] * depth + [table_height])
    for c, column in enumerate(columns):
        for r, panel in enumerate(column):
            top = fig.add_subplot(grid[2 * r, c])
            draw_reliability(top, fig.add_subplot(grid[2 * r + 1, c], sharex=top), panel.bins, panel.title, panel.ece)
    _draw_table(fig.add_subplot(grid[-1, :]), header, rows)
    return _save_png(fig, path)


def _draw_table(ax: Axes, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The rows as a matplotlib table filling ``ax``, so the PNG carries the numbers too."""
    ax.axis("off")
    table = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), cellLoc="center", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(range(len(header)))  # long run labels get the room they need


def _series(history: Sequence[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` for the entries that evaluated ``split`` (a run without validation split has none)."""
    points = [(entry["step"], entry[split][key]) for entry in history if entry.get(split)]
    return [s for s, _ in points], [v for _, v in points]


CLASSIFICATION_CURVES = (("accuracy", "accuracy"), ("ece_15", "ECE (15 bins)"))


def optimisation_history(
    complete: Sequence[tuple[int, float]], pruned: Sequence[tuple[int, float]], path: Path, ylabel: str
) -> Path:
    """A study's trials, (number, objective), with the best so far: whether the search still improves.
    Pruned trials are drawn at their last reported value."""
    fig = Figure(figsize=(6, 4), dpi=_DPI)
    draw_history(fig.subplots(), complete, pruned, ylabel)
    fig.tight_layout()
    return _save_png(fig, path)


def draw_history(
    ax: Axes, complete: Sequence[tuple[int, float]], pruned: Sequence[tuple[int, float]], ylabel: str
) -> None:
    """:func:`optimisation_history` onto given axes. Trials are whole numbers: no tick at trial 0.5."""
    if complete:
        numbers, values = zip(*sorted(complete))
        ax.plot(numbers, values, "o", label="complete")
        best = np.maximum.accumulate(np.asarray(values))
        ax.step(numbers, best, where="post", label="best so far")
    if pruned:
        ax.plot(*zip(*pruned), "x", color="grey", label="pruned (last report)")
    if ax.lines:
        ax.legend()
    ax.set(xlabel="trial", ylabel=ylabel, title="optimisation history (validation)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def training_curves(history: list[dict], path: Path, panels: Sequence[tuple[str, str]] = CLASSIFICATION_CURVES) -> Path:
    """Plot val/test metrics (accuracy and ECE-15; segmentation: mIoU and pixel ECE-15) against step,
    one panel per (key, label), to spot calibration drifting as the headline metric rises."""
    return _save_png(curves_figure(history, panels), path)


def curves_figure(history: list[dict], panels: Sequence[tuple[str, str]] = CLASSIFICATION_CURVES) -> Figure:
    """:func:`training_curves`' figure."""
    if not history:
        raise ValueError("training_curves needs at least one history entry")
    fig = Figure(figsize=(5 * len(panels), 4), dpi=_DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        for split, style in (("val", "-o"), ("test", "--s")):
            steps, values = _series(history, split, key)
            if steps:
                ax.plot(steps, values, style, markersize=3, label=split)
        if ax.lines:
            ax.legend()
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass
class DataMapPanel:
    """One scatter of a data map: a training-dynamics score against the final model's confidence."""

    title: str
    x: Sequence[float]
    y: Sequence[float]
    x_label: str
    y_label: str
    flagged: Sequence[bool] | None = None
    flag_label: str = ""


def _check_panel(panel: DataMapPanel) -> None:
    """Refuse mismatched lengths, which ``zip`` would otherwise silently truncate into a wrong plot."""
    lengths = {len(panel.x), len(panel.y)} | (set() if panel.flagged is None else {len(panel.flagged)})
    if len(lengths) > 1:
        raise ValueError(f"data map panel {panel.title!r}: x, y and flagged differ in length ({sorted(lengths)})")


def data_map(panels: Sequence[DataMapPanel], path: Path) -> Path:
    """Side-by-side scatters (rasterized, so 60,000 points stay a small PNG); flagged points in red."""
    if not panels:
        raise ValueError("data_map needs at least one panel")
    for panel in panels:
        _check_panel(panel)
    fig = Figure(figsize=(5.5 * len(panels), 4.5), dpi=_DPI)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.set(xlabel=panel.x_label, ylabel=panel.y_label, title=panel.title)
        if not len(panel.x):
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        flagged = [False] * len(panel.x) if panel.flagged is None else list(panel.flagged)
        groups = ((False, "tab:blue", "other samples"), (True, "tab:red", panel.flag_label or "flagged"))
        for flag, colour, label in groups:
            xs = [x for x, f in zip(panel.x, flagged) if f == flag]
            ys = [y for y, f in zip(panel.y, flagged) if f == flag]
            if xs:
                ax.scatter(xs, ys, s=4, alpha=0.3, color=colour, label=label, rasterized=True)
        ax.axvline(0.0, color="gray", linestyle="--", linewidth=1)
        if panel.flagged is not None:
            ax.legend(loc="lower right", markerscale=3)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, path)


_NEUTRAL = (128, 128, 128)  # ignored pixels (255): no class colour, no image, so they cannot pass for a class


def _overlay(image: np.ndarray, ids: np.ndarray, lut: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Class colours blended over the image [H, W, 3]; ignored pixels flat neutral grey."""
    blended = (1 - alpha) * image + alpha * lut[ids]
    return np.where((ids == 255)[..., None], np.array(_NEUTRAL), blended).astype(np.uint8)


def segmentation_overlays(
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None] | None,
    predictions: Sequence[torch.Tensor],
    palette: Sequence[tuple[int, int, int]],
    path: Path,
    title: str,
    names: Sequence[str] | None = None,
) -> Path:
    """One row per image (labelled with its ``names`` entry): the image, its ground truth (when
    ``masks`` is given) and the prediction, each class in its ``palette`` colour over the image,
    ignore pixels (255) neutral grey.

    Per image (sizes may differ, as Pascal's do): uint8 [3, H, W]; masks uint8 [H, W] (a row's mask may
    be None); predictions integer [H, W]. A stacked batch [N, ...] works as the sequence it is.
    """
    return _save_png(overlays_figure(images, masks, predictions, palette, title, names), path)


def overlays_figure(
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None] | None,
    predictions: Sequence[torch.Tensor],
    palette: Sequence[tuple[int, int, int]],
    title: str,
    names: Sequence[str] | None = None,
    confidences: Sequence[torch.Tensor] | None = None,
) -> Figure:
    """:func:`segmentation_overlays`' figure; with ``confidences`` (the top-class probability [H, W] per
    image) a last column shows them in grey, 0 black to 1 white, where an over-confident wrong region
    shows up white under a wrong colour."""
    n = len(images)
    if n == 0 or len(predictions) != n or (masks is not None and len(masks) != n):
        raise ValueError(f"segmentation_overlays needs one prediction (and mask) per image, got {n} images")
    if confidences is not None and len(confidences) != n:
        raise ValueError(f"segmentation_overlays needs one confidence map per image, got {len(confidences)} for {n}")
    for i in range(n):
        sizes = {tuple(images[i].shape[1:]), tuple(predictions[i].shape)}
        if masks is not None and masks[i] is not None:
            sizes.add(tuple(masks[i].shape))
        if confidences is not None:
            sizes.add(tuple(confidences[i].shape))
        if images[i].ndim != 3 or len(sizes) > 1:
            raise ValueError(
                f"image {i}: expected [3, H, W] with masks and predictions [H, W], got "
                f"{tuple(images[i].shape)} and {sorted(sizes)}"
            )
        for name, ids in (("masks", None if masks is None else masks[i]), ("predictions", predictions[i])):
            if ids is not None and bool(((ids < 0) | ((ids >= len(palette)) & (ids != 255))).any()):
                raise ValueError(f"{name} hold ids outside the palette's {len(palette)} classes (and 255, ignore)")
    lut = np.full((256, 3), _NEUTRAL, dtype=np.float64)
    lut[: len(palette)] = np.asarray(palette, dtype=np.float64).reshape(-1, 3)
    columns = ["image", *([] if masks is None else ["ground truth"]), "prediction"]
    columns += [] if confidences is None else ["confidence"]
    fig = Figure(figsize=(2.6 * len(columns), 2.6 * n + 0.4), dpi=_DPI, layout="constrained")
    axes = fig.subplots(n, len(columns), squeeze=False)
    for i in range(n):
        image = images[i].permute(1, 2, 0).cpu().numpy().astype(np.float64)
        panels = [image.astype(np.uint8)]
        if masks is not None:
            mask = masks[i]
            panels.append(image.astype(np.uint8) if mask is None else _overlay(image, mask.cpu().long().numpy(), lut))
        panels.append(_overlay(image, predictions[i].cpu().long().numpy(), lut))
        if confidences is not None:
            panels.append(confidences[i].detach().float().cpu().numpy())
        for ax, panel in zip(axes[i], panels):
            grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if panel.ndim == 2 else {}
            ax.imshow(panel, interpolation="nearest", **grey)
            ax.set_xticks([])
            ax.set_yticks([])
        if names is not None:
            axes[i][0].set_ylabel(names[i])
    for ax, name in zip(axes[0], columns):
        ax.set_title(name)
    fig.suptitle(title)
    return fig


@dataclass
class SelectionSnapshot:
    """One CSL selection drawn by :func:`csl_selection_scatter`: the points of one image (or batch) and its boundary.

    ``correct`` holds, per point, 1 where the pseudo-label equals the true label, 0 where it does not and -1
    where the true label is unknown (a bool array works too); None when no true label is known at all.
    ``directions`` (rows u1, u2), ``singular`` (s1 >= s2) and ``mean`` ([cluster, (c, v)]) are the group's
    ``CSLBoundary`` entries; ``reliable_cluster`` indexes the trusted cluster of ``mean``.
    """

    step: int
    confidence: np.ndarray  # [n] max probability c
    dispersion: np.ndarray  # [n] residual dispersion v
    weight: np.ndarray  # [n] in [0, 1]
    reliable: np.ndarray  # [n] bool: weight exactly 1
    correct: np.ndarray | None  # [n] int8 (1 right, 0 wrong, -1 unknown) or bool; None: no truth
    directions: np.ndarray  # [2, 2]
    singular: np.ndarray  # [2]
    mean: np.ndarray  # [2, 2]
    reliable_cluster: int
    label: str


def _check_snapshot(snapshot: SelectionSnapshot) -> None:
    """Refuse per-point arrays of different lengths and boundaries of the wrong shape: the plot would lie."""
    per_point = [snapshot.confidence, snapshot.dispersion, snapshot.weight, snapshot.reliable]
    lengths = {len(a) for a in per_point} | (set() if snapshot.correct is None else {len(snapshot.correct)})
    if len(lengths) > 1:
        raise ValueError(f"selection snapshot {snapshot.label!r}: per-point arrays differ in length {sorted(lengths)}")
    shapes = (np.shape(snapshot.directions), np.shape(snapshot.singular), np.shape(snapshot.mean))
    if shapes != ((2, 2), (2,), (2, 2)) or snapshot.reliable_cluster not in (0, 1):
        raise ValueError(
            f"selection snapshot {snapshot.label!r}: expected directions [2, 2], singular [2], mean [2, 2] and "
            f"reliable_cluster 0 or 1, got {shapes} and {snapshot.reliable_cluster}"
        )


def _correct(snapshot: SelectionSnapshot) -> np.ndarray:
    """``correct`` as int8 (1 right, 0 wrong, -1 unknown), all -1 when it is None."""
    n = len(snapshot.confidence)
    return np.full(n, -1, np.int8) if snapshot.correct is None else np.asarray(snapshot.correct).astype(np.int8)


def selection_counts(snapshot: SelectionSnapshot) -> dict[str, dict[str, int]]:
    """Per group ("reliable", "down-weighted"): its ``points``, how many have a ``known`` true label, how many
    of those are ``wrong`` — the numbers of the scatter's legend."""
    _check_snapshot(snapshot)
    reliable = np.asarray(snapshot.reliable, dtype=bool)
    correct = _correct(snapshot)
    counts = {}
    for name, members in (("reliable", reliable), ("down-weighted", ~reliable)):
        known = members & (correct >= 0)
        wrong = known & (correct == 0)
        counts[name] = {"points": int(members.sum()), "known": int(known.sum()), "wrong": int(wrong.sum())}
    return counts


def _legend_text(name: str, count: dict[str, int]) -> str:
    """Legend text such as "reliable (w = 1): 812 (wrong 3.1 %)"; the number of points with a known true
    label is named only when it is not all of them."""
    text = f"{name}: {count['points']}"
    if count["known"]:
        text += f" (wrong {100 * count['wrong'] / count['known']:.1f} %"
        text += ")" if count["known"] == count["points"] else f" of {count['known']} with known truth)"
    return text


def _padded(values: np.ndarray) -> tuple[float, float]:
    """Axis limits around the finite ``values`` with a 5 % margin (a little room when they are all equal)."""
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else max(0.05 * abs(hi), 1e-3)
    return lo - pad, hi + pad


def _clip_line(direction: np.ndarray, xlim: tuple[float, float], ylim: tuple[float, float]) -> np.ndarray | None:
    """End points [2, (x, y)] of the line through the origin along ``direction`` inside the box, None if it misses."""
    t_lo, t_hi = -np.inf, np.inf
    for d, (lo, hi) in zip(direction, (xlim, ylim)):
        if d == 0:
            if not lo <= 0 <= hi:
                return None
            continue
        a, b = sorted((lo / d, hi / d))
        t_lo, t_hi = max(t_lo, a), min(t_hi, b)
    if not t_lo < t_hi:
        return None
    return np.outer([t_lo, t_hi], direction)


def _split_lines(snapshot: SelectionSnapshot) -> list[np.ndarray]:
    """Directions of the two lines |x.u1| / s1 = |x.u2| / s2 (normals u1/s1 -+ u2/s2); none when the group
    was not split (s2 = 0: one pixel or identical pixels, all in cluster 0) or the boundary is not finite."""
    u = np.asarray(snapshot.directions, dtype=np.float64)
    s1, s2 = (float(s) for s in snapshot.singular)
    if not (np.isfinite(u).all() and np.isfinite([s1, s2]).all()) or s1 <= 0 or s2 <= 0:
        return []
    normals = (u[0] / s1 - u[1] / s2, u[0] / s1 + u[1] / s2)
    return [np.array([-n[1], n[0]]) for n in normals if np.hypot(*n) > 0]


def _handle(label: str, colour: object, marker: str = "", linestyle: str = "-") -> Line2D:
    """A legend entry: a marker alone (points) or a line alone."""
    return Line2D([], [], marker=marker, linestyle="" if marker else linestyle, color=colour, linewidth=1, label=label)


def _draw_selection(fig: Figure, ax: Axes, snapshot: SelectionSnapshot) -> None:
    """One panel: the points coloured by weight, wrong pseudo-labels as red crosses, the reliable cluster's
    thresholds (solid) and the cluster split (dashed)."""
    counts = selection_counts(snapshot)
    ax.set(xlabel="max confidence c", ylabel="residual dispersion v")
    ax.set_title(f"{snapshot.label}\n{len(snapshot.confidence)} points", fontsize=10)
    if not len(snapshot.confidence):
        ax.text(0.5, 0.5, "no valid pixels", ha="center", va="center", transform=ax.transAxes)
        return
    c = np.asarray(snapshot.confidence, np.float64)
    v = np.asarray(snapshot.dispersion, np.float64)
    weight = np.asarray(snapshot.weight, np.float64)
    correct = _correct(snapshot)
    mu_c, mu_v = (float(m) for m in snapshot.mean[snapshot.reliable_cluster])
    xlim, ylim = _padded(np.append(c, mu_c)), _padded(np.append(v, mu_v))
    norm, cmap = Normalize(0.0, 1.0), "viridis"
    wrong = correct == 0
    ax.scatter(c[~wrong], v[~wrong], c=weight[~wrong], cmap=cmap, norm=norm, s=6, alpha=0.6, rasterized=True)
    ax.scatter(c[wrong], v[wrong], marker="x", color="tab:red", s=12, linewidths=0.8, rasterized=True)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="weight")
    ax.axvline(mu_c, color="black", linewidth=1)
    ax.axhline(mu_v, color="black", linewidth=1)
    for direction in _split_lines(snapshot):
        ends = _clip_line(direction, xlim, ylim)
        if ends is not None:
            ax.plot(ends[:, 0], ends[:, 1], color="gray", linestyle="--", linewidth=1)
    ax.set(xlim=xlim, ylim=ylim)
    ax.grid(alpha=0.3)
    colours = ScalarMappable(norm=norm, cmap=cmap).to_rgba
    handles = [
        _handle(_legend_text("reliable (w = 1)", counts["reliable"]), colours(1.0), marker="o"),
        _handle(_legend_text("down-weighted (w < 1)", counts["down-weighted"]), colours(0.3), marker="o"),
    ]
    if snapshot.correct is not None:
        handles.append(_handle("wrong pseudo-label", "tab:red", marker="x"))
    thresholds = f"reliable cluster: c = {mu_c:.3g}, v = {mu_v:.3g} (w = 1 right or below)"
    handles += [_handle(thresholds, "black"), _handle("cluster split", "gray", linestyle="--")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7)  # under: no point hidden


def csl_selection_scatter(snapshots: Sequence[SelectionSnapshot], path: Path, title: str) -> Path:
    """One panel per snapshot: max confidence against residual dispersion, coloured by CSL weight, so one sees
    where the boundary falls during training and how many trusted pseudo-labels are wrong."""
    if not snapshots:
        raise ValueError("csl_selection_scatter needs at least one snapshot")
    for snapshot in snapshots:
        _check_snapshot(snapshot)
    fig = Figure(figsize=(6.5 * len(snapshots), 6.5), dpi=_DPI, layout="constrained")
    for ax, snapshot in zip(fig.subplots(1, len(snapshots), squeeze=False)[0], snapshots):
        _draw_selection(fig, ax, snapshot)
    fig.suptitle(title)
    return _save_png(fig, path)
