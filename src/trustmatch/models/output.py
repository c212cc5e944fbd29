"""What every model's forward returns: logits and the features behind them, in one pass.

Returning both from ``forward`` (not from a side method) keeps them available through DDP and
``torch.compile``, which only wrap ``forward``; regularizers such as CalibrateMix's feature-space
pairing read the features of the very pass whose logits train the model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Output(NamedTuple):
    logits: Tensor  # [N, K] (classification) or [N, K, H, W] (segmentation), float32
    features: Tensor  # [N, D]: globally pooled penultimate features


def float32_head(head: nn.Module, features: Tensor) -> Tensor:
    """The head in float32 even under bf16 autocast: it is cheap, and rounding logits to bf16
    (a step of 1/16 at |z| = 10) would blur the probabilities that calibration is measured on."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.float())
