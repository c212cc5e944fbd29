"""Image sets: every dataset is decoded once into uint8 NCHW at the network's size.

Holding images as one uint8 NCHW tensor lets a batch be gathered by indexing and augmented on the
training device in one go (see ``views.py``), instead of per-image PIL work in worker processes.
A set larger than memory holds a :class:`~trustmatch.data.cache.MappedImages` instead: the same
indexing, read from the decoded-image cache on disk (``data.cache``, see ``cache.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trustmatch.config import DataConfig
from trustmatch.core.registry import Registry
from trustmatch.data.cache import MappedImages, as_mapped

Images = torch.Tensor | MappedImages  # uint8 [N, C, H, W]: in memory, or mapped from the disk cache


@dataclass
class ImageSet:
    """Images (uint8 [N, C, H, W]) with labels (int64 [N], -1 where unknown).

    ``images`` is a tensor in memory or a :class:`MappedImages` on the disk cache; both index alike
    (``images[index_tensor]`` is a uint8 tensor in memory) and report ``len`` and ``shape``.
    """

    images: Images
    labels: torch.Tensor
    paths: list[str] | None = None  # source files, for folder datasets

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The samples at ``index``: a copy in memory, a view (no pixel read) on the disk cache."""
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        images = self.images.subset(index) if isinstance(self.images, MappedImages) else self.images[index]
        return ImageSet(images, self.labels[index], paths)


def cat_images(first: Images, second: Images) -> Images:
    """``first`` then ``second``: ``torch.cat`` in memory, a view (no copy) when either is mapped."""
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return torch.cat([first, second])
    return as_mapped(first).cat(as_mapped(second))


@dataclass
class SourceData:
    """What a dataset loader returns, before the semi-supervised split.

    ``train`` is the labeled training pool the split draws labeled, validation and unlabeled
    samples from; ``extra_unlabeled`` holds images that never had labels (STL-10's unlabeled
    split, a user's folder of unlabeled images).
    """

    train: ImageSet
    test: ImageSet | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # horizontal flip is label-preserving (not for digits, SVHN, text)
    extra_unlabeled: ImageSet | None = None
    info: dict[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


DatasetLoader = Callable[[DataConfig], SourceData]
DATASETS: Registry[DatasetLoader] = Registry("dataset")
