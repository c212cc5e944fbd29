"""Pseudo-label selectors: weak-view probabilities -> (pseudo-labels, per-element weights).

One interface serves every method and every task. Probabilities carry the class dimension at
dim 1 — ``[N, K]`` for classification, ``[B, K, H, W]`` for segmentation — and labels and
weights come back with that dimension removed. The stateful selectors are ``nn.Module`` s so
their statistics travel with ``state_dict`` (checkpoints) and ``.to(device)``; in multi-process
training their statistics are averaged across processes before they update.

``select(probs, indices, valid, update)`` takes an optional validity mask (ignored pixels,
padding): invalid elements get weight 0 and enter no statistic. ``update=False`` selects with the
current state and changes nothing (a second pass, CutMix partners); it runs no collective, so one
process may call it alone.

The pure functions (``fixed_threshold``, ``flexmatch_class_thresholds``, ``softmatch_weights``,
``freematch_fairness_loss``, ``sharpen`` ...) are public so a user's own training loop can use them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trustmatch import distributed as dist
from trustmatch.config import MethodConfig
from trustmatch.registry import Registry


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
    return Selection(labels, _masked((conf >= tau).to(probs.dtype), valid))


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """p^(1/T), renormalised over dim 1 (UDA's sharpened soft pseudo-labels; T < 1 sharpens)."""
    return (probs.clamp_min(1e-12).log() / temperature).softmax(dim=1)


def flexmatch_class_thresholds(stored: Tensor, num_classes: int, tau: float, warmup: bool = True) -> Tensor:
    """FlexMatch's class thresholds T_c = M(beta_c) * tau with M(x) = x / (2 - x).

    ``stored`` holds every unlabeled sample's last confident prediction (-1 = none yet).
    sigma_c counts samples stored as c; beta_c = sigma_c / max(max_c sigma_c, N_unused) with
    threshold warm-up, sigma_c / max_c sigma_c without. Counts are exact in float32 up to 2^24
    samples (MPS has no float64).
    """
    sigma = torch.bincount(stored[stored >= 0], minlength=num_classes).float()
    denom = sigma.max()
    if warmup:
        denom = torch.maximum(denom, (stored < 0).sum().float())
    beta = sigma / denom.clamp_min(1.0)
    return beta / (2.0 - beta) * tau


def freematch_class_thresholds(global_tau: Tensor, class_probs: Tensor) -> Tensor:
    """FreeMatch's tau_t(c) = p~_t(c) / max_c' p~_t(c') * tau_t."""
    return class_probs / class_probs.max() * global_tau


def align_to_uniform(probs: Tensor, mean_probs: Tensor) -> Tensor:
    """SoftMatch's uniform alignment: p <- normalise(p * (1/K) / p~), class dim 1."""
    shape = [1, -1] + [1] * (probs.ndim - 2)
    aligned = probs / mean_probs.view(shape)
    return aligned / aligned.sum(dim=1, keepdim=True)


def softmatch_weights(conf: Tensor, mu: Tensor, var: Tensor, n_sigma: float) -> Tensor:
    """SoftMatch's truncated Gaussian: exp(-(c - mu)^2 / (2 var / n_sigma^2)) below mu, else 1."""
    gap = (conf - mu).clamp(max=0.0)
    return torch.exp(-gap.square() / (2.0 * var / n_sigma**2))


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


def _masked(weights: Tensor, valid: Tensor | None) -> Tensor:
    return weights if valid is None else torch.where(valid, weights, 0.0)


def _flat_probs(probs: Tensor) -> Tensor:
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
    flat = _flat_probs(probs)
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


def _safe_inverse(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-12), torch.zeros_like(x)).detach()


def _sum_norm(x: Tensor) -> Tensor:
    return x / x.sum().clamp_min(1e-12)  # an all-zero x stays zero (nothing selected)


# ----------------------------------------------------------------------------- selectors


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


class FixMatchSelector(Selector):
    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        return fixed_threshold(probs, self.tau, valid)


class FlexMatchSelector(Selector):
    """Curriculum pseudo-labeling: per-class thresholds from per-sample learning status."""

    def __init__(self, tau: float, num_classes: int, num_unlabeled: int, warmup: bool = True) -> None:
        super().__init__()
        self.tau, self.num_classes, self.warmup = tau, num_classes, warmup
        self.register_buffer("stored", torch.full((num_unlabeled,), -1, dtype=torch.long))

    def thresholds(self) -> Tensor:
        return flexmatch_class_thresholds(self.stored, self.num_classes, self.tau, self.warmup)

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        if indices is None or probs.ndim != 2:
            raise ValueError("FlexMatch keeps per-sample state: it needs [N, K] probabilities and dataset indices")
        conf, labels = probs.max(dim=1)
        weights = _masked((conf >= self.thresholds()[labels]).to(probs.dtype), valid)
        if update:  # where, not boolean indexing: no host sync in a single process
            confident = conf > self.tau if valid is None else (conf > self.tau) & valid
            idx, lab, ok = (dist.all_gather_cat(t) for t in (indices, labels, confident))
            self.stored[idx] = torch.where(ok, lab, self.stored[idx])
        return Selection(labels, weights)

    def stats(self) -> dict[str, float]:
        t = self.thresholds()
        return {"threshold_mean": float(t.mean()), "unused_fraction": float((self.stored < 0).float().mean())}


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
        return Selection(labels, _masked((conf >= thresholds[labels]).to(probs.dtype), valid))

    def auxiliary_loss(self, strong_logits: Tensor, selection: Selection) -> Tensor | None:
        if self.fairness_weight == 0:
            return None
        logits = _flat_probs(strong_logits)
        loss = freematch_fairness_loss(logits, selection.weights.flatten(), self.class_probs, self.label_hist)
        return self.fairness_weight * loss

    def stats(self) -> dict[str, float]:
        return {"global_tau": float(self.global_tau)}


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
        return Selection(labels, _masked(weights.to(probs.dtype), valid))

    def stats(self) -> dict[str, float]:
        return {"mu": float(self.mu), "var": float(self.var)}


class UDASelector(Selector):
    """UDA: sharpened soft targets (temperature T) on the confident elements (max p >= tau)."""

    def __init__(self, tau: float, temperature: float) -> None:
        super().__init__()
        self.tau, self.temperature = tau, temperature

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        selection = fixed_threshold(probs, self.tau, valid)
        selection.targets = sharpen(probs, self.temperature)
        return selection


SelectorFactory = Callable[[MethodConfig, int, int], Selector]
SELECTORS: Registry[SelectorFactory] = Registry("method")


@SELECTORS.register("fixmatch")
@SELECTORS.register("unimatch")  # segmentation's name for the same per-pixel fixed threshold
def _fixmatch(cfg: MethodConfig, num_classes: int, num_unlabeled: int) -> Selector:
    return FixMatchSelector(cfg.tau)


@SELECTORS.register("flexmatch")
def _flexmatch(cfg: MethodConfig, num_classes: int, num_unlabeled: int) -> Selector:
    return FlexMatchSelector(cfg.tau, num_classes, num_unlabeled, cfg.threshold_warmup)


@SELECTORS.register("freematch")
def _freematch(cfg: MethodConfig, num_classes: int, num_unlabeled: int) -> Selector:
    return FreeMatchSelector(num_classes, cfg.ema_m, cfg.saf_weight)


@SELECTORS.register("softmatch")
def _softmatch(cfg: MethodConfig, num_classes: int, num_unlabeled: int) -> Selector:
    return SoftMatchSelector(num_classes, cfg.ema_m, cfg.n_sigma, cfg.dist_align, cfg.pseudo_label_from)


@SELECTORS.register("uda")
def _uda(cfg: MethodConfig, num_classes: int, num_unlabeled: int) -> Selector:
    return UDASelector(cfg.tau, cfg.temperature)


def build_selector(cfg: MethodConfig, num_classes: int, num_unlabeled: int) -> Selector:
    return SELECTORS.get(cfg.name)(cfg, num_classes, num_unlabeled)
