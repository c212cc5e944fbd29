"""Exponential moving average of the weights, the model every evaluation uses.

Parameters are averaged (decay ``d``); buffers (BatchNorm running statistics, counters) are
copied from the live model, as USB does, because averaging running averages only adds lag.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        live_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, live_params, 1.0 - self.decay)
        buffers = list(self.module.buffers())
        if buffers:  # a ViT has none (and _foreach_copy_ refuses empty lists)
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
