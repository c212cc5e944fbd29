"""Classifiers and segmentation networks by name. Every model maps images to logits and exposes the
features behind them.

Contract: ``forward(x)`` returns ``Output(logits, features)`` with ``logits == head(features)``,
``head`` an ``nn.Linear`` (run in float32) and ``features`` the globally pooled penultimate
features [N, D] that ``forward_features`` also returns, so feature-space methods (CalibrateMix
pairing) reuse the training pass itself. Any spatial size works.

``timm:<name>`` is any timm classifier (``timm_models``): timm's network up to its pooled pre-logits
features, then the project's float32 head; USB's small-image ViTs (``usb_vit``) are timm ViTs with USB's
sizes. Both take ``image_size`` (fixed-size networks are built at the data's side) and ``weights``
(``none`` or ``imagenet``); :func:`input_config` says what input a network's weights expect.

Segmentation networks (``segnets``) return per-pixel logits [N, K, H, W] at the input's size and
take ``perturb`` (UniMatch's feature perturbation); see that module for their contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trustmatch.core.registry import Registry
from trustmatch.models import cnn, segnets, timm_models, usb_vit, wideresnet
from trustmatch.models.output import Output
from trustmatch.models.timm_models import InputConfig

__all__ = [
    "MODELS",
    "SEGMENTATION_MODELS",
    "InputConfig",
    "Output",
    "build_model",
    "check_weights",
    "input_config",
    "is_classifier",
]

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
MODELS.register("wrn_28_2", task="classification")(wideresnet.wrn_28_2)
MODELS.register("wrn_28_8", task="classification")(wideresnet.wrn_28_8)
MODELS.register("wrn_37_2", task="classification")(wideresnet.wrn_37_2)
MODELS.register("cnn", task="classification")(cnn.SmallCNN)
# USB's small-image ViTs: the timm factories' keywords (image_size, weights)
for _name in usb_vit.SIZES:
    MODELS.register(_name, task="classification", timm=True)(getattr(usb_vit, _name))
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
    ``output_stride``; ``timm:<name>`` and USB's ViTs (:func:`takes_input`) take ``image_size`` and ``weights``;
    the other classifiers take none.

    ``bn_momentum=0.001`` is FixMatch's, made for ~10^6 steps: BN running statistics need a few
    ``1/bn_momentum`` steps to settle, so short runs want ~0.01 (a 600-step digits run evaluated at
    58 % with 0.001 and 98 % with 0.01).
    """
    if name.startswith(timm_models.PREFIX):
        return timm_models.create(
            name.removeprefix(timm_models.PREFIX), num_classes, in_channels, bn_momentum, dropout, **extra
        )
    factory = MODELS.get(name)
    return factory(num_classes=num_classes, in_channels=in_channels, bn_momentum=bn_momentum, dropout=dropout, **extra)


def takes_input(name: str) -> bool:
    """Whether ``name``'s factory takes ``image_size`` and ``weights`` (timm classifiers and USB's ViTs)."""
    return name.startswith(timm_models.PREFIX) or (name in MODELS and MODELS.metadata(name).get("timm", False))


def is_classifier(name: str) -> bool:
    """A registered classifier or ``timm:<name>`` (an unknown timm name: one line with the closest names)."""
    if name.startswith(timm_models.PREFIX):
        timm_models.check_name(name.removeprefix(timm_models.PREFIX))
        return True
    return name in MODELS.where(task="classification")


def input_config(name: str) -> InputConfig | None:
    """The input ``name``'s weights expect (side, normalisation, interpolation); None where the data decides."""
    if name.startswith(timm_models.PREFIX):
        return timm_models.input_config(name.removeprefix(timm_models.PREFIX))
    if name in usb_vit.SIZES:
        return usb_vit.input_config(name)
    return None


def check_weights(name: str, weights: str) -> None:
    """Refuse ``imagenet`` for a network that cannot have it, in one line, before any data is loaded."""
    if weights != "imagenet":
        return
    if name.startswith(timm_models.PREFIX):
        timm_models.weights_source(name.removeprefix(timm_models.PREFIX))
    elif name in usb_vit.SIZES:
        usb_vit.refuse_imagenet(name)
