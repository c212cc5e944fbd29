"""The deep-stem ResNet-50/101 of UniMatch's release (CSL's too): its ImageNet checkpoints load by key.

What makes it not torchvision's ResNet: the stem is three 3x3 convolutions (64, 64, 128 channels, the
first at stride 2; BN + ReLU between them, the third's BN is ``bn1``) instead of one 7x7, so layer1
starts from 128 channels; a bottleneck strides in its 3x3 convolution. Parameter and buffer names are
the release's (``conv1.0`` ... ``conv1.6``, ``bn1``, ``layer{1-4}.{i}.conv{1-3}``, ``bn{1-3}``,
``downsample.{0,1}``) so its ``resnet50.pth`` / ``resnet101.pth`` load with no missing key. There is no
``fc``: the release's backbone has none, and a checkpoint's ``fc.*`` is its ImageNet classifier.

Output stride 16 or 8 replaces the stride of layer4 (and layer3) by dilation as the release does: the
first block of a dilated stage keeps the previous dilation (its 3x3 at stride 1), the others take the
stage's (2 in layer4 at stride 16; 2 in layer3 and 4 in layer4 at stride 8).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DEPTHS", "DeepStemResNet"]

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4
STEM_WIDTH = 128
#: output stride -> which of layer2, layer3, layer4 trade their stride for dilation
DILATED = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 x4, each with BN, ReLU after the residual sum."""

    def __init__(self, c_in: int, width: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        c_out = width * EXPANSION
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class DeepStemResNet(nn.Module):
    """``forward`` returns the four stage outputs [c1 (stride 4, 256 ch), c2, c3, c4 (2048 ch)]."""

    def __init__(self, depth: int = 101, output_stride: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in DEPTHS or output_stride not in DILATED:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)} and output_stride one of {sorted(DILATED)}")
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, STEM_WIDTH, 3, 1, padding=1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self._channels, self._dilation = STEM_WIDTH, 1
        blocks = DEPTHS[depth]
        self.layer1 = self._stage(64, blocks[0], 1, dilate=False)
        self.layer2, self.layer3, self.layer4 = (
            self._stage(64 * 2**i, blocks[i], 2, dilate) for i, dilate in zip((1, 2, 3), DILATED[output_stride])
        )
        self.out_channels = (256, 512, 1024, 2048)
        for m in self.modules():  # the release's initialisation (what a run without weights starts from)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, width: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        c_out = width * EXPANSION
        downsample = None
        if stride != 1 or self._channels != c_out:
            downsample = nn.Sequential(nn.Conv2d(self._channels, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        layers = [Bottleneck(self._channels, width, stride, first_dilation, downsample)]
        layers += [Bottleneck(c_out, width, 1, self._dilation, None) for _ in range(1, blocks)]
        self._channels = c_out
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [c1, c2, c3, self.layer4(c3)]
