"""Batched inference shared by periodic evaluation, ``trustmatch evaluate`` and ``predict``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from trustmatch import distributed as dist
from trustmatch.engine.precision import Precision


@torch.no_grad()
def iter_logits(
    model: nn.Module,
    images: Tensor,
    preprocess: Callable[[Tensor], Tensor],
    precision: Precision,
    batch_size: int = 512,
    shard: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(indices, float32 logits on the device) batch by batch, for uint8 images [N, C, H, W].

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
    images: Tensor,
    preprocess: Callable[[Tensor], Tensor],
    precision: Precision,
    batch_size: int = 512,
) -> Tensor:
    """All logits (float32, CPU) of a set a user asked predictions for, in order."""
    outputs = [logits.cpu() for _, logits in iter_logits(model, images, preprocess, precision, batch_size)]
    return torch.cat(outputs) if outputs else torch.empty(0)
