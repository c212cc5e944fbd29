"""Classifiers by name. Every model maps images to logits and exposes the features behind them.

Contract: ``forward(x)`` returns ``Output(logits, features)`` with ``logits == head(features)``,
``head`` an ``nn.Linear`` (run in float32) and ``features`` the globally pooled penultimate
features [N, D] that ``forward_features`` also returns, so feature-space methods (CalibrateMix
pairing) reuse the training pass itself. Any spatial size works.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from trustmatch.models import cnn, wideresnet
from trustmatch.models.output import Output
from trustmatch.registry import Registry

__all__ = ["MODELS", "Output", "build_model"]

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
