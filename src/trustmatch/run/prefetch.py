"""``train.prefetch``: batch t+1 built in a background thread while step t runs.

A batch is a pure function of the run's augmentation generator and the task's batch parts (its index
streams, ``Task.batch_parts``). Before the producer builds batch t+1 it snapshots both, so that a
checkpoint saved after step t (inside ``rewound``) holds the state from which t+1 is built again on
resume: a resumed run equals an uninterrupted one, with the producer or without. Torch ops release the
GIL, so the thread builds on the CPU while the main thread computes. Building a batch must call no
collective: under torchrun the producer's would interleave with the step's in another order on each
process and hang them (the tasks' batches call none; the distributed tests' aligned views do, with it off).

On CUDA the tasks copy from pinned memory without blocking, and the producer runs its device work (the
views) on a side stream; the consumer's stream waits on an event recorded after it, and every tensor
of the batch is marked as used by the consumer's stream (``record_stream``), so the caching allocator
does not give its memory back to the side stream while the step still reads it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from trustmatch.config import Config
from trustmatch.core.errors import UserError
from trustmatch.tasks import Stateful

THREAD_NAME = "prefetch"


def prefetch_enabled(cfg: Config, device: torch.device) -> bool:
    """``train.prefetch``: ``auto`` is on on the CPU only (measured on 2 cores: from no gain on the WRN-28-2
    step to 1.1x on small steps; README, Speed). With CUDA it is not measured yet, and it holds the next
    batch and its views' temporaries in GPU memory beside the step's: ``on`` there until ``gpu.sh`` has timed
    it. On MPS ``on`` is refused: ops from a second thread are not verified there."""
    mode = cfg.train.prefetch
    if mode == "on" and device.type == "mps":
        raise UserError("train.prefetch=on is not verified on MPS (ops from a second thread): set train.prefetch=off")
    return mode == "on" or (mode == "auto" and device.type == "cpu")


def tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a batch: its dataclass fields, tuples, lists and dicts, nested."""
    if isinstance(obj, Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from tensors(getattr(obj, field.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors(item)


class BatchSource:
    """The run's batches in order, from ``make``: built when asked (prefetch off), or one ahead in a
    thread. ``generator`` and ``parts`` are everything ``make`` reads and advances."""

    def __init__(
        self,
        make: Callable[[], Any],
        generator: torch.Generator,
        parts: dict[str, Stateful],
        device: torch.device,
        prefetch: bool,
    ) -> None:
        self.make, self.generator, self.parts, self.device, self.prefetch = make, generator, parts, device, prefetch
        self._stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Future[tuple[Any, Any]], dict[str, Any]] | None = None  # (batch being built, state before)

    @property
    def ahead(self) -> bool:
        """Whether a batch is being built (or was built) ahead of its step."""
        return self._pending is not None

    def state(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "parts": {name: copy.deepcopy(part.state_dict()) for name, part in self.parts.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        for name, part in self.parts.items():
            part.load_state_dict(state["parts"][name])

    def next(self, more: bool = False) -> Any:
        """The next batch (an error raised while building it is raised here, with its traceback); with
        prefetch and ``more`` (another step follows), the batch after it starts building at once."""
        if self._pending is None:
            batch = self.make()
        else:  # kept pending until received: after an error (or Ctrl-C) here, ``close`` rewinds to before it
            batch = self._receive(*self._pending[0].result())
            self._pending = None
        if more and self.prefetch:
            before = self.state()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
            self._pending = (self._executor.submit(self._build), before)
        return batch

    def _build(self) -> tuple[Any, torch.cuda.Event | None]:
        """(In the producer thread) the batch, and on CUDA the event its side-stream work ends with."""
        if self._stream is None:
            return self.make(), None
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            batch = self.make()
            event = torch.cuda.Event()
            event.record(self._stream)
        return batch, event

    def _receive(self, batch: Any, event: torch.cuda.Event | None) -> Any:
        """The consumer's stream waits for the side stream's work, and owns the batch's memory from here."""
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in tensors(batch):
                if t.is_cuda:
                    t.record_stream(stream)
        return batch

    @contextmanager
    def rewound(self) -> Iterator[None]:
        """Within it the generator and parts are as before the batch being built ahead (what a checkpoint
        saved now must hold: that batch is built again on resume); afterwards as they were. The batch is kept."""
        if self._pending is None:
            yield
            return
        future, before = self._pending
        wait([future])  # built (or failed: ``next`` raises it)
        after = self.state()
        self.load(before)
        try:
            yield
        finally:
            self.load(after)

    def close(self) -> None:
        """Stop the thread. A batch built ahead is dropped and the state rewound to before it, so the
        generator and parts are where the consumed batches left them (a later ``next`` builds it again).
        An error in that batch is dropped with it: it was never asked for."""
        try:
            if self._pending is not None:  # cleared only once rewound: a second Ctrl-C here leaves it to redo
                future, before = self._pending
                wait([future])
                self.load(before)
                self._pending = None
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
