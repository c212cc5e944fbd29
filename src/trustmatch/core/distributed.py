"""Thin helpers over ``torch.distributed`` that are identities in a single process.

Launched by ``torchrun``, every process trains on its share of each batch (``train.batch_size`` is
the global batch: ``batch_share``); selector statistics and per-sample state must then be computed
from all processes' data, which these helpers provide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as td
from torch import Tensor

from trustmatch.core.errors import UserError


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
    if device.type == "cuda":  # NCCL binds each process to the current device: set it first
        torch.cuda.set_device(device)
    td.init_process_group("nccl" if device.type == "cuda" else "gloo")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def batch_share(batch_size: int, minimum: int = 1, why: str = "") -> int:
    """This process's share of the global batch ``train.batch_size`` (all of it in one process).

    Every process must take the same number of images, at least ``minimum`` (``why`` says who needs
    it); anything else is refused with one line naming the value, the process count and the fix.
    Cheap and collective-free: the trainer may call it right after joining the process group.
    """
    world = world_size()
    share, rest = divmod(batch_size, world)
    error = None
    if rest:
        lower, upper = batch_size - rest, max(batch_size - rest + world, minimum * world)
        fix = f"{upper}" if lower < minimum * world else f"{lower} or {upper}"
        error = UserError(
            f"train.batch_size={batch_size} is the global batch and {world} processes cannot share it equally: "
            f"use a multiple of {world} (train.batch_size={fix}), or a number of processes that divides {batch_size}"
        )
    elif share < minimum:
        error = UserError(
            f"train.batch_size={batch_size} over {world} processes gives each {share} labeled image(s), "
            f"fewer than the {minimum} {why or 'needed'}: use train.batch_size={minimum * world} or more, "
            "or fewer processes"
        )
    if error is not None:
        error.everywhere = True  # every process computes the same verdict: printed once
        raise error
    return share


def all_reduce_mean_var(x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, unbiased variance and count of the ``valid`` elements of ``x`` over all processes, in float32.

    Each process contributes (count, mean, sum of squared deviations); they are pooled with Chan's
    formula, which stays exact in float32 (MPS has no float64) where sum-of-squares would cancel.
    A mask (not boolean indexing) keeps the device from waiting on the host.
    """
    x = x.detach().float().flatten()
    w = torch.ones_like(x) if valid is None else valid.flatten().float()
    if valid is not None:  # where, not a product: an ignored element may hold NaN or inf
        x = torch.where(valid.flatten(), x, 0.0)
    n = w.sum()
    mean = x.sum() / n.clamp_min(1.0)
    m2 = ((x - mean).square() * w).sum()
    if is_distributed():
        parts = [torch.empty(3, device=x.device) for _ in range(world_size())]
        td.all_gather(parts, torch.stack([n, mean, m2]))
        n, mean, m2 = parts[0].unbind()
        for part in parts[1:]:
            n_b, mean_b, m2_b = part.unbind()
            total = (n + n_b).clamp_min(1.0)
            delta = mean_b - mean
            mean = mean + delta * n_b / total
            m2 = m2 + m2_b + delta.square() * n * n_b / total
            n = n + n_b
    return mean, (m2 / (n - 1).clamp_min(1.0)).clamp_min(0.0), n


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


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every process rank 0's parameters and buffers (so EMA copies and resumes agree)."""
    if is_distributed():
        for tensor in [*module.parameters(), *module.buffers()]:
            td.broadcast(tensor.data, src=0)


def all_reduce_sum_(*tensors: Tensor) -> None:
    """Sum each tensor over processes, in place (evaluation counts and bin sums)."""
    if is_distributed():
        for t in tensors:
            td.all_reduce(t)


def on_main(operation: Callable[[], Any]) -> None:
    """Run ``operation`` (a file write, a run-directory check) on the main process only; a
    ``UserError`` there is raised on every process, so none waits in a collective the main
    process never reaches (a collective under torchrun: every process calls it)."""
    if not is_distributed():
        operation()
        return
    failure: UserError | None = None
    if is_main():
        try:
            operation()
        except UserError as e:
            failure = e
    shared = [None if failure is None else str(failure)]
    td.broadcast_object_list(shared, src=0)
    td.barrier()  # a process may exit right after: none leaves while another still sends to it
    if shared[0] is not None:
        error = failure or UserError(shared[0])
        error.everywhere = True
        raise error


def all_reduce_max_(t: Tensor) -> None:
    """The element-wise maximum over processes, in place (flags every process must agree on)."""
    if is_distributed():
        td.all_reduce(t, op=td.ReduceOp.MAX)


def shutdown() -> None:
    """Every process leaves together and closes the process group: a process that exits while
    another still talks to it can abort in gloo's threads ("terminate called without an active
    exception"). Only on paths every process reaches."""
    if is_distributed():
        td.barrier()
        td.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        td.barrier()
