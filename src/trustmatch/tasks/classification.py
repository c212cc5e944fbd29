"""Image classification: in-memory uint8 sets, views on the device, the FixMatch-family step,
streaming accuracy and calibration metrics, reliability diagrams, CSV predictions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trustmatch import distributed as dist
from trustmatch.calibratemix import NAME as CALIBRATEMIX
from trustmatch.calibratemix import CalibrateMix
from trustmatch.calibration import fit_temperature
from trustmatch.classification import Batch, consistency_loss, supervised_step, weak_to_strong_step
from trustmatch.config import Config
from trustmatch.cslplot import CSL_PLOT_TITLE, SelectionRecorder
from trustmatch.data import load_ssl_data
from trustmatch.data.sampler import IndexStream
from trustmatch.data.views import Views
from trustmatch.datamap import write_data_map
from trustmatch.engine.inference import iter_logits
from trustmatch.engine.precision import Precision
from trustmatch.errors import UserError
from trustmatch.metrics import ClassificationMeter
from trustmatch.models import MODELS, SEGMENTATION_MODELS, build_model
from trustmatch.predict import write_predictions
from trustmatch.report import reliability_diagram, training_curves
from trustmatch.selection import build_selector
from trustmatch.tasks.base import Evaluation, Stateful, StepOutput, Task

SPLITS = ("val", "test")


class ClassificationTask(Task):
    primary = "accuracy"

    def __init__(self, cfg: Config, precision: Precision) -> None:
        super().__init__(cfg, precision)
        if cfg.model.name in SEGMENTATION_MODELS:
            raise UserError(
                f"model.name={cfg.model.name!r} is a segmentation network: classification needs one of "
                f"{', '.join(n for n in MODELS.names() if n not in SEGMENTATION_MODELS)} (or task=segmentation)"
            )
        halves = cfg.calibratemix.mode != "off"  # CalibrateMix splits each process's batch in two halves
        dist.batch_share(cfg.train.batch_size, 2 if halves else 1, "CalibrateMix needs (it halves each batch)")
        self.data = d = load_ssl_data(cfg.data, cfg.seed)
        self.views = Views(d.mean, d.std, d.hflip, n_ops=cfg.data.strong_ops, magnitude=cfg.data.strong_magnitude)
        t = cfg.train  # global batches: each process takes batch_size / world_size of them (and uratio x)
        self.lb_stream = IndexStream(len(d.labeled), t.batch_size, cfg.seed)
        self.selector = None
        if cfg.method.name != "supervised":
            self.selector = build_selector(cfg.method, d.num_classes, len(d.unlabeled)).to(self.device)
            self.ulb_stream = IndexStream(len(d.unlabeled), t.batch_size * t.uratio, cfg.seed + 1)
            self.ulb_labels_known = bool((d.unlabeled.labels >= 0).any())
        self.recorder = SelectionRecorder(seed=cfg.seed) if cfg.method.name == "csl" else None
        if cfg.calibratemix.mode != "off":
            self.regularizers[CALIBRATEMIX] = CalibrateMix(
                cfg.calibratemix, len(d.labeled), len(d.unlabeled), d.num_classes, self._second_pass_unlabeled_loss
            )

    def _second_pass_unlabeled_loss(self, weak: Tensor, strong: Tensor, indices: Tensor) -> Tensor:
        """The base method's unlabeled loss on a second forward; its selector is read, not updated."""
        assert self.selector is not None
        with torch.no_grad():
            selection = self.selector.select(weak.detach().softmax(dim=1), indices, update=False)
        return self.cfg.method.lambda_u * consistency_loss(strong, selection)

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
        if self.recorder is not None:
            parts["csl_snapshots"] = self.recorder
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
        out = weak_to_strong_step(model, batch, self.selector, self.cfg.method.lambda_u, step, total_steps)
        if self.recorder is not None and out.selection is not None:
            self.recorder.observe(step, total_steps, out.selection, batch.y_ulb)
        return out

    def train_stats(self) -> dict[str, float]:
        return self.selector.stats() if self.selector is not None else {}

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

    def evaluate(self, model: nn.Module, split: str, temperature: float | None = None) -> Evaluation:
        meters = [ClassificationMeter(self.data.num_classes, self.device) for _ in range(1 + (temperature is not None))]
        for logits, labels in self._logits(model, split):
            meters[0].update(logits, labels)
            if temperature is not None:
                meters[1].update(logits.float() / temperature, labels)
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

    def write_final(self, model: nn.Module, run_dir: Path) -> None:
        """With CSL: the selection scatter of a few training batches. With CalibrateMix: the data map of
        every labeled and unlabeled sample (CSV + scatter)."""
        if not dist.is_main():
            return
        if self.recorder is not None:
            self.recorder.write(run_dir / "csl_selection.png", CSL_PLOT_TITLE)
        regularizer = self.regularizers.get(CALIBRATEMIX)
        if regularizer is None:
            return
        predictions = {}
        for split in ("labeled", "unlabeled"):
            images, size = getattr(self.data, split).images, self.cfg.train.eval_batch_size
            batches = iter_logits(model, images, self.views.plain, self.precision, size)
            top = [z.softmax(dim=1).max(dim=1) for _, z in batches]  # kept per sample, never [N, K]
            predictions[split] = torch.cat([t.values.cpu() for t in top]), torch.cat([t.indices.cpu() for t in top])
        write_data_map(regularizer, self.data, predictions, run_dir)

    def write_history(self, history: list[dict[str, Any]], run_dir: Path) -> None:
        training_curves(history, run_dir / "curves.png")

    predict = staticmethod(write_predictions)  # the CSV writer is the whole of classification's predict
