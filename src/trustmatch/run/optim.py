"""Optimizer and learning-rate schedule factories.

SGD with Nesterov momentum (FixMatch, UniMatch) or AdamW (USB's ``usb_cv`` fine-tuning of pretrained ViTs).
No weight decay on BatchNorm / LayerNorm parameters and biases (as USB), nor on what the model names in
``no_weight_decay()`` (a ViT's position embedding and class token, as USB and timm). The head may learn
faster than the body (``train.head_lr_scale``: UniMatch trains its decoder at 10x). Layer-wise decay
(``train.layer_decay``) scales a parameter's rate by ``layer_decay ** (top - depth)``, its depth from the
model's ``layer_ids()`` (timm's grouping: the stem deepest, the last block and the head at the top), as
timm's and USB's ``param_groups_layer_decay``. Parameters that do not require gradients (``train.freeze``)
are left out. Schedules (``trustmatch.core.lr_schedules``) scale each group's initial learning rate, after a
linear warm-up over ``train.warmup`` of the steps.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from trustmatch.config import TrainConfig
from trustmatch.config.schema import OPTIMIZERS
from trustmatch.core.errors import UserError
from trustmatch.core.lr_schedules import SCHEDULES, warmup_factor

__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "param_groups", "warmup_steps"]


def _layer_scales(model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    """Each parameter name's layer-decay factor (all 1 with ``layer_decay=1``)."""
    if cfg.layer_decay == 1.0:
        return {}
    if not hasattr(model, "layer_ids"):
        raise UserError(
            f"train.layer_decay={cfg.layer_decay} needs a network with layers by depth (timm:<name> or USB's ViTs); "
            f"{type(model).__name__} has none: set train.layer_decay=1"
        )
    ids = model.layer_ids()
    top = max(ids.values())
    return {name: cfg.layer_decay ** (top - layer) for name, layer in ids.items()}


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One group per (layer scale, head, decayed), top layers first; empty groups are left out."""
    head = {id(p) for p in getattr(model, "head", nn.Identity()).parameters()}
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    scales = _layer_scales(model, cfg)
    groups: dict[tuple[float, bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decayed = p.ndim > 1 and name not in no_decay
            groups.setdefault((-scales.get(name, 1.0), id(p) in head, decayed), []).append(p)
    return [
        {
            "params": params,
            "lr": cfg.lr * -neg_scale * (cfg.head_lr_scale if is_head else 1.0),
            "weight_decay": cfg.weight_decay if decayed else 0.0,
        }
        for (neg_scale, is_head, decayed), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Every parameter of a group updated by one kernel per operation: fused on CUDA, foreach elsewhere
    (the same arithmetic as torch's per-parameter loop, which the CPU would otherwise get). A loaded state
    keeps these kernels (:func:`_keep_kernels`), whatever device wrote it."""
    groups = param_groups(model, cfg)
    on_cuda = next(model.parameters()).device.type == "cuda"
    kernels = {"fused": True, "foreach": None} if on_cuda else {"fused": None, "foreach": True}
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **kernels)
    else:
        nesterov = cfg.nesterov and cfg.momentum > 0
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, **kernels)
    optimizer.register_load_state_dict_post_hook(partial(_keep_kernels, kernels))
    return optimizer


def _keep_kernels(kernels: dict[str, bool | None], optimizer: torch.optim.Optimizer) -> None:
    """``load_state_dict`` replaces the param groups with the saved ones, ``fused`` and ``foreach`` included:
    a CUDA run (fused) resumed on a CPU would ask for fused kernels there. Put back this device's; a fused
    kernel wants each step count as float32 on its parameter's device, where a CPU run kept it on the CPU."""
    for group in optimizer.param_groups:
        group.update(kernels)
        for p in group["params"] if kernels["fused"] else []:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(dtype=torch.float32, device=p.device)


def warmup_steps(cfg: TrainConfig) -> int:
    return round(cfg.warmup * cfg.steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's initial lr times the schedule's factor; ``cfg.steps`` is read at every step,
    so a resumed run whose ``train.steps`` was extended follows the longer schedule from there."""
    factor = SCHEDULES.get(cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: warmup_factor(factor, k, cfg.steps, cfg.poly_power, warmup_steps(cfg))
    )
