"""Classifiers by name. Every model maps images to logits and exposes the features behind them.

Contract: ``forward(x) == head(forward_features(x))`` with ``head`` an ``nn.Linear`` and
``forward_features`` returning globally pooled features [N, D], so feature-space methods
(e.g. CalibrateMix similarity) can reuse the same pass. Any spatial size works.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from trustmatch.models import cnn, wideresnet
from trustmatch.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
MODELS.register("wrn_28_2")(wideresnet.wrn_28_2)
MODELS.register("wrn_28_8")(wideresnet.wrn_28_8)
MODELS.register("wrn_37_2")(wideresnet.wrn_37_2)
MODELS.register("cnn")(cnn.SmallCNN)


def build_model(
    name: str, num_classes: int, in_channels: int, bn_momentum: float = 0.001, dropout: float = 0.0
) -> nn.Module:
    """Build a registered model; an unknown name raises ``UserError`` with the closest known name.

    ``bn_momentum=0.001`` is FixMatch's, made for ~10^6 steps: BN running statistics need a few
    ``1/bn_momentum`` steps to settle, so short runs want ~0.01 (a 600-step digits run evaluated at
    58 % with 0.001 and 98 % with 0.01).
    """
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, bn_momentum=bn_momentum, dropout=dropout)
