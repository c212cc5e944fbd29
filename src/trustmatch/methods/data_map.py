"""The data map of a CalibrateMix run: every sample's training dynamics beside the final model's view.

Labeled samples with a low (negative) AUM were learned against their label for most of training:
the usual sign of a mislabeled or ambiguous image. Unlabeled samples with a low APM for their final
pseudo-label kept changing their mind. Both CSVs are sorted hardest first, so the top rows are the
images to look at.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from trustmatch.core.fileio import atomic_write_text
from trustmatch.methods.training_dynamics import APMTracker, AUMTracker
from trustmatch.reporting.plots import DataMapPanel, data_map

SPLITS = ("labeled", "unlabeled")
Predictions = dict[str, tuple[Tensor, Tensor]]  # split -> (confidence, predicted class), per sample


class Samples(Protocol):
    labels: Tensor  # int64; -1 where unknown
    paths: list[str] | None

    def __len__(self) -> int: ...


class SplitData(Protocol):
    """What the data map reads of a task's data (``trustmatch.data.SSLData``)."""

    classes: list[str]
    labeled: Samples
    unlabeled: Samples


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def write_data_map(
    aum_tracker: AUMTracker, apm_tracker: APMTracker, data: SplitData, predictions: Predictions, run_dir: Path
) -> None:
    """``datamap_labeled.csv``, ``datamap_unlabeled.csv`` and ``datamap.png`` in ``run_dir``."""
    classes = data.classes
    lb, ulb = data.labeled, data.unlabeled
    conf_lb, pred_lb = (t.cpu() for t in predictions["labeled"])
    conf_ulb, pred_ulb = (t.cpu() for t in predictions["unlabeled"])
    aum, aum_visits = aum_tracker.scores().cpu(), aum_tracker.count.cpu()
    device = apm_tracker.apm.device
    apm = apm_tracker.scores(torch.arange(len(ulb), device=device), pred_ulb.to(device)).cpu()
    apm_visits = apm_tracker.visits.cpu()

    agrees = pred_lb == lb.labels
    rows = [
        [i, lb.paths[i] if lb.paths else "", classes[lb.labels[i]], _fmt(aum[i]), int(aum_visits[i]),
         classes[pred_lb[i]], _fmt(conf_lb[i]), bool(agrees[i])]
        for i in aum.argsort().tolist()
    ]  # fmt: skip
    header = ["index", "path", "label", "aum", "visits", "predicted", "confidence", "prediction_agrees"]
    _write_csv(run_dir / "datamap_labeled.csv", header, rows)

    seen = apm_visits > 0  # APM starts after the warm-up: samples never visited since carry no score
    order = torch.where(seen, apm, float("inf")).argsort()  # hardest first, never-visited last (APM blank)
    known = ulb.labels >= 0
    wrong = (pred_ulb != ulb.labels) & known
    rows = [
        [i, ulb.paths[i] if ulb.paths else "", classes[pred_ulb[i]], _fmt(apm[i]) if seen[i] else "",
         int(apm_visits[i]), _fmt(conf_ulb[i]), classes[ulb.labels[i]] if known[i] else "",
         bool(wrong[i]) if known[i] else ""]
        for i in order.tolist()
    ]  # fmt: skip
    header = ["index", "path", "pseudo_label", "apm", "visits", "confidence", "true_label", "pseudo_label_wrong"]
    _write_csv(run_dir / "datamap_unlabeled.csv", header, rows)

    panels = [
        DataMapPanel(
            f"labeled ({len(lb)})", aum.tolist(), conf_lb.tolist(), "AUM (area under the margin)",
            "final confidence", (~agrees).tolist(), "prediction disagrees with the label",
        ),
        DataMapPanel(
            f"unlabeled ({int(seen.sum())} visited after warm-up)", apm[seen].tolist(), conf_ulb[seen].tolist(),
            "APM of the final pseudo-label", "final confidence",
            wrong[seen].tolist() if bool(known.any()) else None, "pseudo-label wrong (true label known)",
        ),
    ]  # fmt: skip
    data_map(panels, run_dir / "datamap.png")
