"""A bounded, deterministic sample of validation pixels, on which segmentation fits its temperature.

Validation can hold far more pixels than memory (Pascal val: 1449 images, about 2.7e8 pixels of 21
logits each), so the fit uses at most ``budget`` of them (:data:`BUDGET`, 2^20: 84 MB of float32
logits at 21 classes). Every pixel gets a random 62-bit key from a generator seeded by its image's
index, and the pool keeps the valid pixels with the smallest keys: a uniform sample without
replacement that depends on the images and pixels only, so it is the same for any batch size, order
or number of processes (two keys are equal with probability ~n^2 / 2^63: never in practice). The pool
stays on the device and adds a batch without waiting for it: ignored pixels get a key above every
drawn one instead of being dropped, and leave in :meth:`PixelPool.pixels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trustmatch.core import distributed as dist
from trustmatch.core.labels import IGNORE
from trustmatch.evaluation.metrics import float64_device

BUDGET = 1 << 20
KEY_SEED = 20_250_716  # any fixed number: the pixels a fit uses must not depend on the run's seed
NO_KEY = 1 << 62  # above every drawn key: an ignored pixel


class PixelPool:
    """The ``budget`` valid pixels with the smallest keys seen so far: their logits, labels and keys."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", budget: int = BUDGET) -> None:
        if budget < 1:
            raise ValueError(f"a pixel pool needs a budget of at least 1 pixel, got {budget}")
        self.budget = budget
        self.device = float64_device(torch.device(device))  # the fit's device (MPS: the CPU)
        self.keys = torch.empty(0, dtype=torch.int64, device=self.device)
        self.logits = torch.empty(0, num_classes, device=self.device)
        self.labels = torch.empty(0, dtype=torch.int64, device=self.device)

    def _image_keys(self, image: int, shape: torch.Size) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(KEY_SEED + image)
        return torch.randint(0, NO_KEY, shape, generator=generator, device=self.device)

    def add(self, logits: Tensor, masks: Tensor, images: Sequence[int]) -> None:
        """Logits [B, K, H, W] and masks [B, H, W] of the dataset's images ``images`` (their indices)."""
        if len(images) != len(logits) or masks.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"expected logits [B, K, H, W], masks [B, H, W] and B image indices, got "
                f"{tuple(logits.shape)}, {tuple(masks.shape)} and {len(images)}"
            )
        masks = masks.to(self.device)
        keys = torch.stack([self._image_keys(i, masks.shape[1:]) for i in images])
        keys = torch.where(masks != IGNORE, keys, NO_KEY).flatten()
        keys, order = keys.topk(min(self.budget, keys.numel()), largest=False, sorted=False)
        height, width = masks.shape[1:]
        b, h, w = order // (height * width), order // width % height, order % width
        picked = logits.detach()[b.to(logits.device), :, h.to(logits.device), w.to(logits.device)]
        self._keep(keys, picked.to(self.device, torch.float32), masks[b, h, w].long())

    def _keep(self, keys: Tensor, logits: Tensor, labels: Tensor) -> None:
        keys = torch.cat([self.keys, keys])
        logits, labels = torch.cat([self.logits, logits]), torch.cat([self.labels, labels])
        if len(keys) > self.budget:
            keys, order = keys.topk(self.budget, largest=False, sorted=False)
            logits, labels = logits[order], labels[order]
        self.keys, self.logits, self.labels = keys, logits, labels

    def pixels(self) -> tuple[Tensor, Tensor]:
        """The sample over every process (a collective), in key order: logits [n, K] (float32) and labels
        [n], n = min(budget, valid pixels seen)."""
        keys, logits, labels = (dist.all_gather_cat(t) for t in (self.keys, self.logits, self.labels))
        keys, order = keys.sort()
        n = int((keys[: self.budget] < NO_KEY).sum())
        return logits[order[:n]], labels[order[:n]]
