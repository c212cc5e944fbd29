"""FreeMatch (Wang et al., ICLR 2023): self-adaptive thresholds and the fairness loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trustmatch.core.options import opt
from trustmatch.methods.method import METHODS, SSLMethod, StatisticsConfig
from trustmatch.methods.selector import Selection, Selector, flat_probs, masked, pooled_means


@dataclass
class FreeMatchConfig(StatisticsConfig):
    saf_weight: float = opt(0.001, "FreeMatch fairness weight w_f: USB's published configs (0 disables)")


def freematch_class_thresholds(global_tau: Tensor, class_probs: Tensor) -> Tensor:
    """FreeMatch's tau_t(c) = p~_t(c) / max_c' p~_t(c') * tau_t."""
    return class_probs / class_probs.max() * global_tau


def freematch_fairness_loss(strong_logits: Tensor, mask: Tensor, class_probs: Tensor, label_hist: Tensor) -> Tensor:
    """FreeMatch's self-adaptive fairness loss (Wang et al., ICLR 2023, Eq. 11).

        L_f = -H( SumNorm(p~_t / h~_t), SumNorm(p_bar / h_bar) ),   H(a, b) = -sum_c a_c log b_c

    p~_t, h~_t: EMA of the mean weak-view probabilities and of the weak-view pseudo-label
    histogram; p_bar: mean strong-view probabilities of the selected samples; h_bar: histogram
    of their strong-view predictions. Minimising L_f maximises the cross-entropy between the two
    rescaled distributions, which pushes strong-view predictions to spread over classes. A class
    absent from a histogram gets scale 0 (not infinity). Only p_bar carries gradient. Selection
    enters as 0/1 weights, not boolean indexing, so the step never waits on the host; with nothing
    selected the loss is 0 (with a zero gradient).
    """
    probs = strong_logits.float().softmax(dim=1)
    w = (mask > 0).to(probs.dtype)
    count = w.sum()
    hist = torch.zeros(probs.shape[1], dtype=probs.dtype, device=probs.device).index_add_(0, probs.argmax(dim=1), w)
    mean = (probs * w[:, None]).sum(dim=0) / count.clamp_min(1.0)
    p_bar = _sum_norm(mean * _safe_inverse(hist / count.clamp_min(1.0)))
    target = _sum_norm(class_probs.to(probs.dtype) * _safe_inverse(label_hist.to(probs.dtype)))
    return torch.where(count > 0, (target * torch.log(p_bar + 1e-12)).sum(), 0.0)


def _safe_inverse(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-12), torch.zeros_like(x)).detach()


def _sum_norm(x: Tensor) -> Tensor:
    return x / x.sum().clamp_min(1e-12)  # an all-zero x stays zero (nothing selected)


class FreeMatchSelector(Selector):
    """Self-adaptive global and local thresholds from EMAs of the model's confidence."""

    def __init__(self, num_classes: int, momentum: float, fairness_weight: float) -> None:
        super().__init__()
        self.m, self.fairness_weight = momentum, fairness_weight
        uniform = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("global_tau", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_probs", uniform.clone())
        self.register_buffer("label_hist", uniform.clone())

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        conf, labels = probs.max(dim=1)
        if update:
            mean_conf, mean_probs, hist, count = pooled_means(probs, conf, labels, valid)
            rate = (1 - self.m) * (count > 0)  # a batch without valid elements moves nothing
            self.global_tau.lerp_(mean_conf, rate)
            self.class_probs.lerp_(mean_probs, rate)
            self.label_hist.lerp_(hist, rate)
        thresholds = freematch_class_thresholds(self.global_tau, self.class_probs)
        return Selection(labels, masked((conf >= thresholds[labels]).to(probs.dtype), valid))

    def auxiliary_loss(self, strong_logits: Tensor, selection: Selection) -> Tensor | None:
        if self.fairness_weight == 0:
            return None
        logits = flat_probs(strong_logits)
        loss = freematch_fairness_loss(logits, selection.weights.flatten(), self.class_probs, self.label_hist)
        return self.fairness_weight * loss

    def stats(self) -> dict[str, float]:
        return {"global_tau": float(self.global_tau)}


@METHODS.register(
    "freematch",
    description="FreeMatch (self-adaptive thresholds + fairness)",
    tasks=("classification", "segmentation"),
)
class FreeMatch(SSLMethod):
    Config = FreeMatchConfig
    cfg: FreeMatchConfig

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        return FreeMatchSelector(num_classes, self.cfg.ema_m, self.cfg.saf_weight)
