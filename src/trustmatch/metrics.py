"""Accuracy and calibration metrics for top-label classification, in pure torch.

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

__all__ = [
    "calibration_bins",
    "expected_calibration_error",
    "max_calibration_error",
    "classification_metrics",
    "reliability_bins",
]


def _float64_device(device: torch.device) -> torch.device:
    """MPS cannot hold float64, so its tensors are evaluated on the CPU instead."""
    return torch.device("cpu") if device.type == "mps" else device


def _check_binning_inputs(confidences: Tensor, correct: Tensor, n_bins: int) -> None:
    if confidences.ndim != 1 or correct.shape != confidences.shape:
        raise ValueError(
            "confidences and correct must be 1-D tensors of equal length, "
            f"got shapes {tuple(confidences.shape)} and {tuple(correct.shape)}"
        )
    if confidences.numel() == 0:
        raise ValueError("calibration needs at least one sample, got N=0")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if not bool(((confidences >= 0) & (confidences <= 1)).all()):
        raise ValueError("confidences must lie in [0, 1] (pass probabilities, not logits)")


def _bin_sums(confidences: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (count, confidence sum, correct sum) as float64 tensors of length ``n_bins``."""
    _check_binning_inputs(confidences, correct, n_bins)
    device = _float64_device(confidences.device)
    conf = confidences.detach().to(device=device, dtype=torch.float64)
    hits = correct.detach().to(device=device, dtype=torch.float64)
    # Inner edges b/n, b = 1..n-1; right=True puts a value equal to an edge in the
    # upper bin, and 1.0 (above every inner edge) in the last bin.
    inner_edges = torch.arange(1, n_bins, device=device, dtype=torch.float64) / n_bins
    index = torch.bucketize(conf, inner_edges, right=True)
    zeros = torch.zeros(n_bins, device=device, dtype=torch.float64)
    count = zeros.scatter_add(0, index, torch.ones_like(conf))
    conf_sum = zeros.scatter_add(0, index, conf)
    hit_sum = zeros.scatter_add(0, index, hits)
    return count, conf_sum, hit_sum


def calibration_bins(confidences: Tensor, correct: Tensor, n_bins: int) -> dict[str, list[float]]:
    """Per-bin statistics for a reliability diagram.

    Returns lists of length ``n_bins`` under ``lower``, ``upper`` (bin edges),
    ``count`` (ints), ``confidence`` and ``accuracy`` (bin means, 0.0 for an empty bin).
    """
    count, conf_sum, hit_sum = _bin_sums(confidences, correct, n_bins)
    denom = count.clamp(min=1.0)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": [int(c) for c in count.tolist()],
        "confidence": (conf_sum / denom).tolist(),
        "accuracy": (hit_sum / denom).tolist(),
    }


def expected_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int) -> float:
    """ECE = sum_b |B_b|/N * |conf_b - acc_b|, which equals sum_b |sum conf - sum correct| / N."""
    count, conf_sum, hit_sum = _bin_sums(confidences, correct, n_bins)
    return float((conf_sum - hit_sum).abs().sum() / count.sum())


def max_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int) -> float:
    """MCE = max over non-empty bins of |conf_b - acc_b| (empty bins carry no evidence)."""
    count, conf_sum, hit_sum = _bin_sums(confidences, correct, n_bins)
    nonempty = count > 0
    return float(((conf_sum - hit_sum)[nonempty] / count[nonempty]).abs().max())


def _log_probs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validate (logits, labels) and return float64 (log-probabilities, labels) on one device."""
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits [N, K] and labels [N], got shapes {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("metrics need at least one sample, got N=0")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    num_classes = logits.shape[1]
    if not bool(((labels >= 0) & (labels < num_classes)).all()):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or infinity")
    device = _float64_device(logits.device)
    log_probs = F.log_softmax(logits.detach().to(device=device, dtype=torch.float64), dim=1)
    return log_probs, labels.detach().to(device=device, dtype=torch.long)


def _top_label(log_probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence and whether the top label is correct (ties: lowest index)."""
    confidence, prediction = log_probs.exp().max(dim=1)
    return confidence, prediction == labels


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy and calibration of a classifier, all as fractions.

    Keys: ``accuracy``, ``ece_15``, ``ece_10``, ``mce_15``, ``mce_10``, ``nll`` (mean
    cross-entropy, natural log), ``brier``, ``mean_confidence`` and ``n`` (an int).

    ``brier`` is the multi-class Brier score, mean over samples of
    sum_k (p_k - onehot_k)^2, so it lies in [0, 2] and is *not* halved; this is
    sklearn's ``brier_score_loss`` for multi-class input (``scale_by_half="auto"``).
    """
    log_probs, labels = _log_probs(logits, labels)
    probs = log_probs.exp()
    confidence, correct = _top_label(log_probs, labels)
    onehot = F.one_hot(labels, num_classes=log_probs.shape[1]).to(torch.float64)
    return {
        "accuracy": float(correct.double().mean()),
        "ece_15": expected_calibration_error(confidence, correct, 15),
        "ece_10": expected_calibration_error(confidence, correct, 10),
        "mce_15": max_calibration_error(confidence, correct, 15),
        "mce_10": max_calibration_error(confidence, correct, 10),
        "nll": float(-log_probs.gather(1, labels[:, None]).mean()),
        "brier": float((probs - onehot).pow(2).sum(dim=1).mean()),
        "mean_confidence": float(confidence.mean()),
        "n": int(labels.shape[0]),
    }


def reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Top-label :func:`calibration_bins` of a classifier's softmax, for the reliability diagram."""
    log_probs, labels = _log_probs(logits, labels)
    confidence, correct = _top_label(log_probs, labels)
    return calibration_bins(confidence, correct, n_bins)
