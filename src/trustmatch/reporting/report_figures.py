"""The figures of the HTML report that a run does not draw itself: reliability diagrams side by side,
risk-coverage curves, training-log curves, per-class bars and thumbnails of images.

Each function returns a ``matplotlib.figure.Figure`` (never pyplot, as in ``plots``); the report renders it
with ``plots.png_bytes``. Diagrams reuse ``plots.draw_reliability``, so the page and the run's own PNGs agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from trustmatch.reporting.plots import ReliabilityPanel, draw_reliability

__all__ = [
    "LogPanel",
    "log_figure",
    "per_class_figure",
    "reliability_pair",
    "risk_coverage_figure",
    "thumbnails_figure",
]

_DPI = 90  # a page holds many figures: smaller than the run's own PNGs, still sharp at 100 % zoom


def reliability_pair(panels: Sequence[ReliabilityPanel]) -> Figure:
    """The diagrams of one run next to each other (raw, then temperature-scaled)."""
    if not panels:
        raise ValueError("reliability_pair needs at least one panel")
    fig = Figure(figsize=(4.2 * len(panels), 5.2), dpi=_DPI, layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    for c, panel in enumerate(panels):
        top = fig.add_subplot(grid[0, c])
        draw_reliability(top, fig.add_subplot(grid[1, c], sharex=top), panel.bins, panel.title, panel.ece)
    return fig


def risk_coverage_figure(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> Figure:
    """Selective risk (the error rate of the predictions kept) against coverage (the share kept, most
    confident first), one line per (label, coverage, risk): lower is better, and the area under it is AURC."""
    if not curves:
        raise ValueError("risk_coverage_figure needs at least one curve")
    fig = Figure(figsize=(5, 3.8), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    for (label, coverage, risk), style in zip(curves, ("-", "--", ":", "-.")):
        if len(coverage) != len(risk):
            raise ValueError(f"risk-coverage curve {label!r}: {len(coverage)} coverages for {len(risk)} risks")
        ax.plot(coverage, risk, style, label=label)
    ax.set(xlabel="coverage (most confident first)", ylabel="risk (error of the kept)", xlim=(0, 1))
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


@dataclass(frozen=True)
class LogPanel:
    """One panel of :func:`log_figure`: (key, label) series of the training log on one y axis."""

    title: str
    series: Sequence[tuple[str, str]]
    percent: bool = True  # shares and accuracies; False: losses, drawn on a log scale


def log_figure(entries: Sequence[dict], panels: Sequence[LogPanel]) -> Figure:
    """Training-log values (``train_log.jsonl``: one dict per logged step) against step, a panel each."""
    if not panels:
        raise ValueError("log_figure needs at least one panel")
    rows = max(len(panel.series) for panel in panels)
    fig = Figure(figsize=(4.6 * len(panels), 3.4 + 0.1 * rows), dpi=_DPI, layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key, label in panel.series:
            points = [(e["step"], e[key]) for e in entries if isinstance(e.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label)
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        elif ax.lines:
            ax.set_yscale("log")
        ax.set(xlabel="step", title=panel.title)
        ax.grid(alpha=0.3)
        if ax.lines:  # under the panel: a busy segmentation panel's lines stay visible
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, frameon=False)
    return fig


def per_class_figure(names: Sequence[str], panels: Sequence[tuple[str, dict[str, Sequence[float | None]]]]) -> Figure:
    """One bar panel per (title, {label: value per class}): grouped bars, a class without a value left out."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(names) + 2) * len(panels), 3.6), dpi=_DPI, layout="constrained")
    x = np.arange(len(names))
    for ax, (title, groups) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        width = 0.8 / max(1, len(groups))
        for g, (label, values) in enumerate(groups.items()):
            heights = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            ax.bar(x + (g - (len(groups) - 1) / 2) * width, heights, width, label=label)
        ax.set_xticks(x, list(names), rotation=90 if max(map(len, names), default=0) > 3 else 0)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return fig


def thumbnails_figure(images: torch.Tensor, captions: Sequence[str], title: str, columns: int = 8) -> Figure:
    """uint8 images [N, C, H, W] (C = 1 or 3) in a grid, each with its caption (a few words) under it."""
    n = len(images)
    if n == 0 or len(captions) != n:
        raise ValueError(f"thumbnails_figure needs one caption per image, got {len(captions)} for {n}")
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(1.35 * cols, 1.55 * rows + 0.35), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions):
        pixels = image.permute(1, 2, 0).cpu().numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig
