"""``train.compile`` and ``train.cuda_graphs``: the whole step compiled, and on CUDA replayed as graphs.

What is compiled is the task's step with its regularizers (views in, losses out: forward, selection,
losses; AOT autograd compiles its backward with it), not only the model. Nothing in that step reads a
value on the host or takes a shape from one (tests/test_step_sync.py compiles every method's step with
``fullgraph=True``), so it is one graph. The step number is a Python int: dynamo compiles once with it
fixed and once more with it symbolic, then no more. ``train.cuda_graphs`` compiles in the
"reduce-overhead" mode, which records the compiled forward and backward as CUDA graphs and replays them
(one launch for hundreds of kernels); settings whose step cannot be captured are refused at the start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trustmatch.config import Config
from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError

StepFunction = Callable[..., Any]


def uncapturable(cfg: Config, device: torch.device) -> tuple[str, str] | None:
    """(the setting, why) that keeps ``train.cuda_graphs`` from capturing the step; None: it can."""
    if dist.is_distributed():
        return "torchrun", "each process's step waits on a collective the graphs cannot replay"
    if cfg.train.nonfinite == "skip":
        return "train.nonfinite=skip", "a skipped step restores state on a decision read from the device"
    if cfg.calibratemix.mode != "off":
        return f"calibratemix.mode={cfg.calibratemix.mode}", "its mixing weights are drawn on the host each step"
    if cfg.task != "classification":
        return f"task {cfg.task}", "its step switches BatchNorm modes between forwards (not verified on a GPU yet)"
    if device.type != "cuda":
        return f"train.device={device.type}", "CUDA graphs need a CUDA device"
    return None


def check_cuda_graphs(cfg: Config, device: torch.device) -> None:
    """Refuse ``train.cuda_graphs=true`` in one line where the step cannot be captured (exit 2)."""
    if cfg.train.cuda_graphs and (reason := uncapturable(cfg, device)) is not None:
        setting, why = reason
        raise UserError(
            f"train.cuda_graphs=true cannot capture the step with {setting} ({why}): set train.cuda_graphs=false"
        )


def compile_step(cfg: Config, step: StepFunction) -> StepFunction | None:
    """The compiled step, or None where neither ``train.compile`` nor ``train.cuda_graphs`` asks for one."""
    if not (cfg.train.compile or cfg.train.cuda_graphs):
        return None
    return torch.compile(step, mode="reduce-overhead" if cfg.train.cuda_graphs else None)
