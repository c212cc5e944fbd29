"""The task interface: what differs between classification and segmentation.

The trainer owns what every run shares (loop, EMA, optimizer and schedule, checkpoints, RNG
streams, processes, progress, run directory). A task owns its data, batches and views, the step,
streaming evaluation with the score that picks ``best``, and its artefacts. Segmentation is a second
``Task``, not a second trainer; a ``Regularizer`` (CalibrateMix) adds a loss on top of any task's
step from the outputs the step returns, without editing the step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trustmatch.config import Config
from trustmatch.engine.precision import Precision
from trustmatch.step import Regularizer, StepOutput


class Stateful(Protocol):
    """Anything the checkpoint saves and restores: modules, optimizers, schedulers, streams, trackers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Evaluation:
    """Metrics of one split (fractions) and the task's small summary for its plots (bins, counts)."""

    metrics: dict[str, float]
    detail: Any = None
    calibrated: dict[str, float] | None = None  # the same metrics after temperature scaling, when asked
    calibrated_detail: Any = None


class Task(ABC):
    """One kind of problem. Built from the config on a device, it loads its data at once."""

    #: metric of ``Evaluation.metrics`` that ``score`` ranks by and reports as the headline
    primary: str
    #: whether ``validate`` fits a post-hoc temperature (metrics.json explains a missing one only then)
    fits_temperature: bool = True

    def __init__(self, cfg: Config, precision: Precision) -> None:
        self.cfg, self.precision, self.device = cfg, precision, precision.device
        self.regularizers: dict[str, Regularizer] = {}

    @classmethod
    @abstractmethod
    def model_for(cls, meta: dict[str, Any]) -> nn.Module:
        """The network a checkpoint's ``meta`` describes: training and inference build the same."""

    def build_model(self) -> nn.Module:
        """A fresh network for this task's data (the trainer seeds, places and wraps it)."""
        return self.model_for(self.meta())

    @abstractmethod
    def state_parts(self) -> dict[str, Stateful]:
        """The task's stateful parts besides the model (selector, data streams, trackers)."""

    @abstractmethod
    def next_batch(self, generator: torch.Generator) -> Any:
        """The next training batch with its views, on the device; randomness from ``generator``."""

    @abstractmethod
    def step(self, model: nn.Module, batch: Any, step: int, total_steps: int) -> StepOutput:
        """Forward and losses of one step (under the trainer's autocast; no backward here)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, temperature: float | None = None) -> Evaluation:
        """Streaming, sharded evaluation of ``split`` ("val" or "test"), reduced over processes;
        with a ``temperature``, the temperature-scaled metrics too, from the same pass."""

    def validate(self, model: nn.Module) -> tuple[dict[str, float], float | None]:
        """Validation metrics and, from the same pass, the post-hoc temperature fitted on them (never
        on test; None where the task fits none)."""
        return self.evaluate(model, "val").metrics, None

    @abstractmethod
    def has_split(self, split: str) -> bool:
        """Whether ``split`` exists and holds samples (no validation split: no ``best``)."""

    @abstractmethod
    def split_sizes(self) -> dict[str, int]:
        """Samples per split, recorded in metrics.json."""

    def train_stats(self) -> dict[str, float]:
        """Scalars worth logging besides the step's (selector thresholds, EMA statistics)."""
        return {}

    @abstractmethod
    def summary(self) -> str:
        """One line describing the data, printed when a run starts."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """What inference needs besides the weights: the config, classes, normalisation, input shape."""

    @abstractmethod
    def write_artefacts(self, evaluation: Evaluation, stem: Path, title: str) -> None:
        """Plots of one evaluation, at ``stem`` plus the task's suffixes (reliability_best.png ...)."""

    @abstractmethod
    def write_history(self, history: list[dict[str, Any]], run_dir: Path) -> None:
        """Plots over the run's evaluations."""

    def write_final(self, model: nn.Module, run_dir: Path) -> None:  # noqa: B027 (an optional hook)
        """Artefacts of the finished run that need the final model (called on every process)."""

    def describe(self, metrics: dict[str, float]) -> str:
        """The metrics of one evaluation in a few words, for the progress log and the final line."""
        return f"{self.primary} {metrics[self.primary]:.4f}"

    def score(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """Higher is better; ``best`` is the evaluation with the highest validation score."""
        return (metrics[self.primary],)

    def step_with_regularizers(self, model: nn.Module, batch: Any, step: int, total_steps: int) -> StepOutput:
        for regularizer in self.regularizers.values():
            regularizer.prepare(batch, step, total_steps)
        out = self.step(model, batch, step, total_steps)
        for name, regularizer in self.regularizers.items():
            loss, logs = regularizer(model, batch, out)
            out.loss = out.loss + loss
            out.logs.update({f"{name}/{k}": v for k, v in logs.items()})
        return out

    @classmethod
    @abstractmethod
    def predict(
        cls,
        model: nn.Module,
        meta: dict[str, Any],
        inputs: list[Path],
        out: Path,
        precision: Precision,
        temperature: float | None = None,
    ) -> int:
        """``trustmatch predict``: the task's predictions for a user's files at ``out``; returns their number.
        ``temperature`` divides the logits before the softmax (post-hoc calibration). Tasks may take
        options of their own (segmentation: ``confidence_maps``)."""
