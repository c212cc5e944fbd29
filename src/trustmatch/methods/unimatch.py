"""UniMatch (Yang et al., CVPR 2023) as a method: its step (``unimatch_step``) with FixMatch's per-pixel
fixed threshold. Every semi-supervised method runs that step in segmentation with its own selector."""

from __future__ import annotations

from trustmatch.methods.fixmatch import FixMatchSelector
from trustmatch.methods.method import METHODS, SSLMethod, ThresholdConfig
from trustmatch.methods.selector import Selector


@METHODS.register(
    "unimatch",
    description="UniMatch (two CutMix strong views + feature perturbation, threshold 0.95)",
    tasks=("segmentation",),
)
class UniMatch(SSLMethod):
    Config = ThresholdConfig
    cfg: ThresholdConfig

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        return FixMatchSelector(self.cfg.tau)
