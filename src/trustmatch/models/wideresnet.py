"""Wide ResNets as used by FixMatch and USB, so results compare with the published tables.

Checked against FixMatch's reference code (google-research/fixmatch ``libml/models.py``, class
``ResNet``) and USB (microsoft/Semi-supervised-learning ``semilearn/nets/wrn/wrn.py``, ``wrn_var.py``):

* pre-activation basic blocks (BN, LeakyReLU(0.1), conv3x3, BN, LeakyReLU, conv3x3) with a 1x1
  convolution on the shortcut where the width or stride changes; convolutions have a bias (TF's
  default, and USB's);
* BatchNorm momentum 0.001 in PyTorch's convention (TF ``momentum=0.999``) and eps 0.001 (TF's
  default, and USB's);
* a 16-channel 3x3 stem, then groups of widths 16w, 32w, 64w (, 128w); the first group has stride 1
  and ``activate_before_residual``: its first block's shortcut also sees the pre-activated input.
  FixMatch does this in the first group only; USB's block (which ignores the flag) does it in the
  first block of every group. We follow FixMatch; parameter counts are identical;
* init: convolutions kaiming-normal fan_out (leaky_relu gain with slope 0, i.e. sqrt(2): FixMatch's
  ``stddev=rsqrt(0.5*k*k*f)``), BN weight 1 bias 0, linear xavier-normal with bias 0;
* ``dropout`` sits between a block's two convolutions (WRN paper, USB); both default to off.

WRN-37-2 (STL-10) is USB's ``wrn_var_37_2``: ``WideResNetVar(first_stride=2, depth=28,
widen_factor=2)``, i.e. the same stem and 4 blocks per group as WRN-28, plus a fourth group of
128w channels (widths 32, 64, 128, 256) and a first group of stride 2, so 96 px inputs end at 6 px.
The name counts conv layers: 4 groups x 4 blocks x 2 + stem + 4 shortcuts = 37 (WRN-28: 24 + 1 + 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trustmatch.models.output import Output, float32_head

SLOPE = 0.1
BN_EPS = 1e-3


class _Block(nn.Module):
    """Pre-activation basic block."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, activate_before_residual: bool, bn_momentum: float, dropout: float
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, eps=BN_EPS, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=bn_momentum)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride) if c_in != c_out or stride != 1 else nn.Identity()
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(x), SLOPE)
        if self.activate_before_residual:
            x = out
        out = self.conv1(out)
        out = self.conv2(self.drop(F.leaky_relu(self.bn2(out), SLOPE)))
        return self.shortcut(x) + out


class WideResNet(nn.Module):
    """Stem, groups of pre-activation blocks (stride 2 after the first), BN-LReLU, global mean pool."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: tuple[int, ...],
        blocks_per_group: int,
        first_stride: int = 1,
        bn_momentum: float = 0.001,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, padding=1)
        blocks: list[nn.Module] = []
        c_in = 16
        for g, width in enumerate(widths):
            for b in range(blocks_per_group):
                stride = (first_stride if g == 0 else 2) if b == 0 else 1
                blocks.append(_Block(c_in, width, stride, g == 0 and b == 0, bn_momentum, dropout))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in, eps=BN_EPS, momentum=bn_momentum)
        self.num_features = c_in
        self.head = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn(self.blocks(self.stem(x))), SLOPE)
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> Output:
        features = self.forward_features(x)
        return Output(float32_head(self.head, features), features)


def wrn_28(widen: int, num_classes: int, in_channels: int, bn_momentum: float, dropout: float) -> WideResNet:
    return WideResNet(num_classes, in_channels, (16 * widen, 32 * widen, 64 * widen), 4, 1, bn_momentum, dropout)


def wrn_28_2(num_classes: int, in_channels: int, bn_momentum: float = 0.001, dropout: float = 0.0) -> WideResNet:
    return wrn_28(2, num_classes, in_channels, bn_momentum, dropout)


def wrn_28_8(num_classes: int, in_channels: int, bn_momentum: float = 0.001, dropout: float = 0.0) -> WideResNet:
    return wrn_28(8, num_classes, in_channels, bn_momentum, dropout)


def wrn_37_2(num_classes: int, in_channels: int, bn_momentum: float = 0.001, dropout: float = 0.0) -> WideResNet:
    return WideResNet(num_classes, in_channels, (32, 64, 128, 256), 4, 2, bn_momentum, dropout)
