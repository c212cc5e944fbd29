"""Optimizer and learning-rate schedule factories.

SGD with Nesterov momentum; no weight decay on BatchNorm parameters and biases (as USB). The head
may learn faster than the body (``train.head_lr_scale``: UniMatch trains its decoder at 10x).
Schedules are factors of the initial learning rate at step k of K, registered by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from trustmatch.config import TrainConfig
from trustmatch.registry import Registry

Schedule = Callable[[int, int, TrainConfig], float]
SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")


@SCHEDULES.register("cosine")
def cosine_factor(step: int, total: int, cfg: TrainConfig | None = None) -> float:
    """FixMatch's schedule: lr = lr0 * cos(7 pi k / (16 K))."""
    return math.cos(7.0 * math.pi * step / (16.0 * total))


@SCHEDULES.register("poly")
def poly_factor(step: int, total: int, cfg: TrainConfig | None = None) -> float:
    """UniMatch's schedule: lr = lr0 * (1 - k / K) ^ power."""
    power = cfg.poly_power if cfg is not None else 0.9
    return max(0.0, 1.0 - step / total) ** power


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
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: factor(k, cfg.steps, cfg))
