"""The selector interface: weak-view probabilities -> (pseudo-labels, per-element weights).

One interface serves every method and every task. Probabilities carry the class dimension at
dim 1 — ``[N, K]`` for classification, ``[B, K, H, W]`` for segmentation — and labels and
weights come back with that dimension removed. The stateful selectors are ``nn.Module`` s so
their statistics travel with ``state_dict`` (checkpoints) and ``.to(device)``; in multi-process
training their statistics are averaged across processes before they update.

``select(probs, indices, valid, update)`` takes an optional validity mask (ignored pixels,
padding): invalid elements get weight 0 and enter no statistic. ``update=False`` selects with the
current state and changes nothing (a second pass, CutMix partners); it runs no collective, so one
process may call it alone. Each method's selector lives in the method's module; the pure functions
there (``fixed_threshold``, ``flexmatch_class_thresholds``, ``softmatch_weights``, ``csl_select`` ...)
are public so a user's own training loop can use them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trustmatch.core import distributed as dist


@dataclass
class Selection:
    """Hard pseudo-labels and the weight of each element in the unlabeled loss."""

    labels: Tensor  # int64, probs.shape without dim 1
    weights: Tensor  # float, same shape; 0 = ignored, 1 = fully trusted
    targets: Tensor | None = None  # soft targets, probs' shape (UDA); None: the hard labels are the targets


# ----------------------------------------------------------------------------- pure functions


def fixed_threshold(probs: Tensor, tau: float, valid: Tensor | None = None) -> Selection:
    """FixMatch: yhat = argmax p, w = 1[max p >= tau] (0 where not ``valid``)."""
    conf, labels = probs.max(dim=1)
    return Selection(labels, masked((conf >= tau).to(probs.dtype), valid))


def masked(weights: Tensor, valid: Tensor | None) -> Tensor:
    return weights if valid is None else torch.where(valid, weights, 0.0)


def flat_probs(probs: Tensor) -> Tensor:
    """[N, K] or [B, K, H, W] -> [elements, K]."""
    return probs.movedim(1, -1).reshape(-1, probs.shape[1])


def pooled_means(
    probs: Tensor, conf: Tensor, labels: Tensor, valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean confidence, mean probability vector, pseudo-label histogram (fractions) and count of the
    valid elements of every process: sums and counts are reduced in one collective, so processes
    with different numbers of valid elements are weighted by them (not a mean of means). With no
    valid element anywhere the means are 0 and the count 0: callers then leave their state alone."""
    num_classes = probs.shape[1]
    w = torch.ones_like(conf) if valid is None else valid.to(conf.dtype)
    flat = flat_probs(probs)
    if valid is not None:  # where, not a product: an ignored element may hold NaN or inf
        conf, flat = torch.where(valid, conf, 0.0), torch.where(valid.reshape(-1, 1), flat, 0.0)
    sums = torch.cat(
        [
            torch.stack([conf.sum(), w.sum()]),
            flat.sum(0),
            torch.zeros(num_classes, device=probs.device).index_add_(0, labels.flatten(), w.flatten().float()),
        ]
    ).float()
    dist.all_reduce_sum_(sums)
    count = sums[1]
    means = sums / count.clamp_min(1.0)
    return means[0], means[2 : 2 + num_classes], means[2 + num_classes :], count


class Selector(nn.Module):
    """Base class: ``select(probs, indices, valid, update)`` -> Selection; state lives in buffers.

    ``indices``: dataset indices of the elements' samples (per-sample state); ``valid``: bool mask
    of probs' shape without dim 1 (None = all valid); ``update=False``: read the state, change nothing.
    """

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        raise NotImplementedError

    def auxiliary_loss(self, strong_logits: Tensor, selection: Selection) -> Tensor | None:
        """An extra unlabeled loss some methods add (FreeMatch's fairness term)."""
        return None

    def stats(self) -> dict[str, float]:
        """Scalars worth logging (current thresholds, EMA statistics)."""
        return {}
