"""FixMatch (Sohn et al., NeurIPS 2020): hard pseudo-labels where the weak view's confidence reaches tau."""

from __future__ import annotations

from torch import Tensor

from trustmatch.methods.method import METHODS, SSLMethod, ThresholdConfig
from trustmatch.methods.selector import Selection, Selector, fixed_threshold


class FixMatchSelector(Selector):
    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        return fixed_threshold(probs, self.tau, valid)


@METHODS.register("fixmatch", description="FixMatch (confidence threshold 0.95)", tasks=("classification",))
class FixMatch(SSLMethod):
    """In segmentation the same per-pixel threshold is UniMatch's (``unimatch``)."""

    Config = ThresholdConfig
    cfg: ThresholdConfig
    elsewhere = {"segmentation": "its fixed-threshold selection is 'unimatch' there"}

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        return FixMatchSelector(self.cfg.tau)
