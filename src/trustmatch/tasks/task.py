"""The task interface: what differs between classification and segmentation, and what they share.

The trainer owns what every run shares (loop, EMA, optimizer and schedule, checkpoints, RNG
streams, processes, progress, run directory). A task owns its data, batches and views, the step,
and streaming evaluation with the score that picks ``best``. ``SSLTask`` holds what both tasks do
alike: the method object (which gives the selector and the step, so no task compares method names),
the index streams, the selection recorder and the regularizers (CalibrateMix), which add their loss on
top of the step's outputs and write their own artefacts. Plots of evaluations and ``predict`` are not
part of training: the run layer draws from ``Evaluation`` and the task's metric names, and
``trustmatch.inference`` predicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from trustmatch import models
from trustmatch.config import Config
from trustmatch.core import distributed as dist
from trustmatch.core.precision import Precision
from trustmatch.data.sampler import IndexStream
from trustmatch.evaluation.temperature import Temperature
from trustmatch.methods import Selector, build_method
from trustmatch.methods.calibratemix import NAME as CALIBRATEMIX
from trustmatch.methods.calibratemix import CalibrateMix
from trustmatch.methods.csl_recorder import PART as RECORDER_PART
from trustmatch.methods.csl_recorder import SelectionRecorder
from trustmatch.methods.step_output import Regularizer, StepOutput


class Stateful(Protocol):
    """Anything the checkpoint saves and restores: modules, optimizers, schedulers, streams, trackers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Evaluation:
    """Metrics of one split (fractions) and the task's small summary for its plots (bins, counts; the
    risk-coverage curve)."""

    metrics: dict[str, float]
    detail: Any = None
    calibrated: dict[str, float] | None = None  # the same metrics after temperature scaling, when asked
    calibrated_detail: Any = None
    risk_coverage: dict[str, list[float]] | None = None
    calibrated_risk_coverage: dict[str, list[float]] | None = None


class Task(ABC):
    """One kind of problem. Built from the config on a device, it loads its data at once."""

    #: metric of ``Evaluation.metrics`` that ``score`` ranks by and reports as the headline
    primary: ClassVar[str]
    #: the calibration error of ``Evaluation.metrics`` a reliability diagram shows (its bins: ``detail``)
    calibration_metric: ClassVar[str]
    #: the NLL of ``Evaluation.metrics`` (lower is better) that breaks ties of ``primary``, where it has one
    nll_metric: ClassVar[str | None] = None
    #: what one sample of a diagram is, where not an image (segmentation: ", per pixel")
    diagram_unit: ClassVar[str] = ""
    #: (metric, label) panels of the run's curves over its evaluations
    curves: ClassVar[tuple[tuple[str, str], ...]]
    #: how a certified threshold bounds the risk of what it accepts (``evaluation.certify``: "binomial" for
    #: 0/1 losses, "betting" for losses in [0, 1]) and what one accepted unit is, in words
    certify_bound: ClassVar[str] = "binomial"
    certify_unit: ClassVar[str] = "image"
    #: whether ``validate`` fits a post-hoc temperature (metrics.json explains a missing one only then);
    #: a task may decide per run (segmentation: ``eval.pixel_temperature=off``)
    fits_temperature: bool = True

    def __init__(self, cfg: Config, precision: Precision) -> None:
        self.cfg, self.precision, self.device = cfg, precision, precision.device
        self.regularizers: dict[str, Regularizer] = {}

    @classmethod
    def model_for(cls, meta: dict[str, Any], **options: Any) -> nn.Module:
        """The network a checkpoint's ``meta`` describes: training and inference build the same.
        ``options``: ``weights`` / ``weights_prefix`` (``build_model``'s; inference gives none: the checkpoint's
        weights replace any) and what this task's networks take besides the common keys (segmentation's stride)."""
        model = meta["config"]["model"]
        return models.build_model(
            model["name"],
            len(meta["classes"]),
            meta["channels"],
            bn_momentum=model["bn_momentum"],
            dropout=model["dropout"],
            **options,
        )

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """A fresh network for this task's data (the trainer seeds, places and wraps it), with ``model.weights``
        loaded; without ``initial_weights`` (a resume, whose checkpoint replaces them) none are read or fetched."""
        model = self.cfg.model
        weights = model.weights if initial_weights else "none"
        return self.model_for(self.meta(), weights=weights, weights_prefix=model.weights_prefix)

    @abstractmethod
    def state_parts(self) -> dict[str, Stateful]:
        """The task's stateful parts besides the model (selector, data streams, trackers)."""

    @abstractmethod
    def next_batch(self, generator: torch.Generator) -> Any:
        """The next training batch with its views, on the device; randomness from ``generator``. A pure
        function of ``generator`` and ``batch_parts``: the trainer may call it in a background thread, so it
        calls no collective (under torchrun the producer's would interleave with the step's and hang)."""

    def batch_parts(self) -> dict[str, Stateful]:
        """The parts ``next_batch`` advances besides the generator (the index streams): what a batch built
        ahead of its step rewinds for a checkpoint (``run/prefetch.py``)."""
        return {}

    @abstractmethod
    def step(self, model: nn.Module, batch: Any, step: int, total_steps: int) -> StepOutput:
        """Forward and losses of one step (under the trainer's autocast; no backward here). Nothing in it
        reads a value on the host, so the step compiles (``train.compile``) and the GPU never waits."""

    def record(self, out: StepOutput, batch: Any) -> None:
        """After the step, outside what ``train.compile`` compiles: keep what a few steps' plots need (the
        only host copies in a step, on those few steps)."""
        return None

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, temperature: Temperature | None = None) -> Evaluation:
        """Streaming, sharded evaluation of ``split`` ("val" or "test"), reduced over processes;
        with a ``temperature`` (one T, or T_c per class), the temperature-scaled metrics too, from the same pass."""

    @abstractmethod
    def split_logits(self, model: nn.Module, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """(float32 logits, targets) on the device of every sample of ``split`` in order, batch by batch, in this
        process alone (no sharding): for statistics of a finished run's own (the report's per-class calibration)."""

    def validate(self, model: nn.Module) -> tuple[dict[str, float], Temperature | None]:
        """Validation metrics and, from the same pass, the post-hoc temperature fitted on them (never
        on test; None where the task fits none)."""
        return self.evaluate(model, "val").metrics, None

    def validate_as_report(self, model: nn.Module) -> tuple[dict[str, float], Temperature | None, Evaluation]:
        """``validate`` and ``evaluate("val", temperature)``, for when validation is also the report split
        (``train.evaluate_test=false``: every tune trial). A task overrides it to read validation once;
        this default reads it twice."""
        metrics, temperature = self.validate(model)
        return metrics, temperature, self.evaluate(model, "val", temperature)

    @abstractmethod
    def selective_units(
        self, model: nn.Module, split: str, temperature: Temperature | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per unit (image) of ``split`` whose truth is known: the score ``predict`` accepts or abstains on,
        computed from the raw probabilities (a temperature fitted on the certifying validation split could
        reorder the units), and the loss in [0, 1] of the prediction ``predict`` writes with the ``temperature``,
        float64 on the CPU, in the split's order. One process: a certified threshold is chosen outside training."""

    @abstractmethod
    def has_split(self, split: str) -> bool:
        """Whether ``split`` exists and holds samples (no validation split: no ``best``)."""

    @property
    def report_split(self) -> str:
        """The split behind `final` and `test`: the test split, or validation where the task has none or
        ``train.evaluate_test`` is false (the test split is then never read)."""
        return "test" if self.cfg.train.evaluate_test and self.has_split("test") else "val"

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
            missing = [view for view in regularizer.views if view not in out.logits]
            if missing:
                raise ValueError(
                    f"regularizer {name!r} needs the views {missing} that {type(self).__name__}'s step lacks"
                )
            loss, logs = regularizer(model, batch, out)
            out.loss = out.loss + loss
            out.logs.update({f"{name}/{k}": v for k, v in logs.items()})
        return out


class SSLTask(Task):
    """What both tasks share: the method object, its selector, the labeled and unlabeled index streams,
    the selection recorder (CSL) and the regularizers (CalibrateMix). A subclass loads its data, then
    calls ``start`` with its sizes; its ``method_step`` picks the method's step for the task."""

    data: Any  # the task's loaded data

    def __init__(self, cfg: Config, precision: Precision) -> None:
        super().__init__(cfg, precision)
        self.method = build_method(cfg.method)
        self.selector: Selector | None = None
        self.streams: dict[str, IndexStream] = {}
        self.recorder = SelectionRecorder(seed=cfg.seed) if self.method.records_selection else None

    def share_batch(self) -> None:
        """Before the data load: refuse a global batch the processes cannot share equally, or that would
        leave a regularizer fewer images per process than it needs (CalibrateMix halves each share), or CSL's
        CutMix partner fewer than 2 unlabeled images (predicted in training mode, as CSL's release does; a
        BatchNorm on a 1x1 map, as in ASPP's pooling branch, cannot normalise one image)."""
        t = self.cfg.train
        if self.cfg.calibratemix.mode != "off":
            dist.batch_share(t.batch_size, CalibrateMix.min_share, "CalibrateMix needs (it halves each batch)")
        elif self.method.trusted_mask_view() is not None:  # CSL's partner: BatchNorm in training mode
            need = -(-2 // t.uratio)
            dist.batch_share(t.batch_size, need, f"CSL needs (x uratio {t.uratio}: its CutMix partner's BatchNorm)")
        else:
            dist.batch_share(t.batch_size)

    def start(self, num_labeled: int, num_unlabeled: int, num_classes: int, unlabeled_streams: int = 1) -> None:
        """The streams (global batches: each process takes batch_size / world_size of them, and uratio
        times as many unlabeled ones), the selector and the regularizers, once the data is loaded."""
        t, seed = self.cfg.train, self.cfg.seed
        self.streams["lb_stream"] = IndexStream(num_labeled, t.batch_size, seed)
        self.selector = self.method.selector(num_classes, num_unlabeled)
        if self.selector is None:
            return
        self.selector.to(self.device)
        for i, name in enumerate(("ulb_stream", "mix_stream")[:unlabeled_streams]):
            self.streams[name] = IndexStream(num_unlabeled, t.batch_size * t.uratio, seed + 1 + i)
        if self.cfg.calibratemix.mode != "off":
            second_pass = partial(self.method.unlabeled_loss, self.selector)
            self.regularizers[CALIBRATEMIX] = CalibrateMix(
                self.cfg.calibratemix, num_labeled, num_unlabeled, num_classes, second_pass
            )

    def batch_parts(self) -> dict[str, Stateful]:
        return dict(self.streams)

    def state_parts(self) -> dict[str, Stateful]:
        parts: dict[str, Stateful] = {"lb_stream": self.streams["lb_stream"]}
        if self.selector is not None:
            parts["selector"] = self.selector
            parts.update({name: s for name, s in self.streams.items() if name != "lb_stream"})
        if self.recorder is not None:
            parts[RECORDER_PART] = self.recorder
        return parts

    @abstractmethod
    def method_step(self, model: nn.Module, batch: Any, step: int, total_steps: int) -> StepOutput:
        """The method's step for this task (``Method.classification_step`` or ``segmentation_step``)."""

    @abstractmethod
    def truth(self, batch: Any) -> tuple[Tensor | None, Tensor | None]:
        """The batch's true unlabeled labels, where known, and the valid-element mask, for the recorder."""

    def step(self, model: nn.Module, batch: Any, step: int, total_steps: int) -> StepOutput:
        return self.method_step(model, batch, step, total_steps)

    def record(self, out: StepOutput, batch: Any) -> None:
        if self.recorder is not None and out.selection is not None:
            self.recorder.observe(out.step, out.total_steps, out.selection, *self.truth(batch))

    def split_data(self, split: str) -> Any:
        """The samples of ``split`` ("val", "test", or a training split). Evaluation and prediction read
        images through here only, so a test can see which splits a run reads (a study never reads test)."""
        return getattr(self.data, split)

    def train_stats(self) -> dict[str, float]:
        return self.selector.stats() if self.selector is not None else {}

    def summary(self) -> str:
        return f"{self.cfg.data.name}: {self.data.summary()}"

    def sample_predictions(self, model: nn.Module, split: str) -> tuple[Tensor, Tensor]:
        """The final model's confidence and class for every sample of a training split (a data map)."""
        raise NotImplementedError(f"{type(self).__name__} gives no per-sample predictions")

    def write_final(self, model: nn.Module, run_dir: Path) -> None:
        """On the main process: the CSL selection scatter of a few training batches, and each regularizer's
        own artefacts (CalibrateMix: the data map)."""
        if not dist.is_main():
            return
        if self.recorder is not None:
            self.recorder.write_artefacts(run_dir)
        predictions: Callable[[str], tuple[Tensor, Tensor]] = lambda split: self.sample_predictions(model, split)  # noqa: E731
        for regularizer in self.regularizers.values():
            regularizer.write_artefacts(run_dir, predictions, self.data)
