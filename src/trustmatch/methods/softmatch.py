"""SoftMatch (Chen et al., ICLR 2023): soft weights from a truncated Gaussian of the confidence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trustmatch.core import distributed as dist
from trustmatch.core.options import opt
from trustmatch.methods.method import METHODS, Check, SSLMethod, StatisticsConfig
from trustmatch.methods.selector import Selection, Selector, masked, pooled_means

PSEUDO_LABEL_SOURCES = ("raw", "aligned")


@dataclass
class SoftMatchConfig(StatisticsConfig):
    n_sigma: float = opt(2.0, "SoftMatch: width of the truncated Gaussian in standard deviations")
    dist_align: bool = opt(True, "SoftMatch uniform distribution alignment")
    pseudo_label_from: str = opt("raw", "SoftMatch: take yhat from 'raw' (USB) or 'aligned' probabilities")

    def checks(self) -> list[Check]:
        return [
            *super().checks(),
            (self.n_sigma > 0, "method.n_sigma", "positive"),
            (self.pseudo_label_from in PSEUDO_LABEL_SOURCES, "method.pseudo_label_from", "'raw' or 'aligned'"),
        ]


ALIGN_EPS = 1e-6  # USB's distribution-alignment hook adds it to target and class mean alike


def align_to_uniform(probs: Tensor, mean_probs: Tensor) -> Tensor:
    """SoftMatch's uniform alignment as USB computes it: p <- normalise(p (1/K + eps) / (p~ + eps)), class
    dim 1. The eps matters where a class mean p~ is small and the confidences vary little: without it
    the loss moved by 1e-5 and the gradients by 5e-5 against USB's step."""
    shape = [1, -1] + [1] * (probs.ndim - 2)
    target = 1.0 / probs.shape[1] + ALIGN_EPS
    aligned = probs * target / (mean_probs.view(shape) + ALIGN_EPS)
    return aligned / aligned.sum(dim=1, keepdim=True)


def softmatch_weights(conf: Tensor, mu: Tensor, var: Tensor, n_sigma: float) -> Tensor:
    """SoftMatch's truncated Gaussian: exp(-(c - mu)^2 / (2 var / n_sigma^2)) below mu, else 1."""
    gap = (conf - mu).clamp(max=0.0)
    return torch.exp(-gap.square() / (2.0 * var / n_sigma**2))


class SoftMatchSelector(Selector):
    """Soft weights from a truncated Gaussian fitted (by EMA) to the batch confidence.

    The alignment's class mean p~ starts as the first batch's mean, as USB does (``started``
    records that): starting from 1/K with m = 0.999 would leave the alignment almost inactive for
    thousands of steps. mu and var start at 1/K and 1.0.
    """

    def __init__(self, num_classes: int, momentum: float, n_sigma: float, dist_align: bool, label_from: str) -> None:
        super().__init__()
        self.m, self.n_sigma, self.dist_align, self.label_from = momentum, n_sigma, dist_align, label_from
        self.register_buffer("class_probs", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("started", torch.tensor(False))
        self.register_buffer("mu", torch.tensor(1.0 / num_classes))
        self.register_buffer("var", torch.tensor(1.0))

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        aligned = probs
        if self.dist_align:
            if update:
                _, mean_probs, _, count = pooled_means(probs, probs.amax(dim=1), probs.argmax(dim=1), valid)
                rate = torch.where(self.started, 1.0 - self.m, 1.0) * (count > 0)
                self.class_probs.lerp_(mean_probs, rate)
                self.started |= count > 0
            aligned = align_to_uniform(probs, self.class_probs.to(probs.dtype))
        conf = aligned.amax(dim=1)
        if update:
            batch_mu, batch_var, count = dist.all_reduce_mean_var(conf, valid)
            rate = (1 - self.m) * (count > 0)
            self.mu.lerp_(batch_mu, rate)
            self.var.lerp_(batch_var, rate)
        labels = (probs if self.label_from == "raw" else aligned).argmax(dim=1)
        weights = softmatch_weights(conf, self.mu, self.var, self.n_sigma)
        return Selection(labels, masked(weights.to(probs.dtype), valid))

    def stats(self) -> dict[str, float]:
        return {"mu": float(self.mu), "var": float(self.var)}


@METHODS.register(
    "softmatch", description="SoftMatch (truncated-Gaussian weights)", tasks=("classification", "segmentation")
)
class SoftMatch(SSLMethod):
    Config = SoftMatchConfig
    cfg: SoftMatchConfig

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        cfg = self.cfg
        return SoftMatchSelector(num_classes, cfg.ema_m, cfg.n_sigma, cfg.dist_align, cfg.pseudo_label_from)
