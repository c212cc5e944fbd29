"""Image classification: in-memory (or memory-mapped) uint8 sets, views on the device, the method's
weak-to-strong step, streaming accuracy and calibration metrics with a temperature fitted on validation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from trustmatch.config import Config
from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError
from trustmatch.core.precision import Precision
from trustmatch.data import load_ssl_data
from trustmatch.data.views import Views
from trustmatch.evaluation.forward import iter_logits
from trustmatch.evaluation.metrics import ClassificationMeter
from trustmatch.evaluation.temperature import Temperature, fit_temperature, scale_logits
from trustmatch.methods.weak_to_strong import Batch
from trustmatch.models import MODELS, is_segmentation_model
from trustmatch.tasks.task import Evaluation, SSLTask, StepOutput

SPLITS = ("val", "test")


class ClassificationTask(SSLTask):
    primary = "accuracy"
    calibration_metric = "ece_15"
    curves = (("accuracy", "accuracy"), ("ece_15", "ECE (15 bins)"))

    def __init__(self, cfg: Config, precision: Precision) -> None:
        super().__init__(cfg, precision)
        if is_segmentation_model(cfg.model.name):
            raise UserError(
                f"model.name={cfg.model.name!r} is a segmentation network: classification needs one of "
                f"{', '.join(sorted(MODELS.where(task='classification')))} (or task=segmentation)"
            )
        self.share_batch()
        self.data = d = load_ssl_data(cfg.data, cfg.seed)
        self.views = Views(d.mean, d.std, d.hflip, n_ops=cfg.data.strong_ops, magnitude=cfg.data.strong_magnitude)
        self.ulb_labels_known = bool((d.unlabeled.labels >= 0).any())
        self.start(len(d.labeled), len(d.unlabeled), d.num_classes)

    def next_batch(self, generator: torch.Generator) -> Batch:
        """Gather the next labeled (and unlabeled) batch and build its views on the device."""
        d, dev, layout = self.data, self.device, self.precision.layout
        idx_lb = self.streams["lb_stream"].next()
        x_lb = self.views.weak(d.labeled.images[idx_lb].to(dev, non_blocking=True), generator)
        batch = Batch(layout(x_lb), d.labeled.labels[idx_lb].to(dev), idx_lb.to(dev))
        if self.selector is not None:
            idx_ulb = self.streams["ulb_stream"].next()
            u = d.unlabeled.images[idx_ulb].to(dev, non_blocking=True)
            batch.u_weak = layout(self.views.weak(u, generator))
            batch.u_strong = layout(self.views.strong(u, generator))
            batch.idx_ulb = idx_ulb.to(dev)
            if self.ulb_labels_known:
                batch.y_ulb = d.unlabeled.labels[idx_ulb].to(dev)
        return batch

    def method_step(self, model: nn.Module, batch: Batch, step: int, total_steps: int) -> StepOutput:
        return self.method.classification_step(model, batch, self.selector, step, total_steps)

    def truth(self, batch: Batch) -> tuple[Tensor | None, Tensor | None]:
        return batch.y_ulb, None

    def describe(self, metrics: dict[str, float]) -> str:
        return f"accuracy {metrics['accuracy']:.4f} ece15 {metrics['ece_15']:.4f} nll {metrics['nll']:.4f}"

    def score(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """Validation accuracy, ties broken by lower NLL."""
        return (metrics["accuracy"], -metrics["nll"])

    def has_split(self, split: str) -> bool:
        return split in SPLITS and len(getattr(self.data, split)) > 0

    def _logits(self, model: nn.Module, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        images = getattr(self.data, split)
        batches = iter_logits(
            model, images.images, self.views.plain, self.precision, self.cfg.train.eval_batch_size, shard=True
        )
        for index, logits in batches:
            yield logits, images.labels[index].to(self.device)

    def evaluate(self, model: nn.Module, split: str, temperature: Temperature | None = None) -> Evaluation:
        meters = [ClassificationMeter(self.data.num_classes, self.device) for _ in range(1 + (temperature is not None))]
        for logits, labels in self._logits(model, split):
            meters[0].update(logits, labels)
            if temperature is not None:
                meters[1].update(scale_logits(logits, temperature), labels)
        for meter in meters:
            meter.all_reduce()
        evaluation = Evaluation(meters[0].compute(), meters[0].bins(15))
        if temperature is not None:
            evaluation.calibrated, evaluation.calibrated_detail = meters[1].compute(), meters[1].bins(15)
        return evaluation

    def validate(self, model: nn.Module) -> tuple[dict[str, float], float | None]:
        """One pass: the validation split is small (a few labels per class), so its logits are
        gathered from every process; each scores them and fits T (minimising their NLL) alike."""
        logits, labels = [torch.empty(0, self.data.num_classes, device=self.device)], [self.data.val.labels[:0]]
        for z, y in self._logits(model, "val"):
            logits.append(z)
            labels.append(y.cpu())
        all_logits = dist.all_gather_cat(torch.cat(logits))
        all_labels = dist.all_gather_cat(torch.cat(labels).to(self.device))
        meter = ClassificationMeter(self.data.num_classes, self.device)
        meter.update(all_logits, all_labels)
        return meter.compute(), fit_temperature(all_logits, all_labels)

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

    def sample_predictions(self, model: nn.Module, split: str) -> tuple[Tensor, Tensor]:
        images, size = getattr(self.data, split).images, self.cfg.train.eval_batch_size
        batches = iter_logits(model, images, self.views.plain, self.precision, size)
        top = [z.softmax(dim=1).max(dim=1) for _, z in batches]  # kept per sample, never [N, K]
        return torch.cat([t.values.cpu() for t in top]), torch.cat([t.indices.cpu() for t in top])
