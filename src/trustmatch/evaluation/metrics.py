"""Accuracy and calibration metrics for top-label classification and per-pixel segmentation, in pure torch.

Evaluation streams: a :class:`ClassificationMeter` adds each batch to a few float64 sums (their
number depends on the bins, not on N), and under torchrun the processes' sums are added with one
all-reduce before computing. The whole-set functions are that meter fed a single batch.

Everything is computed in float64 on the inputs' device (CPU for MPS, which has no
float64), vectorised over samples, so evaluation of large sets stays cheap and
the numbers agree with reference implementations to ~1e-12.

Binning convention: ``n_bins`` equal-width bins on [0, 1]; bin ``b`` is
``[b/n, (b+1)/n)``, except the last bin, which is closed on the right so that a
confidence of exactly 1.0 lands in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trustmatch.core.distributed import all_reduce_sum_
from trustmatch.evaluation import selective

__all__ = [
    "ClassificationMeter",
    "SegmentationMeter",
    "add_bin_sums",
    "calibration_bins",
    "expected_calibration_error",
    "max_calibration_error",
    "classification_metrics",
    "reliability_bins",
]


class NonFiniteLogits(ValueError):
    """A model's outputs hold NaN or infinity: it diverged (the trainer names the step)."""


def float64_device(device: torch.device) -> torch.device:
    """MPS cannot hold float64, so its tensors are evaluated on the CPU instead."""
    return torch.device("cpu") if device.type == "mps" else device


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _check_binning_inputs(confidences: Tensor, correct: Tensor, n_bins: int) -> None:
    if confidences.ndim != 1 or correct.shape != confidences.shape:
        raise ValueError(
            "confidences and correct must be 1-D tensors of equal length, "
            f"got shapes {tuple(confidences.shape)} and {tuple(correct.shape)}"
        )
    if confidences.numel() == 0:
        raise ValueError("calibration needs at least one sample, got N=0")
    _check_n_bins(n_bins)
    if not bool(((confidences >= 0) & (confidences <= 1)).all()):
        raise ValueError("confidences must lie in [0, 1] (pass probabilities, not logits)")


def add_bin_sums(
    sums: Tensor,
    confidences: Tensor,
    correct: Tensor,
    n_bins: int,
    weight: Tensor | None = None,
    group: Tensor | None = None,
) -> Tensor:
    """Adds each element's (1, confidence, correct) to row ``group * n_bins + bin`` of ``sums``
    [groups * n_bins, 3] in place and returns it; ``group`` (per element, e.g. its predicted class) keeps
    separate bins per group (none: one group). The one binning every calibration sum here uses.

    Takes float64 inputs on one device. Sums, unlike bin means, add up over batches and processes.
    ``weight`` (0 or 1 per element) leaves elements out without boolean indexing, whose output size
    would make the device wait on the host (ignored pixels in segmentation). ``index_put_`` with
    ``accumulate``, not ``index_add_``: on CUDA it sorts by bin and adds in index order, where
    ``index_add_``'s atomic adds sum confidences in a varying order (a resumed run's ECE then differed
    from the uninterrupted run's in the last bit).
    """
    # Inner edges b/n, b = 1..n-1; right=True puts a value equal to an edge in the
    # upper bin, and 1.0 (above every inner edge) in the last bin.
    inner_edges = torch.arange(1, n_bins, device=confidences.device, dtype=torch.float64) / n_bins
    index = torch.bucketize(confidences, inner_edges, right=True)
    if group is not None:
        index = group * n_bins + index
    if weight is None:
        values = torch.stack([torch.ones_like(confidences), confidences, correct])
    else:
        values = torch.stack([weight, confidences * weight, correct * weight])
    return sums.index_put_((index,), values.T, accumulate=True)


def _bin_sums(confidences: Tensor, correct: Tensor, n_bins: int, weight: Tensor | None = None) -> Tensor:
    """Per-bin (count, confidence sum, correct sum) as the rows of a [3, n_bins] tensor (:func:`add_bin_sums`)."""
    return add_bin_sums(confidences.new_zeros(n_bins, 3), confidences, correct, n_bins, weight).T


def _checked_bin_sums(confidences: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    _check_binning_inputs(confidences, correct, n_bins)
    device = float64_device(confidences.device)
    conf, hits = (t.detach().to(device=device, dtype=torch.float64) for t in (confidences, correct))
    return _bin_sums(conf, hits, n_bins)


def _bin_table(sums: Tensor) -> dict[str, list[float]]:
    count, conf_sum, hit_sum = sums
    n_bins = count.numel()
    denom = count.clamp(min=1.0)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": [int(c) for c in count.tolist()],
        "confidence": (conf_sum / denom).tolist(),
        "accuracy": (hit_sum / denom).tolist(),
    }


def _ece(sums: Tensor) -> float:
    count, conf_sum, hit_sum = sums
    return float((conf_sum - hit_sum).abs().sum() / count.sum())


def _mce(sums: Tensor) -> float:
    count, conf_sum, hit_sum = sums
    nonempty = count > 0
    return float(((conf_sum - hit_sum)[nonempty] / count[nonempty]).abs().max())


def _mean_recall(confusion: Tensor) -> float:
    """Mean over the classes present in the ground truth (rows of ``confusion``) of their recall."""
    support = confusion.sum(dim=1)
    return float((confusion.diagonal()[support > 0] / support[support > 0]).mean())


def calibration_bins(confidences: Tensor, correct: Tensor, n_bins: int) -> dict[str, list[float]]:
    """Per-bin statistics for a reliability diagram.

    Returns lists of length ``n_bins`` under ``lower``, ``upper`` (bin edges),
    ``count`` (ints), ``confidence`` and ``accuracy`` (bin means, 0.0 for an empty bin).
    """
    return _bin_table(_checked_bin_sums(confidences, correct, n_bins))


def expected_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int) -> float:
    """ECE = sum_b |B_b|/N * |conf_b - acc_b|, which equals sum_b |sum conf - sum correct| / N."""
    return _ece(_checked_bin_sums(confidences, correct, n_bins))


def max_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int) -> float:
    """MCE = max over non-empty bins of |conf_b - acc_b| (empty bins carry no evidence)."""
    return _mce(_checked_bin_sums(confidences, correct, n_bins))


class ClassificationMeter:
    """:func:`classification_metrics` accumulated batch by batch, and across processes.

    ``state`` is one float64 tensor of sums whose size does not depend on N: samples, correct
    predictions, NLL, Brier and top-label confidence, then per bin count its :func:`_bin_sums`, then
    the K x K confusion counts (rows: true class, columns: prediction; K = 1,000 costs 8 MB), then the
    selective-risk histogram (:func:`selective.histogram`, 512 KiB).
    Sums add over batches and processes, so any split of the data gives the whole set's metrics,
    and a single tensor makes :meth:`all_reduce` a single collective. Give it the logits' device:
    updates then never wait on a copy, and NCCL can reduce the state where it lies.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", bins: tuple[int, ...] = (10, 15)) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        for n_bins in bins:
            _check_n_bins(n_bins)
        self.num_classes = num_classes
        self.device = float64_device(torch.device(device))
        self.bin_counts = tuple(sorted(set(bins), reverse=True))  # ece_15 before ece_10, as always
        size = 5 + 3 * sum(self.bin_counts) + num_classes**2 + 2 * selective.BINS
        self.state = torch.zeros(size, dtype=torch.float64, device=self.device)
        self._totals, self._bins, self._confusion, self._selective = self._unpack(self.state)

    def _unpack(self, state: Tensor) -> tuple[Tensor, dict[int, Tensor], Tensor, Tensor]:
        """Views of ``state``: the 5 totals, the [3, b] bin sums for each bin count b, the confusion, the
        [2, selective.BINS] selective-risk histogram."""
        sizes = [5, *(3 * b for b in self.bin_counts), self.num_classes**2, 2 * selective.BINS]
        totals, *parts, confusion, hist = state.split(sizes)
        bins = {b: part.view(3, b) for b, part in zip(self.bin_counts, parts)}
        return totals, bins, confusion.view(self.num_classes, self.num_classes), hist.view(2, selective.BINS)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch of logits [N, K] and integer labels [N].

        Only the input checks wait for the device: they keep bad input from becoming silent garbage.
        """
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits [N, K] and labels [N], got shapes {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits for {self.num_classes} classes, got shape {tuple(logits.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits("logits contain NaN or infinity")
        log_probs = F.log_softmax(logits.detach().to(device=self.device, dtype=torch.float64), dim=1)
        labels = labels.detach().to(device=self.device, dtype=torch.long)
        top_log_prob, prediction = log_probs.max(dim=1)  # ties: lowest index
        probs, confidence = log_probs.exp(), top_log_prob.exp()
        correct = (prediction == labels).to(torch.float64)
        nll = -log_probs.gather(1, labels[:, None]).sum()
        brier = (probs - F.one_hot(labels, self.num_classes)).pow(2).sum()
        self._totals[0] += len(labels)
        self._totals[1:] += torch.stack([correct.sum(), nll, brier, confidence.sum()])
        for n_bins, sums in self._bins.items():
            sums += _bin_sums(confidence, correct, n_bins)
        self._confusion.view(-1).index_add_(0, labels * self.num_classes + prediction, torch.ones_like(correct))
        self._selective += selective.histogram(top_log_prob, correct)

    def all_reduce(self) -> None:
        """Sum the state over all processes (identity in one); call once, after the last update."""
        all_reduce_sum_(self.state)

    def _host_sums(self) -> tuple[Tensor, dict[int, Tensor], Tensor, Tensor]:
        """The unpacked state on the CPU (one transfer), refusing an empty meter."""
        totals, bins, confusion, hist = self._unpack(self.state.cpu())
        if totals[0] == 0:
            raise ValueError("metrics need at least one sample, got N=0")
        return totals, bins, confusion, hist

    def compute(self) -> dict[str, float]:
        """The :func:`classification_metrics` keys, with ``ece_<b>`` and ``mce_<b>`` for each bin count.

        Covers this process's batches, or every process's once :meth:`all_reduce` has run.
        """
        totals, bins, confusion, hist = self._host_sums()
        n, correct, nll, brier, confidence = totals.tolist()
        return {
            "accuracy": correct / n,
            "balanced_accuracy": _mean_recall(confusion),
            **{f"ece_{b}": _ece(sums) for b, sums in bins.items()},
            **{f"mce_{b}": _mce(sums) for b, sums in bins.items()},
            "nll": nll / n,
            "brier": brier / n,
            "mean_confidence": confidence / n,
            **selective.selective_metrics(hist),
            "n": int(n),
        }

    def bins(self, n_bins: int = 15) -> dict[str, list[float]]:
        """Top-label :func:`calibration_bins` of everything added so far, for one of the meter's bin counts."""
        if n_bins not in self.bin_counts:
            raise ValueError(f"this meter bins by {self.bin_counts}, not {n_bins!r}")
        return _bin_table(self._host_sums()[1][n_bins])

    def confusion(self) -> Tensor:
        """Counts [K, K] (int64, CPU): row = true class, column = predicted class."""
        return self._host_sums()[2].round().long()

    def risk_coverage(self) -> dict[str, list[float]]:
        """The top-label risk-coverage curve (:func:`selective.risk_coverage`), for a plot."""
        return selective.risk_coverage(self._host_sums()[3])


def _whole_set_meter(logits: Tensor, labels: Tensor, bins: tuple[int, ...]) -> ClassificationMeter:
    """A meter on ``logits``' device fed the whole set as one batch."""
    num_classes = logits.shape[1] if logits.ndim == 2 else 1  # any other shape fails update's check
    meter = ClassificationMeter(num_classes, logits.device, bins)
    meter.update(logits, labels)
    return meter


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy and calibration of a classifier, all as fractions.

    Keys: ``accuracy``, ``ece_15``, ``ece_10``, ``mce_15``, ``mce_10``, ``nll`` (mean
    cross-entropy, natural log), ``brier``, ``mean_confidence``, the selective-risk metrics ``aurc``,
    ``eaurc``, ``accuracy_at_coverage_<50|80|90>`` (:mod:`trustmatch.evaluation.selective`) and ``n`` (an int).

    ``brier`` is the multi-class Brier score, mean over samples of
    sum_k (p_k - onehot_k)^2, so it lies in [0, 2] and is *not* halved; this is
    sklearn's ``brier_score_loss`` for multi-class input (``scale_by_half="auto"``).
    """
    return _whole_set_meter(logits, labels, (10, 15)).compute()


def reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Top-label :func:`calibration_bins` of a classifier's softmax, for the reliability diagram."""
    return _whole_set_meter(logits, labels, (n_bins,)).bins(n_bins)


class SegmentationMeter:
    """Per-pixel accuracy, mIoU and calibration of a segmenter, streamed batch by batch and across processes.

    ``state`` is one float64 tensor on the device: the K x K confusion counts (rows: true class, columns:
    prediction), the ``n_bins`` :func:`_bin_sums` of the per-pixel top-class softmax confidence, the NLL
    sum and the pixel count, and the pixels' selective-risk histogram (:func:`selective.histogram`).
    Pixels whose mask is ``ignore_index`` enter none of them. Sums add over batches and processes, so any
    split of the pixels gives the whole set's metrics, and :meth:`all_reduce` is a single collective.
    """

    # float64 elements of one piece of logits converted at once (32 MB): a 21 x 1024 x 2048 image is
    # evaluated in row blocks instead of as a 350 MB float64 copy.
    CHUNK = 1 << 22

    def __init__(
        self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255, n_bins: int = 15
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        _check_n_bins(n_bins)
        self.num_classes, self.ignore_index, self.n_bins = num_classes, ignore_index, n_bins
        self.device = float64_device(torch.device(device))
        size = num_classes**2 + 3 * n_bins + 2 + 2 * selective.BINS
        self.state = torch.zeros(size, dtype=torch.float64, device=self.device)
        self._confusion, self._bins, self._totals, self._selective = self._unpack(self.state)

    def _unpack(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views of ``state``: the [K, K] confusion, the [3, n_bins] bin sums, (NLL sum, pixel count), the
        [2, selective.BINS] selective-risk histogram."""
        sizes = [self.num_classes**2, 3 * self.n_bins, 2, 2 * selective.BINS]
        confusion, bins, totals, hist = state.split(sizes)
        k = self.num_classes
        return confusion.view(k, k), bins.view(3, self.n_bins), totals, hist.view(2, selective.BINS)

    def update(self, logits: Tensor, masks: Tensor) -> None:
        """Add logits [B, K, H, W] and masks [B, H, W] (uint8 or int64 class ids, or ``ignore_index``).

        Only the input checks wait for the device. Large inputs go through in pieces of at most
        :attr:`CHUNK` logits (whole images, or row blocks of one image), so memory stays bounded.
        """
        self._check(logits, masks)
        batch, k, height, width = logits.shape
        if k * height * width <= self.CHUNK:
            step = self.CHUNK // (k * height * width)
            for b in range(0, batch, step):
                self._add(logits[b : b + step], masks[b : b + step])
        else:
            rows = max(1, self.CHUNK // (k * width))
            for b in range(batch):
                for r in range(0, height, rows):
                    self._add(logits[b : b + 1, :, r : r + rows], masks[b : b + 1, r : r + rows])

    def _check(self, logits: Tensor, masks: Tensor) -> None:
        if logits.ndim != 4 or masks.ndim != 3 or masks.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"expected logits [B, K, H, W] and masks [B, H, W], got {tuple(logits.shape)} and {tuple(masks.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits for {self.num_classes} classes, got shape {tuple(logits.shape)}")
        if masks.dtype not in (torch.uint8, torch.int64):
            raise ValueError(f"masks must be uint8 or int64 class ids, got dtype {masks.dtype}")
        known = ((masks >= 0) & (masks < self.num_classes)) | (masks == self.ignore_index)
        if not bool(known.all()):
            raise ValueError(f"mask ids must lie in [0, {self.num_classes - 1}] or be {self.ignore_index} (ignore)")
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits("logits contain NaN or infinity")

    def _add(self, logits: Tensor, masks: Tensor) -> None:
        """Accumulate one piece; ignored pixels get weight 0 (a mask, not indexing: no host sync)."""
        log_probs = F.log_softmax(logits.detach().to(device=self.device, dtype=torch.float64), dim=1)
        masks = masks.detach().to(device=self.device, dtype=torch.long)
        valid = masks != self.ignore_index
        target = torch.where(valid, masks, 0)
        top_log_prob, prediction = log_probs.max(dim=1)  # ties: lowest index
        weight = valid.to(torch.float64).flatten()
        correct = (prediction == target).to(torch.float64).flatten()
        nll = -log_probs.gather(1, target[:, None]).flatten()
        self._confusion.view(-1).index_add_(0, (target * self.num_classes + prediction).flatten(), weight)
        self._bins += _bin_sums(top_log_prob.exp().flatten(), correct, self.n_bins, weight)
        self._totals += torch.stack([(nll * weight).sum(), weight.sum()])
        self._selective += selective.histogram(top_log_prob, correct, weight)

    def all_reduce(self) -> None:
        """Sum the state over all processes (identity in one); call once, after the last update."""
        all_reduce_sum_(self.state)

    def _host_sums(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The unpacked state on the CPU (one transfer), refusing a meter that saw no valid pixel."""
        confusion, bins, totals, hist = self._unpack(self.state.cpu())
        if totals[1] == 0:
            raise ValueError("segmentation metrics need at least one pixel that is not ignored, got none")
        return confusion, bins, totals, hist

    @staticmethod
    def _iou(confusion: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class IoU and whether it is defined (union > 0)."""
        hits = confusion.diagonal()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - hits
        return hits / union.clamp(min=1.0), union > 0

    def compute(self) -> dict[str, float]:
        """``miou``, ``pixel_accuracy``, ``mean_class_accuracy``, ``pixel_ece_<n_bins>``, ``pixel_nll``, ``n_pixels``.

        ``miou`` averages intersection / union over the classes with a non-empty union: a class absent
        from both the ground truth and the predictions has no defined IoU and is left out of the mean
        (:meth:`per_class_iou` reports it as None), as is a class absent from the ground truth from
        ``mean_class_accuracy``. With them the per-pixel selective-risk metrics (``aurc``, ``eaurc``,
        ``accuracy_at_coverage_<50|80|90>`` over valid pixels). Covers this process's pixels, or every
        process's after :meth:`all_reduce`.
        """
        confusion, bins, (nll, n), hist = self._host_sums()
        iou, defined = self._iou(confusion)
        return {
            "miou": float(iou[defined].mean()),
            "pixel_accuracy": float(confusion.diagonal().sum() / n),
            "mean_class_accuracy": _mean_recall(confusion),
            f"pixel_ece_{self.n_bins}": _ece(bins),
            "pixel_nll": float(nll / n),
            **selective.selective_metrics(hist),
            "n_pixels": int(n),
        }

    def per_class_iou(self) -> list[float | None]:
        """IoU of each class, None where it is undefined (absent from both ground truth and predictions)."""
        iou, defined = self._iou(self._host_sums()[0])
        return [value if ok else None for value, ok in zip(iou.tolist(), defined.tolist())]

    def bins(self) -> dict[str, list[float]]:
        """Per-pixel top-label :func:`calibration_bins` table, for a pixel reliability diagram."""
        return _bin_table(self._host_sums()[1])

    def confusion(self) -> Tensor:
        """Pixel counts [K, K] (int64, CPU): row = true class, column = predicted class."""
        return self._host_sums()[0].round().long()

    def risk_coverage(self) -> dict[str, list[float]]:
        """The per-pixel risk-coverage curve (:func:`selective.risk_coverage`), for a plot."""
        return selective.risk_coverage(self._host_sums()[3])
