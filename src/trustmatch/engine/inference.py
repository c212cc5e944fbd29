"""Batched inference shared by periodic evaluation, ``trustmatch evaluate`` and ``predict``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from trustmatch import distributed as dist


def autocast_for(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when asked; CPU runs stay in float32 (fast enough, exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    preprocess: Callable[[Tensor], Tensor],
    device: torch.device,
    batch_size: int = 512,
    amp: bool = False,
    channels_last: bool = False,
    shard: bool = False,
) -> Tensor:
    """Logits (float32, CPU) for uint8 images [N, C, H, W]; ``shard`` splits work over processes.

    ``preprocess`` maps a uint8 batch on the device to the network input (``Views.plain``).
    """
    model.eval()
    index = torch.arange(len(images))
    if shard:
        index = index[dist.rank() :: dist.world_size()]
    outputs = []
    for chunk in index.split(batch_size):
        x = preprocess(images[chunk].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            outputs.append(model(x).float().cpu())
    logits = torch.cat(outputs) if outputs else torch.empty(0)
    if shard and dist.is_distributed():
        order = dist.all_gather_cat(index.to(device)).cpu()
        gathered = dist.all_gather_cat(logits.to(device)).cpu()
        logits = torch.empty_like(gathered)
        logits[order] = gathered
    return logits
