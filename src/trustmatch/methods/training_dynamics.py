"""Training dynamics per sample: AUM for labeled samples, APM for unlabeled ones.

Both trackers are ``nn.Module`` s whose state is buffers indexed by dataset index, so they travel with
``state_dict`` (checkpoints) and ``.to(device)``. Under torchrun every process gathers every process's
indices and values before it updates, so all processes hold the same state (and rank 0's is saved).

Memory per sample: AUM 8 bytes (float32 margin sum + int32 count). APM ``4 K + 4`` bytes in float32
(K class margins + int32 visit count), ``2 K + 4`` in float16. An ImageNet-size unlabeled set (1.28 M
images x 1,000 classes) takes 5.1 GB in float32 and 2.6 GB in float16 per process; its APM is the
only state that grows with N x K.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trustmatch.core import distributed as dist

APM_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def aum_margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Pleiss et al.'s margin z_y - max_{j != y} z_j, per sample (float32)."""
    z = logits.detach().float()
    assigned = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return assigned - others


def pseudo_margins(logits: Tensor) -> Tensor:
    """MarginMatch's pseudo-margins [N, K]: z_c - z_top1 for c != top1, z_top1 - z_top2 at top1."""
    z = logits.detach().float()
    top = z.topk(2, dim=1)
    margins = z - top.values[:, :1]
    return margins.scatter(1, top.indices[:, :1], (top.values[:, :1] - top.values[:, 1:2]))


def _last_occurrence(indices: Tensor) -> Tensor:
    """For each position, the position of its index's last occurrence in ``indices``: every copy of a
    sample twice in one batch then writes the last one's value, once. A batch-square comparison, not
    ``torch.unique``, whose value-dependent length makes the host wait for the device."""
    positions = torch.arange(len(indices), device=indices.device)
    return torch.where(indices[:, None] == indices[None, :], positions, -1).amax(dim=1)


class AUMTracker(nn.Module):
    """Area under the margin: the running mean of each labeled sample's margin, every step."""

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.register_buffer("margin_sum", torch.zeros(num_samples))
        self.register_buffer("count", torch.zeros(num_samples, dtype=torch.int32))

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, indices: Tensor) -> None:
        """Add this step's margins (every process's): repeats of a sample in one batch all count.

        ``index_put_`` accumulates repeats in index order on CUDA too (``index_add_``'s atomic adds
        would not, and a resumed run would drift from the uninterrupted one in the last bits)."""
        idx, margins = dist.all_gather_cat(indices), dist.all_gather_cat(aum_margins(logits, labels))
        self.margin_sum.index_put_((idx,), margins, accumulate=True)
        self.count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))

    def scores(self, indices: Tensor | None = None) -> Tensor:
        """AUM = margin sum / count (0 for a sample not seen yet); higher = easier."""
        if indices is None:
            return self.margin_sum / self.count.clamp_min(1)
        return self.margin_sum[indices] / self.count[indices].clamp_min(1)


class APMTracker(nn.Module):
    """Average pseudo-margin per class: APM_i <- a PM_i + (1 - a) APM_i with a = delta / (1 + n_i)."""

    def __init__(self, num_samples: int, num_classes: int, delta: float = 0.997, dtype: str = "float32") -> None:
        super().__init__()
        self.delta = delta
        self.register_buffer("apm", torch.zeros(num_samples, num_classes, dtype=APM_DTYPES[dtype]))
        self.register_buffer("visits", torch.zeros(num_samples, dtype=torch.int32))

    @torch.no_grad()
    def update(self, logits: Tensor, indices: Tensor) -> None:
        """Fold this step's pseudo-margins (every process's) into each sample's average, in float32."""
        idx, margins = dist.all_gather_cat(indices), dist.all_gather_cat(pseudo_margins(logits))
        margins = margins[_last_occurrence(idx)]  # repeats write the same value: one update each
        rate = (self.delta / (1.0 + self.visits[idx].float()))[:, None]
        self.apm[idx] = (rate * margins + (1.0 - rate) * self.apm[idx].float()).to(self.apm.dtype)
        self.visits[idx] += 1

    def scores(self, indices: Tensor, labels: Tensor) -> Tensor:
        """APM[i, yhat_i]: how consistently the model has put yhat_i ahead (higher = easier)."""
        return self.apm[indices, labels].float()
