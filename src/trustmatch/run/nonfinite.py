"""``train.nonfinite``: a NaN or infinite loss (or, when skipping, update) stops the run with one line
naming the step and the last good checkpoint, or skips the step as if its batch had not been drawn.

Skipping restores what the forward changed besides the weights, which a skipped step leaves alone.

Stopping in one process never makes a step wait for the device: ``watch`` keeps, on the device, the
first step whose loss is not finite and its losses, and ``check`` reads that flag where the host reads
anyway (a log interval, a save, an evaluation, the end). The update of a bad step is applied but never
saved: the run stops at the next read with the same line, naming the same step and checkpoint. Skipping
and torchrun still decide at each step (a restore is a branch; torchrun agrees in a collective).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError
from trustmatch.data.sampler import IndexStream
from trustmatch.tasks import Regularizer, Stateful, StepOutput

MAX_CONSECUTIVE_SKIPS = 100  # train.nonfinite=skip: a run this broken stops instead of skipping on
KEPT = ("model", "ema", "optimizer", "scheduler")  # untouched by a skipped step, or moving on


class NonFiniteLoss(UserError):
    """The loss of a step was NaN or infinite (``train.nonfinite=stop``)."""


class NonFinitePolicy:
    """Stop or skip (``mode``), for one run's model, checkpointed parts and regularizers."""

    def __init__(
        self,
        mode: str,
        model: nn.Module,
        parts: dict[str, Stateful],
        regularizers: dict[str, Regularizer],
        checkpoint: Path,
    ) -> None:
        self.skip = mode == "skip"
        self.model, self.parts, self.regularizers, self.checkpoint = model, parts, regularizers, checkpoint
        self.consecutive_skips = 0
        self.first_bad: torch.Tensor | None = None  # stop mode: the first bad step (-1: none), on the device
        self.bad_logs: dict[str, torch.Tensor] = {}  # ... and its losses

    def watch(self, out: StepOutput, step: int) -> None:
        """Remember, without reading it, whether ``step``'s loss is the first that is not finite."""
        loss = out.loss.detach()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(first, step, self.first_bad)
        for k, v in out.logs.items():
            if k.startswith("loss"):
                kept = self.bad_logs.get(k, torch.full((), float("nan"), device=v.device))
                self.bad_logs[k] = torch.where(first, v.detach().float(), kept)

    def check(self, saved_step: int | None) -> None:
        """Stop at the step ``watch`` found (one read of a flag on the device); nothing if none."""
        if self.first_bad is not None and (step := int(self.first_bad)) >= 0:
            raise self.error(dict(self.bad_logs), 0, step, saved_step)

    def snapshot(self) -> dict[str, Any] | None:
        """What a step's forward changes besides the weights: BatchNorm statistics, selector and
        regularizer state (streams move on: a skipped batch is not drawn again). None: not skipping."""
        if not self.skip:
            return None
        parts = {n: p for n, p in self.parts.items() if n not in KEPT and not isinstance(p, IndexStream)}
        return {
            "buffers": [b.detach().clone() for b in self.model.buffers()],
            "parts": {n: copy.deepcopy(p.state_dict()) for n, p in parts.items()},
            "rank": {n: copy.deepcopy(r.rank_state()) for n, r in self.regularizers.items()},
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), snapshot["buffers"]):
                buffer.copy_(saved)
        for name, state in snapshot["parts"].items():
            self.parts[name].load_state_dict(state)
        for name, state in snapshot["rank"].items():
            self.regularizers[name].load_rank_state(state)

    def finite(self) -> None:
        """A step updated: the count of skips in a row starts again."""
        self.consecutive_skips = 0

    def count_skip(
        self, logs: dict[str, torch.Tensor], bad_rank: int, step: int, saved_step: int | None, what: str
    ) -> None:
        """One more step skipped in a row; MAX_CONSECUTIVE_SKIPS of them stop the run."""
        self.consecutive_skips += 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            span = f"{MAX_CONSECUTIVE_SKIPS} steps in a row, up to "
            raise self.error(logs, bad_rank, step, saved_step, span, what)

    def error(
        self,
        logs: dict[str, torch.Tensor] | None,
        bad_rank: int,
        step: int,
        saved_step: int | None,
        span: str = "",
        what: str = "the loss is",
    ) -> NonFiniteLoss:
        """The one line: what, where, at which step (``logs``: the losses of the step being taken, None: of
        an evaluation after ``step``), the last good checkpoint (at ``saved_step``) and the fix."""
        where = f" on process {bad_rank}" if dist.is_distributed() else ""
        parts = ", ".join(f"{k} {float(v):.3g}" for k, v in (logs or {}).items() if k.startswith("loss"))
        shown = f" ({parts})" if parts and not where else ""
        saved = "no checkpoint was saved yet"
        if saved_step is not None:
            saved = f"the last good checkpoint is {self.checkpoint} (step {saved_step})"
        if span:  # skipping did not help
            fix = "lower train.lr and start again"
        elif saved_step is not None:
            fix = "resume it with train.nonfinite=skip to skip such steps, or lower train.lr and start again"
        else:
            fix = "lower train.lr and start again (train.nonfinite=skip skips such steps)"
        step += logs is not None
        error = NonFiniteLoss(f"{what} not finite{where} at {span}step {step}{shown}; {saved}: {fix}")
        error.everywhere = logs is not None  # a step's verdict is agreed: the CLI prints it once
        return error
