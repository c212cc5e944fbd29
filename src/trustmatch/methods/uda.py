"""UDA (Xie et al., NeurIPS 2020): sharpened soft pseudo-labels on the confident elements."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from trustmatch.core.options import opt
from trustmatch.methods.method import METHODS, Check, SSLMethod, ThresholdConfig
from trustmatch.methods.selector import Selection, Selector, fixed_threshold


@dataclass
class UDAConfig(ThresholdConfig):
    tau: float = opt(0.8, "confidence threshold of a pseudo-label (UDA: 0.8)")
    temperature: float = opt(0.4, "UDA: sharpening temperature of the soft pseudo-labels (not calibration's T)")

    def checks(self) -> list[Check]:
        return [*super().checks(), (self.temperature > 0, "method.temperature", "positive")]


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """p^(1/T), renormalised over dim 1 (UDA's sharpened soft pseudo-labels; T < 1 sharpens)."""
    return (probs.clamp_min(1e-12).log() / temperature).softmax(dim=1)


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


@METHODS.register(
    "uda", description="UDA (sharpened soft pseudo-labels above 0.8)", tasks=("classification", "segmentation")
)
class UDA(SSLMethod):
    Config = UDAConfig
    cfg: UDAConfig

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        return UDASelector(self.cfg.tau, self.cfg.temperature)
