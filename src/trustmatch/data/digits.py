"""Embedded default data: scikit-learn's 1,797 real handwritten digits (8x8, 16 gray levels).

It ships with scikit-learn, so every example and test runs offline; upscaled to 16 px by default
so the strong augmentations (rotations, shears, cutout) have pixels to act on.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from trustmatch.config import DataConfig
from trustmatch.data.image_sets import DATASETS, ImageSet, SourceData

DIGITS_DEFAULT_SIZE = 16


@DATASETS.register("digits")
def load_digits(cfg: DataConfig) -> SourceData:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).float().mul(255.0 / 16.0).round().to(torch.uint8)
    images = images.unsqueeze(1)  # [N, 1, 8, 8]
    size = cfg.image_size or DIGITS_DEFAULT_SIZE
    if size != images.shape[-1]:
        images = TF.resize(images, [size, size], antialias=True)
    labels = torch.from_numpy(bunch.target).long()
    pixels = images.float() / 255.0
    return SourceData(
        train=ImageSet(images, labels),
        test=None,  # carved out by the split with a fixed seed, so every run sees the same test set
        classes=[str(d) for d in range(10)],
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
        hflip=False,
        info={"source": "sklearn.datasets.load_digits"},
    )
