"""Resumable batch index streams: the data order is a pure function of (seed, position).

The stream is an endless concatenation of seeded permutations, so a batch may span two epochs
(needed when a labeled set of 40 feeds batches of 64). Its whole state is one integer, which the
checkpoint stores. ``batch_size`` is the global batch: in multi-process training every process
draws the same global batch and keeps its own contiguous slice of ``batch_size / world_size``
indices, so the run sees the same indices, step by step, whatever the number of processes.
"""

from __future__ import annotations

import torch

from trustmatch.core import distributed as dist


class IndexStream:
    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        """``batch_size``: the global batch, all processes together (see ``distributed.batch_share``)."""
        if size < 1:
            raise ValueError("cannot sample batches from an empty set")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.position = 0  # number of indices consumed so far (global, all processes)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return self._perm

    def next(self) -> torch.Tensor:
        """This process's share of the next global batch (the whole batch in one process)."""
        world, rank, total = dist.world_size(), dist.rank(), self.batch_size
        if total % world:
            raise ValueError(f"a global batch of {total} cannot be split over {world} processes")
        share = total // world
        out = torch.empty(total, dtype=torch.long)
        filled = 0
        while filled < total:
            epoch, offset = divmod(self.position, self.size)
            take = min(total - filled, self.size - offset)
            out[filled : filled + take] = self._permutation(epoch)[offset : offset + take]
            filled += take
            self.position += take
        return out[rank * share : (rank + 1) * share]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
