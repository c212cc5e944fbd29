"""Classifiers and segmentation networks by name. Every model maps images to logits and exposes the
features behind them.

Contract: ``forward(x)`` returns ``Output(logits, features)`` with ``logits == head(features)``,
``head`` an ``nn.Linear`` (run in float32) and ``features`` the globally pooled penultimate
features [N, D] that ``forward_features`` also returns, so feature-space methods (CalibrateMix
pairing) reuse the training pass itself. Any spatial size works.

Segmentation networks (``segnets``, ``deeplab_deepstem``) return per-pixel logits [N, K, H, W] at the
input's size and take ``perturb`` (UniMatch's feature perturbation); see ``segnets`` for their contract.
``smp:<encoder>`` names DeepLabV3+ on any segmentation-models-pytorch encoder (``segnets.smp_deeplab``).

Initial weights (``model.weights``) are ``build_model``'s: ``imagenet`` goes to factories registered with
``imagenet=True`` (they fetch through their library); a model registered with ``imagenet="<text>"`` has
ImageNet weights only as a file and refuses with that text; a path is loaded by ``weights.load_weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trustmatch.core.errors import UserError
from trustmatch.core.registry import Registry
from trustmatch.models import cnn, deeplab_deepstem, segnets, wideresnet
from trustmatch.models.output import Output
from trustmatch.models.weights import load_weights

__all__ = ["MODELS", "SEGMENTATION_MODELS", "Output", "build_model", "is_segmentation_model", "load_weights"]

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
MODELS.register("wrn_28_2", task="classification")(wideresnet.wrn_28_2)
MODELS.register("wrn_28_8", task="classification")(wideresnet.wrn_28_8)
MODELS.register("wrn_37_2", task="classification")(wideresnet.wrn_37_2)
MODELS.register("cnn", task="classification")(cnn.SmallCNN)
# segmentation factories take ``output_stride`` (and ``imagenet`` where registered so) and return per-pixel logits
MODELS.register("deeplabv3plus_r50", task="segmentation", imagenet=True)(segnets.deeplabv3plus_r50)
MODELS.register("deeplabv3plus_r101", task="segmentation", imagenet=True)(segnets.deeplabv3plus_r101)


def _release_file(depth: int) -> str:
    """Why ``imagenet`` cannot be fetched for the deep-stem ResNets, and the fix."""
    return (
        f"its ImageNet weights are UniMatch's release file resnet{depth}.pth, which no library downloads: get "
        f"resnet{depth}.pth from the UniMatch release (its pretrained/ folder) and pass "
        f"model.weights=/path/to/resnet{depth}.pth"
    )


# UniMatch's (and CSL's) network as released: deep-stem ResNet and the release's decoder (``deeplab_deepstem``)
MODELS.register("deeplabv3plus_r50_deepstem", task="segmentation", imagenet=_release_file(50))(
    deeplab_deepstem.deeplabv3plus_r50_deepstem
)
MODELS.register("deeplabv3plus_r101_deepstem", task="segmentation", imagenet=_release_file(101))(
    deeplab_deepstem.deeplabv3plus_r101_deepstem
)
MODELS.register("segnet_small", task="segmentation")(segnets.segnet_small)

SEGMENTATION_MODELS = tuple(MODELS.where(task="segmentation"))
#: ``smp:<encoder>``: DeepLabV3+ on any segmentation-models-pytorch encoder, beside the registry
SMP_PREFIX = "smp:"


def is_segmentation_model(name: str) -> bool:
    """Registered for segmentation, or an ``smp:`` encoder (checked when built)."""
    return name in SEGMENTATION_MODELS or name.startswith(SMP_PREFIX)


def _factory(name: str) -> tuple[ModelFactory, dict[str, Any]]:
    if name.startswith(SMP_PREFIX):
        return segnets.smp_deeplab(name.removeprefix(SMP_PREFIX)), {"task": "segmentation", "imagenet": True}
    return MODELS.get(name), MODELS.metadata(name)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    bn_momentum: float = 0.001,
    dropout: float = 0.0,
    weights: str = "none",
    weights_prefix: str = "",
    **extra: Any,
) -> nn.Module:
    """Build a registered model (or ``smp:<encoder>``); an unknown name raises ``UserError`` with the
    closest known name. ``weights``: ``none`` (random init), ``imagenet`` (the library's download, or one
    line saying why not) or a weights file (``weights.load_weights`` with ``weights_prefix``).

    ``extra`` goes to the factory as keywords: the segmentation models take ``output_stride``
    (classifiers take none).

    ``bn_momentum=0.001`` is FixMatch's, made for ~10^6 steps: BN running statistics need a few
    ``1/bn_momentum`` steps to settle, so short runs want ~0.01 (a 600-step digits run evaluated at
    58 % with 0.001 and 98 % with 0.01).
    """
    factory, metadata = _factory(name)
    if weights == "imagenet":
        imagenet = metadata.get("imagenet")
        if not imagenet:
            raise UserError(
                f"model.weights=imagenet: {name} has no ImageNet weights; use model.weights=none (random init) "
                "or a weights file"
            )
        if isinstance(imagenet, str):
            raise UserError(f"model.weights=imagenet: {name}: {imagenet}")
        extra["imagenet"] = True
    model = factory(num_classes=num_classes, in_channels=in_channels, bn_momentum=bn_momentum, dropout=dropout, **extra)
    if weights not in ("none", "imagenet"):
        load_weights(model, weights, weights_prefix)
    return model
