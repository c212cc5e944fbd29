"""What a method is: its ``method.*`` config section, the tasks it trains, and what a task asks of it.

Each method module defines a config dataclass (its keys, defaults and range checks) and a ``Method``
subclass registered in ``METHODS`` with its description and tasks; every list of methods (config
validation, presets, benchmarks, ``trustmatch list``) is derived from that registry. A task never
compares method names: it asks the method for its selector, its step, and whether it needs a TMP view
or a selection recorder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trustmatch.core.options import opt
from trustmatch.core.registry import Registry
from trustmatch.methods.selector import Selector
from trustmatch.methods.step_output import StepOutput
from trustmatch.methods.unimatch_step import Ohem, SegBatch, supervised_pixel_step, unimatch_step
from trustmatch.methods.weak_to_strong import Batch, consistency_loss, supervised_step, weak_to_strong_step

Check = tuple[bool, str, str]  # (holds, key, what the key must be)
RAMPUP_SHAPES = ("sigmoid", "linear")
LABELED_LOSSES = ("ce", "ohem")
LABELED_LOSS_KEYS = ("labeled_loss", "ohem_thresh", "ohem_min_kept")  # every method's, read in segmentation


@dataclass
class MethodConfig:
    """The ``method`` section: ``name``, and in each method's subclass the keys that method reads."""

    name: str = field(metadata={"help": "the method (METHODS)"})  # no default: a section names its method
    labeled_loss: str = opt(
        "ce", "segmentation: the labeled pixel loss, 'ce' or 'ohem' (UniMatch's and CSL's Cityscapes releases)"
    )
    ohem_thresh: float = opt(0.7, "OHEM: labeled pixels whose true-class probability is at most this are kept")
    ohem_min_kept: int = opt(
        100_000,
        "OHEM: at least this many pixels kept per labeled image (the releases: 200,000 per GPU batch of 2 crops); "
        "0 keeps every valid pixel, as the releases do",
    )
    #: keys only one task reads (CSL's TMP keys: segmentation), refused in the other tasks methods train
    task_only: ClassVar[dict[str, str]] = dict.fromkeys(LABELED_LOSS_KEYS, "segmentation")
    #: values renamed since runs saved them, {key: {old: new}}: a saved config reads them under the new
    #: name (``config.from_saved``); a user's config is refused with the new name
    renamed: ClassVar[dict[str, dict[str, str]]] = {}

    @classmethod
    def keys(cls, task: str | None = None) -> tuple[str, ...]:
        """The method.* keys this method reads besides ``name`` (when it trains ``task``, if given; a task
        of the user's own reads them all)."""
        names = (f.name for f in dataclasses.fields(cls) if f.name != "name")
        if task is None or task not in METHODS.tasks():
            return tuple(names)
        return tuple(k for k in names if cls.task_only.get(k, task) == task)

    def checks(self) -> list[Check]:
        """The range of each key, checked once the config is merged."""
        return [
            (self.labeled_loss in LABELED_LOSSES, "method.labeled_loss", " or ".join(map(repr, LABELED_LOSSES))),
            (0.0 < self.ohem_thresh <= 1.0, "method.ohem_thresh", "in (0, 1]"),
            (self.ohem_min_kept >= 0, "method.ohem_min_kept", "0 or more"),
        ]

    def ohem(self) -> Ohem | None:
        """(threshold, pixels kept per labeled image) of the OHEM labeled loss; None: plain cross-entropy."""
        return (self.ohem_thresh, self.ohem_min_kept) if self.labeled_loss == "ohem" else None


def rampup(t: float, shape: str) -> float:
    """The ramp's factor at fraction ``t`` in [0, 1] of its length: ``sigmoid`` exp(-5 (1 - t)^2) (Mean
    Teacher's; 0.0067 at t = 0) or ``linear`` t; 1 at t = 1."""
    return math.exp(-5.0 * (1.0 - t) ** 2) if shape == "sigmoid" else t


@dataclass
class SSLConfig(MethodConfig):
    lambda_u: float = opt(1.0, "weight of the unlabeled loss")
    lambda_u_rampup: float = opt(
        0.0, "fraction of train.steps over which lambda_u ramps up (0: off, the full weight from step 0)"
    )
    lambda_u_rampup_shape: str = opt(
        "sigmoid", "shape of the lambda_u ramp: sigmoid exp(-5 (1 - t)^2) (Mean Teacher) or linear t"
    )

    def checks(self) -> list[Check]:
        return [
            *super().checks(),
            (0.0 <= self.lambda_u_rampup <= 1.0, "method.lambda_u_rampup", "in [0, 1] (a fraction of train.steps)"),
            (self.lambda_u_rampup_shape in RAMPUP_SHAPES, "method.lambda_u_rampup_shape", " or ".join(RAMPUP_SHAPES)),
        ]

    def lambda_u_at(self, step: int, total_steps: int) -> float:
        """The unlabeled weight at ``step`` (0-based) of ``total_steps``: ramped over the first
        ``lambda_u_rampup`` of training, then (and with the ramp off) exactly ``lambda_u``."""
        length = self.lambda_u_rampup * total_steps
        if step >= length:
            return self.lambda_u
        return self.lambda_u * rampup(step / length, self.lambda_u_rampup_shape)


@dataclass
class ThresholdConfig(SSLConfig):
    """The keys of a confidence threshold (FixMatch, FlexMatch, UniMatch, UDA)."""

    tau: float = opt(0.95, "confidence threshold of a pseudo-label (0: every one, UniMatch's Cityscapes release)")

    def checks(self) -> list[Check]:
        return [*super().checks(), (0.0 <= self.tau <= 1.0, "method.tau", "in [0, 1]")]


@dataclass
class StatisticsConfig(SSLConfig):
    """The keys of methods that keep EMA statistics of the model's confidence (FreeMatch, SoftMatch)."""

    ema_m: float = opt(0.999, "EMA momentum of the method's confidence statistics")

    def checks(self) -> list[Check]:
        return [*super().checks(), (0.0 <= self.ema_m < 1.0, "method.ema_m", "in [0, 1)")]


class Method:
    """A method built from its config section. The base trains on labeled images only (supervised);
    ``SSLMethod`` adds the unlabeled term. Set by ``METHODS.register``: name, description, tasks."""

    name: ClassVar[str]
    description: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    semi_supervised: ClassVar[bool] = False
    records_selection: ClassVar[bool] = False  # keep a few training selections for a plot (CSL)
    #: segmentation presets: (model, output stride, as descriptions say it) where the release's differs
    published_backbone: ClassVar[tuple[str, int, str] | None] = None
    #: task -> where this method's idea is found there, for a task it does not train (FixMatch: UniMatch)
    elsewhere: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector | None:
        """The pseudo-label selector (None: no unlabeled term)."""
        return None

    def trusted_mask_view(self) -> tuple[int, float] | None:
        """Segmentation: (cell, cover) of CSL's TMP view, which replaces the second strong view; None: none."""
        return None

    def classification_step(
        self, model: nn.Module, batch: Batch, selector: Selector | None, step: int, total_steps: int
    ) -> StepOutput:
        return supervised_step(model, batch, step, total_steps)

    def segmentation_step(
        self, model: nn.Module, batch: SegBatch, selector: Selector | None, step: int, total_steps: int
    ) -> StepOutput:
        return supervised_pixel_step(model, batch, step, total_steps, self.cfg.ohem())


class SSLMethod(Method):
    """A semi-supervised method: FixMatch's weak-to-strong step in classification, UniMatch's in
    segmentation, with this method's selector."""

    semi_supervised = True
    cfg: SSLConfig

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        raise NotImplementedError

    def classification_step(
        self, model: nn.Module, batch: Batch, selector: Selector | None, step: int, total_steps: int
    ) -> StepOutput:
        assert selector is not None
        lambda_u = self.cfg.lambda_u_at(step, total_steps)
        return weak_to_strong_step(model, batch, selector, lambda_u, step, total_steps)

    def segmentation_step(
        self, model: nn.Module, batch: SegBatch, selector: Selector | None, step: int, total_steps: int
    ) -> StepOutput:
        assert selector is not None
        return unimatch_step(
            model, batch, selector, self.cfg.lambda_u_at(step, total_steps), step, total_steps, self.cfg.ohem()
        )

    def unlabeled_loss(
        self,
        selector: Selector,
        weak_logits: Tensor,
        strong_logits: Tensor,
        indices: Tensor,
        step: int,
        total: int,
        update: bool,
    ) -> Tensor:
        """The weighted unlabeled term of another forward at ``step`` of ``total`` (CalibrateMix's faithful
        second pass, weighted as the step's own); ``update``: the selector's statistics move again (the
        release's hooks), else they are only read."""
        with torch.no_grad():
            selection = selector.select(weak_logits.detach().softmax(dim=1), indices, update=update)
        return self.cfg.lambda_u_at(step, total) * consistency_loss(strong_logits, selection)


class MethodRegistry(Registry[type[Method]]):
    """``METHODS``: name -> ``Method`` subclass, in registration order, with its description and tasks."""

    def register(  # type: ignore[override]
        self, name: str, *, description: str, tasks: tuple[str, ...]
    ) -> Callable[[type[Method]], type[Method]]:
        def add(cls: type[Method]) -> type[Method]:
            cls.name, cls.description, cls.tasks = name, description, tasks  # what a method object reads
            return Registry.register(self, name, description=description, tasks=tasks)(cls)

        return add

    def for_task(self, task: str) -> list[str]:
        """The methods that train ``task``, in registration order."""
        return [name for name, cls in self._items.items() if task in cls.tasks]

    def tasks(self) -> tuple[str, ...]:
        """Every task some method trains: the task names config knows without importing the tasks."""
        return tuple(dict.fromkeys(t for cls in self._items.values() for t in cls.tasks))


METHODS = MethodRegistry("method")


def method_config(name: str, **values: Any) -> MethodConfig:
    """The config section of method ``name`` with ``values`` set (its defaults elsewhere)."""
    return METHODS.get(name).Config(name=name, **values)


def build_method(cfg: MethodConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)
