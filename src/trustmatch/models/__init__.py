"""Classifiers and segmentation networks by name. Every model maps images to logits and exposes the
features behind them.

Contract: ``forward(x)`` returns ``Output(logits, features)`` with ``logits == head(features)``,
``head`` an ``nn.Linear`` (run in float32) and ``features`` the globally pooled penultimate
features [N, D] that ``forward_features`` also returns, so feature-space methods (CalibrateMix
pairing) reuse the training pass itself. Any spatial size works.

Segmentation networks (``segnets``) return per-pixel logits [N, K, H, W] at the input's size and
take ``perturb`` (UniMatch's feature perturbation); see that module for their contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trustmatch.core.registry import Registry
from trustmatch.models import cnn, segnets, wideresnet
from trustmatch.models.output import Output

__all__ = ["MODELS", "SEGMENTATION_MODELS", "Output", "build_model"]

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
MODELS.register("wrn_28_2", task="classification")(wideresnet.wrn_28_2)
MODELS.register("wrn_28_8", task="classification")(wideresnet.wrn_28_8)
MODELS.register("wrn_37_2", task="classification")(wideresnet.wrn_37_2)
MODELS.register("cnn", task="classification")(cnn.SmallCNN)
# segmentation factories take ``pretrained`` and ``output_stride`` and return per-pixel logits
MODELS.register("deeplabv3plus_r50", task="segmentation")(segnets.deeplabv3plus_r50)
MODELS.register("deeplabv3plus_r101", task="segmentation")(segnets.deeplabv3plus_r101)
MODELS.register("segnet_small", task="segmentation")(segnets.segnet_small)

SEGMENTATION_MODELS = tuple(MODELS.where(task="segmentation"))


def build_model(
    name: str, num_classes: int, in_channels: int, bn_momentum: float = 0.001, dropout: float = 0.0, **extra: Any
) -> nn.Module:
    """Build a registered model; an unknown name raises ``UserError`` with the closest known name.

    ``extra`` goes to the factory as keywords: the :data:`SEGMENTATION_MODELS` take ``pretrained`` and
    ``output_stride`` (classifiers take none).

    ``bn_momentum=0.001`` is FixMatch's, made for ~10^6 steps: BN running statistics need a few
    ``1/bn_momentum`` steps to settle, so short runs want ~0.01 (a 600-step digits run evaluated at
    58 % with 0.001 and 98 % with 0.01).
    """
    factory = MODELS.get(name)
    return factory(num_classes=num_classes, in_channels=in_channels, bn_momentum=bn_momentum, dropout=dropout, **extra)
