"""What a training step returns, and the regularizers that add a loss on top of any step.

A step (classification's weak-to-strong, segmentation's UniMatch) returns its loss together with the
logits and penultimate features of every view and the selection it made, so that a regularizer such
as CalibrateMix can add its own loss from them without editing the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from trustmatch.methods.selector import Selection


@dataclass
class StepOutput:
    """A step's loss and logs, plus what a regularizer needs to add its own loss on top."""

    loss: Tensor
    logs: dict[str, Tensor]
    logits: dict[str, Tensor] = field(default_factory=dict)  # per view: "lb", "weak", "strong", ...
    features: dict[str, Tensor] = field(default_factory=dict)  # penultimate features, same views
    selection: Selection | None = None  # the unlabeled pseudo-labels and weights
    step: int = 0  # the step being taken (0-based) ...
    total_steps: int = 1  # ... of this many (warm-up fractions, ramps)


class Regularizer(nn.Module):
    """A loss added on top of a task's step; its state lives in buffers (checkpointed with the run).

    Only rank 0's ``state_dict`` is saved: under torchrun a regularizer keeps that state identical on
    every process (per-sample trackers gather every process's indices and values before updating, as
    FlexMatch's selector does). What differs between processes (work built from a process's own
    batch) goes in ``rank_state``, saved per rank beside the RNG streams, so resume restores every
    process exactly.
    """

    #: the step outputs' views (``StepOutput.logits`` keys) this regularizer reads: a step without one
    #: of them is refused at its first call, not trained on silently
    views: ClassVar[tuple[str, ...]] = ()

    def rank_state(self) -> dict[str, Any]:
        """This process's own state (CPU tensors), saved per rank."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore what ``rank_state`` returned on this rank."""

    def prepare(self, batch: Any, step: int, total_steps: int) -> None:
        """Before the step: put images in ``batch.extra[name]`` to have them join the step's forward
        (their logits come back in ``out.logits[name]``): one backward pass for both losses."""

    def forward(self, model: nn.Module, batch: Any, out: StepOutput) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def write_artefacts(self, run_dir: Path, predictions: Callable[[str], tuple[Tensor, Tensor]], data: Any) -> None:
        """After training, on the main process: the regularizer's own files. ``predictions(split)`` gives
        the final model's (confidence, class) for every sample of a training split ("labeled",
        "unlabeled") of ``data``."""
