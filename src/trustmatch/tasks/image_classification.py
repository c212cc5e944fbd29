"""Image classification: in-memory (or memory-mapped) uint8 sets, views on the device, the method's
weak-to-strong step, streaming accuracy and calibration metrics with a temperature fitted on validation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from trustmatch import models
from trustmatch.config import Config
from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError
from trustmatch.core.precision import Precision
from trustmatch.data import load_ssl_data
from trustmatch.data.views import Views, to_device
from trustmatch.evaluation.forward import iter_logits
from trustmatch.evaluation.metrics import ClassificationMeter
from trustmatch.evaluation.temperature import Temperature, fit_temperature, scale_logits
from trustmatch.methods.weak_to_strong import Batch
from trustmatch.models import MODELS, is_segmentation_model
from trustmatch.reporting.task_display import DISPLAYS
from trustmatch.tasks.task import Evaluation, SSLTask, StepOutput

SPLITS = ("val", "test")


def check_model_options(cfg: Config) -> None:
    """``model.*`` and ``train.freeze`` against the network, before the data load: an unknown ``timm:`` name
    (with the closest names), ImageNet weights it cannot have, a backbone it cannot freeze. A weights file is
    checked by the trainer (``weights.check_source``) and read when the model is built."""
    name, weights = cfg.model.name, cfg.model.weights
    models.is_classifier(name)  # a timm name is checked here (else build_model names the closest model)
    if weights == "imagenet" and not models.takes_input(name):
        raise UserError(
            f"model.weights=imagenet: {name} has no ImageNet weights (it is trained from scratch); "
            f"use timm:<name> (timm:resnet50, timm:vit_small_patch16_224), a weights file or model.weights=none"
        )
    models.check_weights(name, weights)
    if cfg.train.layer_decay != 1.0 and not models.takes_input(name):
        raise UserError(
            f"train.layer_decay={cfg.train.layer_decay} needs a network with layers by depth (timm:<name> or USB's "
            f"ViTs); {name} has none: set train.layer_decay=1"
        )
    if cfg.train.freeze and not models.takes_input(name):
        raise UserError(
            f"train.freeze=true trains only the head of a pretrained backbone: {name} is trained from scratch; "
            f"use timm:<name> or USB's ViTs with model.weights, or train.freeze=false"
        )


def follow_model_input(cfg: Config) -> models.InputConfig | None:
    """The input the network's weights expect, written into the config where the user left it open
    (``data.image_size``, ``data.interpolation``), so config.yaml and inference see the resolved values."""
    spec = models.input_config(cfg.model.name)
    if spec is not None:
        if cfg.data.image_size is None:
            cfg.data.image_size = spec.size
        if cfg.data.interpolation is None:
            cfg.data.interpolation = spec.interpolation
    return spec


def _channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """RGB statistics for a grayscale set: their mean (timm sums a pretrained first conv over RGB for 1 channel)."""
    return values if len(values) == channels else (sum(values) / len(values),) * channels


class ClassificationTask(SSLTask):
    primary = "accuracy"
    calibration_metric = DISPLAYS["classification"].calibration_metric
    nll_metric = "nll"
    diagram_unit = DISPLAYS["classification"].diagram_unit
    curves = DISPLAYS["classification"].curves

    def __init__(self, cfg: Config, precision: Precision) -> None:
        super().__init__(cfg, precision)
        if is_segmentation_model(cfg.model.name):
            raise UserError(
                f"model.name={cfg.model.name!r} is a segmentation network: classification needs one of "
                f"{', '.join(sorted(MODELS.where(task='classification')))}, timm:<name> (or task=segmentation)"
            )
        check_model_options(cfg)
        self.share_batch()
        spec = follow_model_input(cfg)
        self.data = d = load_ssl_data(cfg.data, cfg.seed)
        if spec is not None and spec.mean is not None and cfg.model.weights != "none":  # what the weights saw
            channels = d.labeled.images.shape[1]
            d.mean, d.std = _channels(spec.mean, channels), _channels(spec.std, channels)
        self.views = Views(
            d.mean,
            d.std,
            d.hflip,
            translate=1.0 - cfg.data.crop_ratio,
            n_ops=cfg.data.strong_ops,
            magnitude=cfg.data.strong_magnitude,
        )
        self.ulb_labels_known = bool((d.unlabeled.labels >= 0).any())
        self.start(len(d.labeled), len(d.unlabeled), d.num_classes)

    @classmethod
    def model_for(cls, meta: dict[str, Any], **options: Any) -> nn.Module:
        """timm classifiers and USB's ViTs are built at the data's side (a ViT's position embeddings)."""
        if models.takes_input(meta["config"]["model"]["name"]):
            options["image_size"] = meta["image_size"]
        return super().model_for(meta, **options)

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        model = super().build_model(initial_weights)
        if self.cfg.train.freeze:
            model.freeze_body()
        return model

    def next_batch(self, generator: torch.Generator) -> Batch:
        """Gather the next labeled (and unlabeled) batch and build its views on the device (copies from pinned
        memory on CUDA: none waits)."""
        d, dev, layout = self.data, self.device, self.precision.layout
        idx_lb = self.streams["lb_stream"].next()
        x_lb = self.views.weak(to_device(d.labeled.images[idx_lb], dev), generator)
        batch = Batch(layout(x_lb), to_device(d.labeled.labels[idx_lb], dev), to_device(idx_lb, dev))
        if self.selector is not None:
            idx_ulb = self.streams["ulb_stream"].next()
            u = to_device(d.unlabeled.images[idx_ulb], dev)
            batch.u_weak = layout(self.views.weak(u, generator))
            batch.u_strong = layout(self.views.strong(u, generator))
            batch.idx_ulb = to_device(idx_ulb, dev)
            if self.ulb_labels_known:
                batch.y_ulb = to_device(d.unlabeled.labels[idx_ulb], dev)
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

    def _logits(self, model: nn.Module, split: str, shard: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        images = self.split_data(split)
        batches = iter_logits(
            model, images.images, self.views.plain, self.precision, self.cfg.train.eval_batch_size, shard=shard
        )
        for index, logits in batches:
            yield logits, images.labels[index].to(self.device)

    def evaluate(self, model: nn.Module, split: str, temperature: Temperature | None = None) -> Evaluation:
        return self._score(self._logits(model, split), temperature)

    def split_logits(self, model: nn.Module, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        return self._logits(model, split, shard=False)

    def _score(self, batches: Iterable[tuple[Tensor, Tensor]], temperature: Temperature | None) -> Evaluation:
        """``evaluate``'s metrics of this process's (logits, labels) batches, reduced over processes."""
        meters = [ClassificationMeter(self.data.num_classes, self.device) for _ in range(1 + (temperature is not None))]
        for logits, labels in batches:
            meters[0].update(logits, labels)
            if temperature is not None:
                meters[1].update(scale_logits(logits, temperature), labels)
        for meter in meters:
            meter.all_reduce()
        evaluation = Evaluation(meters[0].compute(), meters[0].bins(15), risk_coverage=meters[0].risk_coverage())
        if temperature is not None:
            evaluation.calibrated, evaluation.calibrated_detail = meters[1].compute(), meters[1].bins(15)
            evaluation.calibrated_risk_coverage = meters[1].risk_coverage()
        return evaluation

    def selective_units(
        self, model: nn.Module, split: str, temperature: Temperature | None = None
    ) -> tuple[Tensor, Tensor]:
        """The raw top-class probability softmax(z) (``predict``'s ``raw_confidence``) and the 0/1 error per
        image with a known label (an unlabeled split keeps its labels where known, for diagnostics). The score
        leaves the temperature out: fitted on the validation split that certifies, it could reorder images
        (with more than two classes softmax(z / T)'s maximum is not monotone in softmax(z)'s); a single
        temperature changes no predicted class, so the error is the same either way."""
        images, scores, losses = self.split_data(split), [], []
        size = self.cfg.train.eval_batch_size
        for index, logits in iter_logits(model, images.images, self.views.plain, self.precision, size):
            confidence, prediction = logits.float().softmax(dim=1).max(dim=1)
            labels = images.labels[index].to(self.device)
            known = labels >= 0
            scores.append(confidence[known].double().cpu())
            losses.append((prediction != labels)[known].double().cpu())
        return torch.cat(scores), torch.cat(losses)

    def validate(self, model: nn.Module) -> tuple[dict[str, float], float | None]:
        metrics, temperature, _ = self._validate(model, report=False)
        return metrics, temperature

    def validate_as_report(self, model: nn.Module) -> tuple[dict[str, float], float | None, Evaluation]:
        metrics, temperature, evaluation = self._validate(model, report=True)
        assert evaluation is not None
        return metrics, temperature, evaluation

    def _validate(self, model: nn.Module, report: bool) -> tuple[dict[str, float], float | None, Evaluation | None]:
        """One pass: the validation split is small (a few labels per class), so its logits are
        gathered from every process; each scores them and fits T (minimising their NLL) alike. With
        ``report``, this process's batches are scored again as ``evaluate("val", T)`` scores them."""
        batches = list(self._logits(model, "val"))
        logits = [torch.empty(0, self.data.num_classes, device=self.device), *(z for z, _ in batches)]
        labels = [self.data.val.labels[:0].to(self.device), *(y for _, y in batches)]
        all_logits, all_labels = dist.all_gather_cat(torch.cat(logits)), dist.all_gather_cat(torch.cat(labels))
        meter = ClassificationMeter(self.data.num_classes, self.device)
        meter.update(all_logits, all_labels)
        temperature = fit_temperature(all_logits, all_labels)
        return meter.compute(), temperature, self._score(batches, temperature) if report else None

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
        images, size = self.split_data(split).images, self.cfg.train.eval_batch_size
        batches = iter_logits(model, images, self.views.plain, self.precision, size)
        top = [z.softmax(dim=1).max(dim=1) for _, z in batches]  # kept per sample, never [N, K]
        return torch.cat([t.values.cpu() for t in top]), torch.cat([t.indices.cpu() for t in top])
