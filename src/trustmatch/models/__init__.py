"""Classifiers and segmentation networks by name. Every model maps images to logits and exposes the
features behind them.

Contract: ``forward(x)`` returns ``Output(logits, features)`` with ``logits == head(features)``,
``head`` an ``nn.Linear`` (run in float32) and ``features`` the globally pooled penultimate
features [N, D] that ``forward_features`` also returns, so feature-space methods (CalibrateMix
pairing) reuse the training pass itself. Any spatial size works.

``timm:<name>`` is any timm classifier (``timm_models``): timm's network up to its pooled pre-logits
features, then the project's float32 head; USB's small-image ViTs (``usb_vit``) are timm ViTs with USB's
sizes. Both take ``image_size`` (fixed-size networks are built at the data's side); :func:`input_config` says
what input a network's weights expect.

Segmentation networks (``segnets``, ``deeplab_deepstem``) return per-pixel logits [N, K, H, W] at the
input's size and take ``perturb`` (UniMatch's feature perturbation); see ``segnets`` for their contract.
``smp:<encoder>`` names DeepLabV3+ on any segmentation-models-pytorch encoder (``segnets.smp_deeplab``).

Initial weights (``model.weights``) are ``build_model``'s. ``imagenet``: timm classifiers fetch through timm
(USB's ViTs refuse, naming their release file); other factories registered with ``imagenet=True`` fetch
through their library; one registered with ``imagenet="<text>"`` has ImageNet weights only as a file and
refuses with that text. A path, for every model, is loaded by ``weights.load_weights``; a classifier's head of
another size there starts fresh (fine-tuning on new classes), a segmentation decoder's is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from trustmatch.core.errors import UserError
from trustmatch.core.registry import Registry
from trustmatch.models import cnn, deeplab_deepstem, segnets, timm_models, usb_vit, wideresnet
from trustmatch.models.output import Output
from trustmatch.models.timm_models import InputConfig
from trustmatch.models.weights import load_weights

__all__ = [
    "MODELS",
    "SEGMENTATION_MODELS",
    "InputConfig",
    "Output",
    "build_model",
    "check_weights",
    "input_config",
    "is_classifier",
    "is_segmentation_model",
    "load_weights",
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
    if name.startswith(timm_models.PREFIX):
        return partial(timm_models.create, name.removeprefix(timm_models.PREFIX)), {
            "task": "classification",
            "timm": True,
        }
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
    """Build a registered model (or ``timm:<name>``, ``smp:<encoder>``); an unknown name raises ``UserError``
    with the closest known name. ``weights``: ``none`` (random init), ``imagenet`` (the library's download, or
    one line saying why not) or a weights file (``weights.load_weights`` with ``weights_prefix``; a classifier's
    head of another size there starts fresh).

    ``extra`` goes to the factory as keywords: the segmentation models take ``output_stride``; ``timm:<name>``
    and USB's ViTs (:func:`takes_input`) take ``image_size``; the other classifiers take none.

    ``bn_momentum=0.001`` is FixMatch's, made for ~10^6 steps: BN running statistics need a few
    ``1/bn_momentum`` steps to settle, so short runs want ~0.01 (a 600-step digits run evaluated at
    58 % with 0.001 and 98 % with 0.01).
    """
    factory, metadata = _factory(name)
    if metadata.get("timm"):  # timm's own pretrained mechanism (USB's ViTs refuse, naming their release file)
        extra["weights"] = "imagenet" if weights == "imagenet" else "none"
    elif weights == "imagenet":
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
        load_weights(model, weights, weights_prefix, fresh_head=metadata.get("task") == "classification")
    return model


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
