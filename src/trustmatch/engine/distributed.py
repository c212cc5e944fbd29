"""Thin helpers over ``torch.distributed`` that are identities in a single process.

Launched by ``torchrun``, every process trains on its share of each batch; selector statistics and
per-sample state must then be computed from all processes' data, which these helpers provide.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as td
from torch import Tensor


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (no-op without torchrun)."""
    if "RANK" not in os.environ or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    td.init_process_group(backend)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def all_reduce_mean(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Average each tensor over processes (one collective for all of them)."""
    if not is_distributed():
        return tensors
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    td.all_reduce(flat)
    flat /= world_size()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return tuple(out)


def all_reduce_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of ``x`` pooled over all processes."""
    x = x.detach().double()
    stats = torch.stack([x.new_tensor(x.numel()), x.sum(), x.square().sum()])
    if is_distributed():
        td.all_reduce(stats)
    n, s, sq = stats
    mean = s / n
    var = (sq - n * mean.square()) / (n - 1).clamp_min(1)
    return mean.float(), var.clamp_min(0).float()


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate a variable-length tensor from all processes (dim 0)."""
    if not is_distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    td.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    gathered = [torch.empty_like(padded) for _ in sizes]
    td.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, indexed by rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        td.barrier()
