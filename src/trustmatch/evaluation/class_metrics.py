"""Per-class accuracy, IoU and calibration, streamed: what ``metrics.json`` does not hold.

A run's headline calibration (ECE) averages over classes, so a model that is well calibrated on the
easy classes and over-confident on one hard class looks fine. :class:`ClassMeter` keeps, per
*predicted* class c, the 15-bin sums (count, confidence, correct) of the top-label confidence of the
samples (or pixels) predicted c, plus the confusion counts. From them: recall (a class's accuracy),
precision, IoU, the mean confidence of the predictions of c, and the ECE of those predictions: "when
the model says c with confidence 0.9, is it right 90 % of the time?" (top-label calibration
conditioned on the predicted label, Gupta and Ramdas 2022). The ECEs weighted by each class's share of
predictions add up to their top-label ECE, which is at least the plain ECE-15 of the same samples: its bins
are split further, by class, so over- and under-confident classes no longer cancel in a bin.

The binning of ``evaluation.metrics.add_bin_sums`` (shared): bin b is [b/n, (b+1)/n), the last bin closed at 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trustmatch.evaluation.metrics import add_bin_sums, float64_device

__all__ = ["ClassMeter"]


class ClassMeter:
    """Streamed per-class statistics of [N, K] logits with [N] labels, or [B, K, H, W] with [B, H, W] masks.

    Targets equal to ``ignore_index`` (segmentation's 255) enter nothing. Memory: K x K + 3 K n_bins float64.
    """

    CHUNK = 1 << 22  # logits converted to float64 at once (32 MB)

    def __init__(
        self, num_classes: int, device: torch.device | str = "cpu", n_bins: int = 15, ignore_index: int | None = None
    ) -> None:
        self.num_classes, self.n_bins, self.ignore_index = num_classes, n_bins, ignore_index
        self.device = float64_device(torch.device(device))
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=self.device)
        self.bins = torch.zeros(num_classes * n_bins, 3, dtype=torch.float64, device=self.device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add a batch: class dimension 1, targets the logits' shape without it."""
        if (
            logits.ndim < 2
            or logits.shape[1] != self.num_classes
            or targets.shape != (logits.shape[0], *logits.shape[2:])
        ):
            raise ValueError(
                f"expected logits [N, {self.num_classes}, ...] and targets [N, ...], "
                f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        flat = logits.detach().movedim(1, -1).reshape(-1, self.num_classes)
        labels = targets.detach().reshape(-1)
        rows = max(1, self.CHUNK // self.num_classes)
        for start in range(0, len(flat), rows):
            self._add(flat[start : start + rows], labels[start : start + rows])

    def _add(self, logits: Tensor, labels: Tensor) -> None:
        probs = logits.to(device=self.device, dtype=torch.float64).softmax(dim=1)
        labels = labels.to(device=self.device, dtype=torch.long)
        valid = torch.ones_like(labels, dtype=torch.bool) if self.ignore_index is None else labels != self.ignore_index
        if not bool(((labels >= 0) & (labels < self.num_classes) | ~valid).all()):
            raise ValueError(f"targets must be class ids in [0, {self.num_classes - 1}] (or the ignore index)")
        labels = torch.where(valid, labels, 0)
        weight = valid.to(torch.float64)
        confidence, prediction = probs.max(dim=1)
        correct = (prediction == labels).to(torch.float64)
        self.confusion.view(-1).index_put_((labels * self.num_classes + prediction,), weight, accumulate=True)
        add_bin_sums(self.bins, confidence, correct, self.n_bins, weight, group=prediction)

    def rows(self, names: list[str]) -> list[dict[str, Any]]:
        """One dict per class: ``class``, ``support`` (true count), ``predicted`` (count), ``recall``,
        ``precision``, ``iou``, ``confidence`` (mean over its predictions) and ``ece`` (of its predictions);
        None where a value has no samples to rest on."""
        confusion, bins = self.confusion.cpu(), self.bins.cpu().view(self.num_classes, self.n_bins, 3)
        hits, support, predicted = confusion.diagonal(), confusion.sum(dim=1), confusion.sum(dim=0)
        union = support + predicted - hits

        def ratio(a: Tensor, b: Tensor, c: int) -> float | None:
            return float(a[c] / b[c]) if b[c] > 0 else None

        table = []
        for c, name in enumerate(names):
            count, conf_sum, hit_sum = bins[c].T
            n = float(count.sum())
            table.append(
                {
                    "class": name,
                    "support": int(support[c]),
                    "predicted": int(predicted[c]),
                    "recall": ratio(hits, support, c),
                    "precision": ratio(hits, predicted, c),
                    "iou": ratio(hits, union, c),
                    "confidence": float(conf_sum.sum() / n) if n else None,
                    "ece": float((conf_sum - hit_sum).abs().sum() / n) if n else None,
                }
            )
        return table
