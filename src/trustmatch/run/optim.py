"""Optimizer and learning-rate schedule factories.

SGD with Nesterov momentum; no weight decay on BatchNorm parameters and biases (as USB). The head
may learn faster than the body (``train.head_lr_scale``: UniMatch trains its decoder at 10x).
Schedules (``trustmatch.core.lr_schedules``) scale each group's initial learning rate.
"""

from __future__ import annotations

import torch
from torch import nn

from trustmatch.config import TrainConfig
from trustmatch.core.lr_schedules import SCHEDULES


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """(body, head) x (decayed, not decayed) groups; empty groups are left out."""
    head = {id(p) for p in getattr(model, "head", nn.Identity()).parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault((id(p) in head, p.ndim > 1), []).append(p)
    return [
        {
            "params": params,
            "lr": cfg.lr * (cfg.head_lr_scale if is_head else 1.0),
            "weight_decay": cfg.weight_decay if decayed else 0.0,
        }
        for (is_head, decayed), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's initial lr times the schedule's factor; ``cfg.steps`` is read at every step,
    so a resumed run whose ``train.steps`` was extended follows the longer schedule from there."""
    factor = SCHEDULES.get(cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: factor(k, cfg.steps, cfg.poly_power))
