"""Image classification: in-memory uint8 sets, views on the device, the FixMatch-family step,
streaming accuracy and calibration metrics, reliability diagrams, CSV predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmatch.classification import Batch, supervised_step, weak_to_strong_step
from trustmatch.config import Config
from trustmatch.data import load_ssl_data
from trustmatch.data.sampler import IndexStream
from trustmatch.data.views import Views
from trustmatch.engine.inference import iter_logits
from trustmatch.engine.precision import Precision
from trustmatch.metrics import ClassificationMeter
from trustmatch.models import build_model
from trustmatch.predict import write_predictions
from trustmatch.report import reliability_diagram, training_curves
from trustmatch.selection import build_selector
from trustmatch.tasks.base import Evaluation, Stateful, StepOutput, Task

SPLITS = ("val", "test")


class ClassificationTask(Task):
    primary = "accuracy"

    def __init__(self, cfg: Config, precision: Precision) -> None:
        super().__init__(cfg, precision)
        self.data = d = load_ssl_data(cfg.data, cfg.seed)
        self.views = Views(d.mean, d.std, d.hflip, n_ops=cfg.data.strong_ops, magnitude=cfg.data.strong_magnitude)
        t = cfg.train
        self.lb_stream = IndexStream(len(d.labeled), t.batch_size, cfg.seed)
        self.selector = None
        if cfg.method.name != "supervised":
            self.selector = build_selector(cfg.method, d.num_classes, len(d.unlabeled)).to(self.device)
            self.ulb_stream = IndexStream(len(d.unlabeled), t.batch_size * t.uratio, cfg.seed + 1)
            self.ulb_labels_known = bool((d.unlabeled.labels >= 0).any())

    @classmethod
    def model_for(cls, meta: dict[str, Any]) -> nn.Module:
        """The network a checkpoint's metadata describes (training and inference build the same)."""
        model = meta["config"]["model"]
        return build_model(
            model["name"],
            len(meta["classes"]),
            meta["channels"],
            bn_momentum=model["bn_momentum"],
            dropout=model["dropout"],
        )

    def state_parts(self) -> dict[str, Stateful]:
        parts: dict[str, Stateful] = {"lb_stream": self.lb_stream}
        if self.selector is not None:
            parts.update(selector=self.selector, ulb_stream=self.ulb_stream)
        return parts

    def next_batch(self, generator: torch.Generator) -> Batch:
        """Gather the next labeled (and unlabeled) batch and build its views on the device."""
        d, dev, layout = self.data, self.device, self.precision.layout
        idx_lb = self.lb_stream.next()
        x_lb = self.views.weak(d.labeled.images[idx_lb].to(dev, non_blocking=True), generator)
        batch = Batch(layout(x_lb), d.labeled.labels[idx_lb].to(dev), idx_lb.to(dev))
        if self.selector is not None:
            idx_ulb = self.ulb_stream.next()
            u = d.unlabeled.images[idx_ulb].to(dev, non_blocking=True)
            batch.u_weak = layout(self.views.weak(u, generator))
            batch.u_strong = layout(self.views.strong(u, generator))
            batch.idx_ulb = idx_ulb.to(dev)
            if self.ulb_labels_known:
                batch.y_ulb = d.unlabeled.labels[idx_ulb].to(dev)
        return batch

    def step(self, model: nn.Module, batch: Batch, step: int, total_steps: int) -> StepOutput:
        if self.selector is None:
            return supervised_step(model, batch, step, total_steps)
        return weak_to_strong_step(model, batch, self.selector, self.cfg.method.lambda_u, step, total_steps)

    def train_stats(self) -> dict[str, float]:
        return self.selector.stats() if self.selector is not None else {}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"accuracy {metrics['accuracy']:.4f} ece15 {metrics['ece_15']:.4f} nll {metrics['nll']:.4f}"

    def score(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """Validation accuracy, ties broken by lower NLL."""
        return (metrics["accuracy"], -metrics["nll"])

    def has_split(self, split: str) -> bool:
        return split in SPLITS and len(getattr(self.data, split)) > 0

    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        images = getattr(self.data, split)
        meter = ClassificationMeter(self.data.num_classes, self.device)
        batches = iter_logits(
            model, images.images, self.views.plain, self.precision, self.cfg.train.eval_batch_size, shard=True
        )
        for index, logits in batches:
            meter.update(logits, images.labels[index].to(self.device))
        meter.all_reduce()
        return Evaluation(meter.compute(), meter.bins(15))

    def summary(self) -> str:
        return f"{self.cfg.data.name}: {self.data.summary()}"

    def split_sizes(self) -> dict[str, int]:
        d = self.data
        return {"labeled": len(d.labeled), "unlabeled": len(d.unlabeled), "val": len(d.val), "test": len(d.test)}

    def meta(self) -> dict[str, Any]:
        d = self.data
        return {
            "config": self.cfg.to_dict(),
            "classes": d.classes,
            "mean": list(d.mean),
            "std": list(d.std),
            "channels": int(d.labeled.images.shape[1]),
            "image_size": int(d.labeled.images.shape[-1]),
        }

    def write_artefacts(self, evaluation: Evaluation, stem: Path, title: str) -> None:
        reliability_diagram(evaluation.detail, stem.with_suffix(".png"), title, evaluation.metrics["ece_15"])

    def write_history(self, history: list[dict[str, Any]], run_dir: Path) -> None:
        training_curves(history, run_dir / "curves.png")

    @classmethod
    def predict(
        cls, model: nn.Module, meta: dict[str, Any], inputs: list[Path], out: Path, precision: Precision
    ) -> int:
        return write_predictions(model, meta, inputs, out, precision)
