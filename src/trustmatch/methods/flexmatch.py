"""FlexMatch (Zhang et al., NeurIPS 2021): class thresholds from each class's learning status."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trustmatch.core import distributed as dist
from trustmatch.core.options import opt
from trustmatch.methods.method import METHODS, SSLMethod, ThresholdConfig
from trustmatch.methods.selector import Selection, Selector, masked


@dataclass
class FlexMatchConfig(ThresholdConfig):
    threshold_warmup: bool = opt(True, "FlexMatch: count unused samples in the normaliser")


def flexmatch_class_thresholds(stored: Tensor, num_classes: int, tau: float, warmup: bool = True) -> Tensor:
    """FlexMatch's class thresholds T_c = M(beta_c) * tau with M(x) = x / (2 - x).

    ``stored`` holds every unlabeled sample's last confident prediction (-1 = none yet).
    sigma_c counts samples stored as c; beta_c = sigma_c / max(max_c sigma_c, N_unused) with
    threshold warm-up, sigma_c / max_c sigma_c without. Counts are exact in float32 up to 2^24
    samples (MPS has no float64). Counted by ``index_add_`` with 0/1 weights, not ``bincount`` of the
    stored entries: a shape that depends on the values makes the host wait for the device.
    """
    seen = (stored >= 0).float()
    sigma = torch.zeros(num_classes, device=stored.device).index_add_(0, stored.clamp_min(0), seen)
    denom = sigma.max()
    if warmup:
        denom = torch.maximum(denom, len(stored) - seen.sum())
    beta = sigma / denom.clamp_min(1.0)
    return beta / (2.0 - beta) * tau


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
        weights = masked((conf >= self.thresholds()[labels]).to(probs.dtype), valid)
        if update:  # where, not boolean indexing: no host sync in a single process
            confident = conf > self.tau if valid is None else (conf > self.tau) & valid
            idx, lab, ok = (dist.all_gather_cat(t) for t in (indices, labels, confident))
            self.stored[idx] = torch.where(ok, lab, self.stored[idx])
        return Selection(labels, weights)

    def stats(self) -> dict[str, float]:
        t = self.thresholds()
        return {"threshold_mean": float(t.mean()), "unused_fraction": float((self.stored < 0).float().mean())}


@METHODS.register(
    "flexmatch", description="FlexMatch (curriculum class thresholds)", tasks=("classification",)
)  # a per-sample state, which pixels lack
class FlexMatch(SSLMethod):
    Config = FlexMatchConfig
    cfg: FlexMatchConfig

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        return FlexMatchSelector(self.cfg.tau, num_classes, num_unlabeled, self.cfg.threshold_warmup)
