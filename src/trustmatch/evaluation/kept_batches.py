"""The first batches of an evaluation pass, kept on the device to be scored again once a temperature fitted
on the whole pass is known.

Validation that is also the report split (``train.evaluate_test=false``: every tune trial) needs its
temperature-scaled metrics with the temperature fitted on that very pass. Keeping the pass's logits lets
them come from the same forward instead of a second one. The logits of a large validation split do not fit
(Pascal val: about 5.7e9), so only a prefix of batches up to :data:`BUDGET` logits is kept and the images
after it are predicted again; digitscenes' 100 validation scenes fit many times over.
"""

from __future__ import annotations

from torch import Tensor

BUDGET = 1 << 26  # float32 logits kept at most: 256 MiB


class KeptBatches:
    """(logits, masks) of a pass's first batches, in order, while all of them fit in ``budget`` logits."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = BUDGET if budget is None else budget
        self.batches: list[tuple[Tensor, Tensor]] = []
        self.images = 0  # images in the kept batches: the pass's first ``images``
        self.logits = 0
        self.full = False  # a batch did not fit: none after it is kept either

    def add(self, logits: Tensor, masks: Tensor) -> None:
        """Keep the batch if it fits beside every batch before it (the kept batches stay a prefix)."""
        if self.full or self.logits + logits.numel() > self.budget:
            self.full = True
            return
        self.batches.append((logits, masks))
        self.images += len(logits)
        self.logits += logits.numel()
