"""Segmentation networks: DeepLabV3+ through segmentation-models-pytorch (ResNet-50/101, or any smp encoder as
``smp:<encoder>``) and a small CPU net. UniMatch's own DeepLabV3+ is ``deeplab_deepstem``.

Contract (UniMatch's feature perturbation in one decoder pass): ``forward(x, perturb=False)`` returns
``Output(logits, features)`` with float32 logits [N, K, H, W] at the input's size; ``perturb=True``
gives [2N, K, H, W], the clean images first, then the same images decoded from encoder features passed
through ``nn.Dropout2d(0.5)``. The encoder runs once either way. ``features`` [N, D] are the globally
pooled high-level encoder features of the clean images. ``encoder`` and ``head`` (everything after the
encoder) are attributes, so ``train.head_lr_scale`` gives the decoder its own learning rate.
``dropout`` (``model.dropout``) is a Dropout2d before the final 1x1 classifier (0: none).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.core.errors import UserError
from trustmatch.models.output import Output

if TYPE_CHECKING:
    import segmentation_models_pytorch as smp

__all__ = ["DeepLabV3Plus", "SegNetSmall", "deeplabv3plus_r50", "deeplabv3plus_r101", "segnet_small", "smp_deeplab"]


def _perturb(features: Tensor, dropout: nn.Module) -> Tensor:
    """Clean and channel-dropped copies along the batch: one decoder pass serves both."""
    return torch.cat([features, dropout(features)])


def _classify(classifier: nn.Module, x: Tensor, size: tuple[int, int]) -> Tensor:
    """Classifier conv and upsampling in float32 even under bf16 autocast, as ``output.float32_head``:
    calibration is measured on these logits. Bilinear with ``align_corners=True``, as smp and UniMatch."""
    with torch.autocast(x.device.type, enabled=False):
        logits = classifier(x.float())
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


class _DeepLabHead(nn.Module):
    """smp's DeepLabV3+ decoder and the 1x1 classifier of its segmentation head (the upsampling is ours)."""

    # smp 0.6 DeepLabV3PlusDecoder.forward reads features[-1] (ASPP input) and features[2] (stride-4 skip)
    READS = (2, -1)

    def __init__(self, decoder: nn.Module, classifier: nn.Conv2d, dropout: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.drop = nn.Dropout2d(dropout)
        self.classifier = classifier

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        return _classify(self.classifier, self.drop(self.decoder(features)), size)


class DeepLabV3Plus(nn.Module):
    """smp's DeepLabV3+ split into ``encoder`` and ``head`` so features can be perturbed between them.

    Inputs whose sides are not multiples of the output stride are zero-padded (bottom, right) to one,
    since smp's decoder upsamples the ASPP output by a fixed factor to meet the stride-4 skip; the
    logits are cropped back to the input size.
    """

    def __init__(
        self,
        encoder_name: str,
        num_classes: int,
        in_channels: int,
        bn_momentum: float,
        dropout: float,
        imagenet: bool,
        output_stride: int,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        net = _build_smp(encoder_name, num_classes, in_channels, imagenet, output_stride)
        self.encoder = net.encoder
        self.head = _DeepLabHead(net.decoder, net.segmentation_head[0], dropout)
        self.perturbation = nn.Dropout2d(0.5)
        self.output_stride = output_stride
        _set_bn_momentum(self, bn_momentum)

    def forward(self, x: Tensor, perturb: bool = False) -> Output:
        h, w = x.shape[-2:]
        s = self.output_stride
        padded = (-(-h // s) * s, -(-w // s) * s)
        if padded != (h, w):
            x = F.pad(x, (0, padded[1] - w, 0, padded[0] - h))
        features = self.encoder(x)
        pooled = features[-1].mean(dim=(2, 3))
        if perturb:
            reads = {i % len(features) for i in _DeepLabHead.READS}
            features = [_perturb(f, self.perturbation) if i in reads else f for i, f in enumerate(features)]
        logits = self.head(features, padded)
        return Output(logits[..., :h, :w], pooled)


ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _build_smp(
    encoder_name: str, num_classes: int, in_channels: int, imagenet: bool, output_stride: int
) -> smp.DeepLabV3Plus:
    """smp's model, with its ImageNet encoder weights (through huggingface_hub's cache) when asked: a
    failure to get them is one line naming the cache, never a silent random init.

    smp is imported here: its import (timm) costs ~1 s that runs not needing a DeepLabV3+ should not pay.
    """
    import segmentation_models_pytorch as smp

    from trustmatch.models.weights import hub_failure

    weights = _imagenet_tag(encoder_name) if imagenet else None
    try:
        return smp.DeepLabV3Plus(
            encoder_name=encoder_name,
            encoder_weights=weights,
            encoder_output_stride=output_stride,
            in_channels=in_channels,
            classes=num_classes,
            # UniMatch's ASPP: rates 6/12/18 at stride 16 (12/24/36 at 8), plain 3x3 convs and no dropout
            # (smp's defaults are separable convs and Dropout(0.5), which would also perturb the clean
            # and weak passes that pseudo-labels are read from)
            decoder_atrous_rates=ASPP_RATES[output_stride],
            decoder_aspp_separable=False,
            decoder_aspp_dropout=0.0,
        )
    except ValueError as e:
        if "dilat" in str(e):  # an encoder that cannot trade stride for dilation (smp: VGG, MobileOne ...)
            raise UserError(
                f"smp encoder {encoder_name!r} cannot run at output stride {output_stride} (smp: {e}): choose "
                "another encoder"
            ) from None
        if weights is None:
            raise
        raise hub_failure(f"smp encoder {encoder_name!r}", e) from None
    except Exception as e:  # fetching or reading the weights: the hub's OSErrors, a damaged cached file
        if weights is None:
            raise
        raise hub_failure(f"smp encoder {encoder_name!r}", e) from None


def _imagenet_tag(encoder_name: str) -> str | bool:
    """smp's name for an encoder's ImageNet weights: ``imagenet``, or True for timm's (``tu-``) encoders,
    whose pretrained tag is part of the name; one line for an encoder smp has no ImageNet weights for."""
    if encoder_name.startswith("tu-"):
        return True
    from segmentation_models_pytorch.encoders import encoders

    available = list(encoders[encoder_name]["pretrained_settings"])
    if "imagenet" not in available:
        raise UserError(
            f"model.weights=imagenet: smp has no ImageNet weights for encoder {encoder_name!r} (its weights: "
            f"{', '.join(available) or 'none'}): pass a weights file, or model.weights=none"
        )
    return "imagenet"


def _deeplab(encoder: str) -> Callable[..., DeepLabV3Plus]:
    """The registered factory of a DeepLabV3+ on ``encoder`` (the classifiers' keywords, plus the weights
    and output stride)."""

    def factory(
        num_classes: int,
        in_channels: int = 3,
        bn_momentum: float = 0.1,
        dropout: float = 0.0,
        imagenet: bool = False,
        output_stride: int = 16,
    ) -> DeepLabV3Plus:
        return DeepLabV3Plus(encoder, num_classes, in_channels, bn_momentum, dropout, imagenet, output_stride)

    return factory


deeplabv3plus_r50 = _deeplab("resnet50")
deeplabv3plus_r101 = _deeplab("resnet101")


def smp_deeplab(encoder: str) -> Callable[..., DeepLabV3Plus]:
    """``model.name=smp:<encoder>``: DeepLabV3+ on any encoder smp knows (its own names, or ``tu-<timm
    model>``); an unknown name is one line with the closest ones."""
    from segmentation_models_pytorch.encoders import get_encoder_names

    known = get_encoder_names()
    if encoder.startswith("tu-"):
        import timm

        found = timm.is_model(encoder.removeprefix("tu-").split(".")[0])
        close = difflib.get_close_matches(encoder.removeprefix("tu-"), timm.list_models(), n=3)
        close = [f"tu-{c}" for c in close]
    else:
        found = encoder in known
        close = difflib.get_close_matches(encoder, known, n=3)
    if not found:
        hint = f"; did you mean {', '.join('smp:' + c for c in close)}?" if close else ""
        raise UserError(
            f"model.name=smp:{encoder}: segmentation-models-pytorch has no encoder {encoder!r}{hint} (its encoders: "
            "smp.encoders.get_encoder_names(), or tu-<any timm model>)"
        )
    return _deeplab(encoder)


# SegNetSmall's stage widths. 32-64-128 (0.67 M parameters) reached val mIoU 0.18 on (a draft of) digitscenes with
# 500 labeled scenes in 2,000 supervised steps where 48-96-192 reached 0.25 (same scenes and config);
# 64-128-256 learned no faster in that budget and costs ~1.8x the compute.
SMALL_WIDTHS = (48, 96, 192)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class _Context(nn.Module):
    """A light ASPP: 1x1, two dilated 3x3 and an image-pool branch, concatenated and projected."""

    def __init__(self, c_in: int, c_out: int, rates: tuple[int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(c_in, c_out, kernel=1), *(_conv_bn_relu(c_in, c_out, dilation=r) for r in rates)]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1, bias=False), nn.ReLU())
        self.project = _conv_bn_relu(4 * c_out, c_out, kernel=1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))


class _SmallHead(nn.Module):
    """DeepLabV3+-style: context at stride 8, upsampled to the stride-4 skip, fused, classified."""

    def __init__(self, num_classes: int, dropout: float, widths: tuple[int, int, int]) -> None:
        super().__init__()
        _, mid, high = widths
        self.context = _Context(high, mid, rates=(2, 4))
        self.skip = _conv_bn_relu(mid, mid // 2, kernel=1)
        self.fuse = _conv_bn_relu(mid + mid // 2, mid)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor, size: tuple[int, int]) -> Tensor:
        context = F.interpolate(self.context(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        fused = self.fuse(torch.cat([context, self.skip(low)], dim=1))
        return _classify(self.classifier, self.drop(fused), size)


class _SmallEncoder(nn.Module):
    """Stride 2-4-8 conv stages at ``widths`` channels (a third conv where the maps are smallest);
    returns the stride-4 and stride-8 maps."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, c1, stride=2), _conv_bn_relu(c1, c1))
        self.stage2 = nn.Sequential(_conv_bn_relu(c1, c2, stride=2), _conv_bn_relu(c2, c2))
        self.stage3 = nn.Sequential(_conv_bn_relu(c2, c3, stride=2), _conv_bn_relu(c3, c3), _conv_bn_relu(c3, c3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.stage2(self.stage1(x))
        return low, self.stage3(low)


class SegNetSmall(nn.Module):
    """A 1.5 M-parameter DeepLabV3+-like net (``SMALL_WIDTHS`` = 48-96-192 channels) for 64x64 scenes on a
    few CPU cores (see the module docstring for the contract). Activations are channels-last, as in
    ``cnn.SmallCNN``: faster BatchNorm on CPU."""

    def __init__(self, num_classes: int, in_channels: int = 3, bn_momentum: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = _SmallEncoder(in_channels, SMALL_WIDTHS)
        self.head = _SmallHead(num_classes, dropout, SMALL_WIDTHS)
        self.perturbation = nn.Dropout2d(0.5)
        _set_bn_momentum(self, bn_momentum)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, perturb: bool = False) -> Output:
        low, high = self.encoder(x.contiguous(memory_format=torch.channels_last))
        pooled = high.mean(dim=(2, 3))
        if perturb:
            low, high = _perturb(low, self.perturbation), _perturb(high, self.perturbation)
        return Output(self.head(low, high, x.shape[-2:]), pooled)


def segnet_small(
    num_classes: int, in_channels: int = 3, bn_momentum: float = 0.1, dropout: float = 0.0, output_stride: int = 8
) -> SegNetSmall:
    """The segmentation factories' signature; a fixed output stride of 8 (``output_stride`` is a DeepLabV3+
    setting). No ImageNet weights: ``build_model`` refuses ``imagenet`` for it."""
    return SegNetSmall(num_classes, in_channels, bn_momentum, dropout)
