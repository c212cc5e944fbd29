"""PNG plots of calibration and training progress.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through
pyplot, so nothing touches global backend state or pyplot's figure registry (no
display is needed and nothing leaks). Files are written atomically, so a reader
never sees a half-written PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from trustmatch.fileio import atomic_write_bytes

__all__ = [
    "DataMapPanel",
    "ReliabilityPanel",
    "data_map",
    "draw_reliability",
    "reliability_comparison",
    "reliability_diagram",
    "segmentation_overlays",
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


def training_curves(history: list[dict], path: Path, panels: Sequence[tuple[str, str]] = CLASSIFICATION_CURVES) -> Path:
    """Plot val/test metrics (accuracy and ECE-15; segmentation: mIoU and pixel ECE-15) against step,
    one panel per (key, label), to spot calibration drifting as the headline metric rises."""
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
    return _save_png(fig, path)


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
    n = len(images)
    if n == 0 or len(predictions) != n or (masks is not None and len(masks) != n):
        raise ValueError(f"segmentation_overlays needs one prediction (and mask) per image, got {n} images")
    for i in range(n):
        sizes = {tuple(images[i].shape[1:]), tuple(predictions[i].shape)}
        if masks is not None and masks[i] is not None:
            sizes.add(tuple(masks[i].shape))
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
    fig = Figure(figsize=(2.6 * len(columns), 2.6 * n + 0.4), dpi=_DPI, layout="constrained")
    axes = fig.subplots(n, len(columns), squeeze=False)
    for i in range(n):
        image = images[i].permute(1, 2, 0).cpu().numpy().astype(np.float64)
        panels = [image.astype(np.uint8)]
        if masks is not None:
            mask = masks[i]
            panels.append(image.astype(np.uint8) if mask is None else _overlay(image, mask.cpu().long().numpy(), lut))
        panels.append(_overlay(image, predictions[i].cpu().long().numpy(), lut))
        for ax, panel in zip(axes[i], panels):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if names is not None:
            axes[i][0].set_ylabel(names[i])
    for ax, name in zip(axes[0], columns):
        ax.set_title(name)
    fig.suptitle(title)
    return _save_png(fig, path)
