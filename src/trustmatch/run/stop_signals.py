"""SIGINT and SIGTERM (a scheduler's notice before preemption) while a run trains: the current step
ends, then the trainer saves ``last.pt`` at it and stops. Under torchrun the processes agree on the
step in the trainer's per-step collective, so no process waits for another in one it never reaches.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType
from typing import Any

import torch

from trustmatch.core import distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with`` it, SIGINT / SIGTERM set ``requested``; a second SIGINT stops at once
    (KeyboardInterrupt), the last saved checkpoint intact. The handlers before are restored on exit."""

    def __init__(self) -> None:
        self.requested: int | None = None  # a signal this process received
        self.agreed: int | None = None  # ... once every process knows of it (at the same step)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.requested = self.agreed = None
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread; a trainer in a thread is stopped by its owner
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is None:
            self.requested = signum
        elif signum == signal.SIGINT:  # a person pressing Ctrl-C again; a repeated SIGTERM (a
            raise KeyboardInterrupt  # scheduler signalling every process torchrun also signals) waits

    def stopping(self) -> int | None:
        """The signal to stop at this step: this process's own, or under torchrun the one all agreed on."""
        if not dist.is_distributed():
            self.agreed = self.requested
        return self.agreed

    def agree(self, loss: torch.Tensor) -> int | None:
        """The rank of a process whose loss is not finite (None: all finite); records a stop any process
        was asked for. Under torchrun one collective for both, between forward and backward."""
        bad = ~torch.isfinite(loss.detach())
        if not dist.is_distributed():
            return 0 if bool(bad) else None
        requested = torch.tensor(self.requested or 0, dtype=torch.int32, device=loss.device)
        flags = torch.stack([bad.to(torch.int32) * (dist.rank() + 1), requested])
        dist.all_reduce_max_(flags)
        if int(flags[1]):
            self.agreed = int(flags[1])
        return int(flags[0]) - 1 if int(flags[0]) else None
