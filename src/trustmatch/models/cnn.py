"""A small CNN for CPU-sized experiments (16x16 grayscale digits), where a WRN step takes seconds.

Sized by measurement: one FixMatch step on 2 CPU cores is a forward+backward over ~960 images of
16x16 (64 labeled + 2 x 448 unlabeled views); this design costs ~30 ms of it and reaches 99 % on the
sklearn digits with all labels. A second 64-channel conv (~39 ms), 32-64-128 channels (~72 ms) or
two convs per stage at 32-64-128 (~200 ms) gave no accuracy gain on digits.
"""

from __future__ import annotations

import torch
from torch import nn

from trustmatch.models.output import Output, float32_head


def _conv_bn_relu(c_in: int, c_out: int, bn_momentum: float) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, momentum=bn_momentum), nn.ReLU()]


class SmallCNN(nn.Module):
    """conv16 - pool - conv32 - pool - conv64 - global mean pool - (dropout) - linear (24 k parameters).

    Activations are kept channels-last: on CPU, max-pooling and BatchNorm run ~1.5x faster that way
    (measured), and the conversion of an input already in that layout is free.
    """

    def __init__(self, num_classes: int, in_channels: int, bn_momentum: float = 0.001, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(in_channels, 16, bn_momentum),
            nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32, bn_momentum),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64, bn_momentum),
        )
        self.drop = nn.Dropout(dropout)
        self.num_features = 64
        self.head = nn.Linear(64, num_classes)
        self.to(memory_format=torch.channels_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x.contiguous(memory_format=torch.channels_last))
        return self.drop(out.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> Output:
        features = self.forward_features(x)
        return Output(float32_head(self.head, features), features)
