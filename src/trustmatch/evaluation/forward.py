"""Batched inference shared by periodic evaluation, ``trustmatch evaluate`` and ``predict``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from trustmatch.core import distributed as dist
from trustmatch.core.precision import Precision


class ImageRows(Protocol):
    """uint8 images [N, C, H, W] indexed by rows: a tensor, or the disk cache's ``MappedImages``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> Tensor: ...


@torch.no_grad()
def iter_logits(
    model: nn.Module,
    images: ImageRows,
    preprocess: Callable[[Tensor], Tensor],
    precision: Precision,
    batch_size: int = 512,
    shard: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(indices, float32 logits on the device) batch by batch, for uint8 images [N, C, H, W]
    (in memory, or mapped from the disk cache: each batch's rows are read when it is evaluated).

    ``preprocess`` maps a uint8 batch on the device to the network input (``Views.plain``);
    ``shard`` gives each process every world_size-th image. Nothing is kept between batches, so
    evaluation memory does not grow with the data set.
    """
    model.eval()
    index = torch.arange(len(images))
    if shard:
        index = index[dist.rank() :: dist.world_size()]
    for chunk in index.split(batch_size):
        x = precision.layout(preprocess(images[chunk].to(precision.device, non_blocking=True)))
        with precision.autocast():
            yield chunk, model(x).logits.float()


def predict_logits(
    model: nn.Module,
    images: ImageRows,
    preprocess: Callable[[Tensor], Tensor],
    precision: Precision,
    batch_size: int = 512,
) -> Tensor:
    """All logits (float32, CPU) of a set a user asked predictions for, in order."""
    outputs = [logits.cpu() for _, logits in iter_logits(model, images, preprocess, precision, batch_size)]
    return torch.cat(outputs) if outputs else torch.empty(0)


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Offsets of windows of side ``crop`` every ``stride`` pixels, the last one flush with the border."""
    if size <= crop:
        return [0]
    return [*range(0, size - crop, stride), size - crop]


@torch.no_grad()
def segment(
    model: nn.Module, image: Tensor, precision: Precision, crop: int | None = None, stride_frac: float = 2 / 3
) -> Tensor:
    """Float32 logits [B, K, H, W] of normalised images [B, 3, H, W] (on the device) at their own size.

    The whole image in one forward when ``crop`` is None or the image fits in it; otherwise windows of
    ``crop`` x ``crop`` every ``ceil(crop * stride_frac)`` pixels (the last flush with the border): the
    model then sees inputs of its training size, and activation memory stays that of one crop. Where
    windows overlap their softmax probabilities are averaged, as UniMatch does (not their logits: the
    pixel confidence is what calibration measures), and the log of the average is returned, so a
    softmax of the result gives those probabilities.
    """
    model.eval()
    height, width = image.shape[-2:]
    if crop is None or (height <= crop and width <= crop):
        with precision.autocast():
            return model(precision.layout(image)).logits.float()
    if crop < 1 or not 0 < stride_frac <= 1:
        raise ValueError(f"need crop >= 1 and 0 < stride_frac <= 1, got crop={crop!r}, stride_frac={stride_frac!r}")
    stride = math.ceil(crop * stride_frac)
    total: Tensor | None = None
    counts = torch.zeros(height, width, device=image.device)
    for top in _window_starts(height, crop, stride):
        for left in _window_starts(width, crop, stride):
            rows, cols = slice(top, top + crop), slice(left, left + crop)
            with precision.autocast():
                logits = model(precision.layout(image[..., rows, cols])).logits.float()
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], height, width)
            total[..., rows, cols] += logits.softmax(dim=1)
            counts[rows, cols] += 1
    assert total is not None  # at least one window: the image is larger than the crop
    return (total / counts).clamp_min(torch.finfo(torch.float32).tiny).log()
