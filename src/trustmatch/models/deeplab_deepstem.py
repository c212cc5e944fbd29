"""DeepLabV3+ as UniMatch's release builds it: its deep-stem ResNet and its own decoder.

The decoder is the release's, not smp's: ASPP of a 1x1 branch, three dilated 3x3 branches and an
image-pool branch (each conv + BN + ReLU, 2048 -> 256 channels), projected by 1x1; the stride-4 map
reduced to 48 channels by 1x1; both fused by two plain 3x3 convolutions (304 -> 256 -> 256) and a 1x1
classifier with a bias. ASPP rates 6/12/18 at output stride 16, 12/24/36 at 8, as the releases.
The ASPP output is upsampled to the stride-4 map's size, whatever the input size, so no padding is
needed (smp's decoder upsamples by a fixed factor). Same contract as ``segnets``: ``forward(x,
perturb=False)`` -> ``Output(logits, features)``, ``encoder`` and ``head`` attributes; the decoder's
submodules keep the release's names (``b0`` ... ``b4``, ``project``, ``reduce``, ``fuse``,
``classifier``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.models.deepstem_resnet import DeepStemResNet
from trustmatch.models.output import Output
from trustmatch.models.segnets import ASPP_RATES, _classify, _perturb, _set_bn_momentum

__all__ = ["DeepLabV3PlusDeepStem", "deeplabv3plus_r50_deepstem", "deeplabv3plus_r101_deepstem"]

ASPP_CHANNELS = 256  # 2048 // 8
SKIP_CHANNELS = 48


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class _ImagePool(nn.Module):
    """ASPP's image-level branch: global mean, 1x1 conv + BN + ReLU, spread back over the map."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(c_in, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return _upsample(self.gap(x), x.shape[-2:])


class ASPP(nn.Module):
    def __init__(self, c_in: int, c_out: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.b0 = _conv_bn_relu(c_in, c_out)
        self.b1, self.b2, self.b3 = (_conv_bn_relu(c_in, c_out, 3, rate) for rate in rates)
        self.b4 = _ImagePool(c_in, c_out)
        self.project = _conv_bn_relu(5 * c_out, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in (self.b0, self.b1, self.b2, self.b3, self.b4)], dim=1))


class DeepLabHead(nn.Module):
    """Everything after the encoder: ASPP on c4, fused with the reduced c1, classified in float32."""

    def __init__(self, num_classes: int, rates: tuple[int, int, int], dropout: float, low: int, high: int) -> None:
        super().__init__()
        self.aspp = ASPP(high, ASPP_CHANNELS, rates)
        self.reduce = _conv_bn_relu(low, SKIP_CHANNELS)
        self.fuse = nn.Sequential(*_conv_bn_relu(ASPP_CHANNELS + SKIP_CHANNELS, 256, 3), *_conv_bn_relu(256, 256, 3))
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, c1: Tensor, c4: Tensor, size: tuple[int, int]) -> Tensor:
        context = _upsample(self.aspp(c4), c1.shape[-2:])
        fused = self.fuse(torch.cat([self.reduce(c1), context], dim=1))
        return _classify(self.classifier, self.drop(fused), size)


class DeepLabV3PlusDeepStem(nn.Module):
    """UniMatch's DeepLabV3+; ``perturb`` drops channels of c1 and c4, the two maps the decoder reads."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        bn_momentum: float = 0.1,
        dropout: float = 0.0,
        output_stride: int = 16,
    ) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        self.encoder = DeepStemResNet(depth, output_stride, in_channels)
        low, high = self.encoder.out_channels[0], self.encoder.out_channels[-1]
        self.head = DeepLabHead(num_classes, ASPP_RATES[output_stride], dropout, low, high)
        self.perturbation = nn.Dropout2d(0.5)
        _set_bn_momentum(self, bn_momentum)

    def forward(self, x: Tensor, perturb: bool = False) -> Output:
        c1, _, _, c4 = self.encoder(x)
        pooled = c4.mean(dim=(2, 3))
        if perturb:
            c1, c4 = _perturb(c1, self.perturbation), _perturb(c4, self.perturbation)
        return Output(self.head(c1, c4, x.shape[-2:]), pooled)


def _factory(depth: int) -> Callable[..., DeepLabV3PlusDeepStem]:
    def factory(
        num_classes: int,
        in_channels: int = 3,
        bn_momentum: float = 0.1,
        dropout: float = 0.0,
        output_stride: int = 16,
    ) -> DeepLabV3PlusDeepStem:
        return DeepLabV3PlusDeepStem(depth, num_classes, in_channels, bn_momentum, dropout, output_stride)

    factory.__doc__ = f"UniMatch's DeepLabV3+ on its deep-stem ResNet-{depth}."
    return factory


deeplabv3plus_r50_deepstem = _factory(50)
deeplabv3plus_r101_deepstem = _factory(101)
