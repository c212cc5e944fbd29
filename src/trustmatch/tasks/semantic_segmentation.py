"""Semantic segmentation: image/mask crops with joint transforms, the method's step (UniMatch's with its
per-pixel selector; CSL's with TMP), streaming mIoU and pixel calibration with a temperature fitted on a
bounded sample of validation pixels, prediction overlays.

Crops are cut on the CPU (in ``data.workers`` threads for files: decoding dominates there) with
parameters drawn from the run's generator in the main thread, so a batch is a pure function of the
generator state and resume stays bit-exact; the photometric strong views and CutMix run on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trustmatch.config import Config
from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError
from trustmatch.core.labels import IGNORE
from trustmatch.core.precision import Precision
from trustmatch.data.seg_sets import SegmentationSet, load_segmentation_data
from trustmatch.data.segviews import SegViews
from trustmatch.data.views import to_device
from trustmatch.evaluation.forward import segment
from trustmatch.evaluation.kept_batches import KeptBatches
from trustmatch.evaluation.metrics import SegmentationMeter
from trustmatch.evaluation.pixel_pool import PixelPool
from trustmatch.evaluation.temperature import Temperature, fit_class_temperatures, fit_temperature, scale_logits
from trustmatch.methods.unimatch_step import SegBatch
from trustmatch.models import SEGMENTATION_MODELS, is_segmentation_model
from trustmatch.reporting.plots import segmentation_overlays
from trustmatch.reporting.task_display import DISPLAYS
from trustmatch.tasks.task import Evaluation, SSLTask, StepOutput

SPLITS = ("val", "test")
OVERLAY_IMAGES = 4


class SegmentationTask(SSLTask):
    primary = "miou"
    calibration_metric = DISPLAYS["segmentation"].calibration_metric
    nll_metric = "pixel_nll"
    diagram_unit = DISPLAYS["segmentation"].diagram_unit
    curves = DISPLAYS["segmentation"].curves
    certify_bound = "betting"  # an image's pixel error rate lies in [0, 1]: not a binomial count
    certify_unit = (
        "image (its mean raw pixel confidence, before any temperature; precision: the pixel accuracy of its "
        "mask, averaged over accepted images)"
    )

    def __init__(self, cfg: Config, precision: Precision) -> None:
        super().__init__(cfg, precision)
        self.fits_temperature = cfg.eval.pixel_temperature != "off"
        if not is_segmentation_model(cfg.model.name):
            raise UserError(
                f"model.name={cfg.model.name!r} is a classifier: segmentation needs one of "
                f"{', '.join(SEGMENTATION_MODELS)} or smp:<encoder>"
            )
        self.share_batch()
        self.data = d = load_segmentation_data(cfg.data, cfg.seed)
        if not any(s is not None and len(s) for s in (d.val, d.test)):
            raise UserError(
                f"{cfg.data.name}: nothing to evaluate on: give data.val_dir and/or data.test_dir "
                "(folders with images/ and masks/)"
            )
        self.views = SegViews(d.mean, d.std, cfg.data.crop_size, hflip=d.hflip)
        self.trusted_mask = self.method.trusted_mask_view()  # CSL's (cell, cover), replacing the second strong view
        if self.method.semi_supervised:
            if d.unlabeled is None or len(d.unlabeled) == 0:
                where = "data.unlabeled_dir" if cfg.data.name == "folder" else "an unlabeled.txt beside labeled.txt"
                raise UserError(
                    f"method {cfg.method.name!r} needs unlabeled images and {cfg.data.name} has none: "
                    f"give {where} (or use method.name=supervised)"
                )
        num_unlabeled = len(d.unlabeled) if d.unlabeled is not None else 0
        self.start(len(d.labeled), num_unlabeled, len(d.classes), unlabeled_streams=2)  # + the CutMix partners

    @classmethod
    def model_for(cls, meta: dict[str, Any], **options: Any) -> nn.Module:
        return super().model_for(meta, output_stride=meta["config"]["model"]["output_stride"], **options)

    def _crops(
        self, dataset: SegmentationSet, stream: str, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        crops = self.views.crops(dataset, self.streams[stream].next(), generator, self.cfg.data.workers)
        return tuple(t if t is None else to_device(t, self.device) for t in crops)  # type: ignore[return-value]

    def next_batch(self, generator: torch.Generator) -> SegBatch:
        """Labeled crops; with a semi-supervised method also u's weak view, its strong views CutMixed with
        the partner batch's (two for UniMatch, one beside the TMP view for CSL) and the partner's weak view."""
        d, views, layout = self.data, self.views, self.precision.layout
        images, masks, _ = self._crops(d.labeled, "lb_stream", generator)
        batch = SegBatch(layout(views.plain(images)), masks.long())
        if self.selector is None:
            return batch
        assert d.unlabeled is not None
        u, pad_u, truth_u = self._crops(d.unlabeled, "ulb_stream", generator)
        m, pad_m, _ = self._crops(d.unlabeled, "mix_stream", generator)
        views_per_image = 1 if self.trusted_mask else 2
        strong = [views.strong(u, generator) for _ in range(views_per_image)]
        partner = [views.strong(m, generator) for _ in range(views_per_image)]
        boxes = tuple(views.cutmix_boxes(len(u), generator, self.device) for _ in range(views_per_image))
        mixed = [torch.where(box[:, None], p, s) for box, p, s in zip(boxes, partner, strong)]
        batch.u_weak, batch.mix_weak = layout(views.plain(u)), layout(views.plain(m))
        batch.u_strong = tuple(layout(x) for x in mixed)
        batch.valid_u, batch.valid_mix, batch.boxes = pad_u != IGNORE, pad_m != IGNORE, boxes
        if self.trusted_mask:
            cell, cover = self.trusted_mask
            u_tmp, batch.cover = views.trusted_mask_view(u, generator, cell, cover)
            batch.u_tmp = layout(u_tmp)
        batch.truth_u = truth_u.long() if truth_u is not None else None
        return batch

    def method_step(self, model: nn.Module, batch: SegBatch, step: int, total_steps: int) -> StepOutput:
        return self.method.segmentation_step(model, batch, self.selector, step, total_steps)

    def truth(self, batch: SegBatch) -> tuple[Tensor | None, Tensor | None]:
        return batch.truth_u, batch.valid_u

    # ------------------------------------------------------------------ evaluation

    def has_split(self, split: str) -> bool:
        dataset = getattr(self.data, split, None) if split in SPLITS else None
        return dataset is not None and dataset.has_masks and len(dataset) > 0

    def _batches(self, dataset: SegmentationSet, indices: list[int]) -> Iterator[tuple[Tensor, Tensor | None]]:
        """uint8 images and masks: stacked where every image has one size, else one image at a time;
        files are decoded a few at a time in ``data.workers`` threads."""
        workers = self.cfg.data.workers
        size = self.cfg.train.eval_batch_size if dataset.fixed_size is not None else 1
        chunk = size if dataset.fixed_size is not None else max(1, 2 * workers)
        for start in range(0, len(indices), chunk):
            loaded = self.views.load(dataset, indices[start : start + chunk], workers)
            for first in range(0, len(loaded), size):
                group = loaded[first : first + size]
                masks = [mask for _, mask in group]
                yield torch.stack([image for image, _ in group]), None if masks[0] is None else torch.stack(masks)

    def _logits(self, model: nn.Module, images: Tensor) -> Tensor:
        x = self.views.plain(images.to(self.device, non_blocking=True))  # segment puts it in the model's layout
        return segment(model, x, self.precision, self.cfg.data.crop_size if self.cfg.data.sliding_window else None)

    def evaluate(self, model: nn.Module, split: str, temperature: Temperature | None = None) -> Evaluation:
        return self._evaluate(model, split, temperature)

    def split_logits(self, model: nn.Module, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = self.split_data(split)
        for logits, masks, _ in self._predict(model, dataset, list(range(len(dataset)))):
            yield logits, masks

    def _shard(self, dataset: SegmentationSet) -> list[int]:
        """This process's images of ``dataset``: every world_size-th."""
        return list(range(dist.rank(), len(dataset), dist.world_size()))

    def _predict(
        self, model: nn.Module, dataset: SegmentationSet, indices: list[int]
    ) -> Iterator[tuple[Tensor, Tensor, list[int]]]:
        """(logits, masks on the device, the batch's image indices) of ``indices``, batch by batch."""
        done = 0
        for images, masks in self._batches(dataset, indices):
            yield self._logits(model, images), masks.to(self.device), indices[done : done + len(images)]
            done += len(images)

    def _scores(
        self, meter: SegmentationMeter
    ) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, list[float]]]:
        """A meter's metrics over every process, with the per-class IoU, its bins and its risk-coverage curve."""
        meter.all_reduce()
        metrics: dict[str, Any] = meter.compute()
        metrics["per_class_iou"] = dict(zip(self.data.classes, meter.per_class_iou()))
        return metrics, meter.bins(), meter.risk_coverage()

    def _evaluate(
        self,
        model: nn.Module,
        split: str,
        temperature: Temperature | None = None,
        pool: PixelPool | None = None,
        keep: KeptBatches | None = None,
    ) -> Evaluation:
        """One pass over this process's share of ``split``: raw metrics, scaled ones with a ``temperature``,
        the sampled pixels in ``pool`` and the first batches in ``keep``."""
        dataset, classes = self.split_data(split), len(self.data.classes)
        meters = [SegmentationMeter(classes, self.device) for _ in range(1 + (temperature is not None))]
        for logits, masks, images in self._predict(model, dataset, self._shard(dataset)):
            meters[0].update(logits, masks)
            if temperature is not None:
                meters[1].update(scale_logits(logits, temperature), masks)
            if pool is not None:
                pool.add(logits, masks, images)
            if keep is not None:
                keep.add(logits, masks)
        metrics, bins, curve = self._scores(meters[0])
        evaluation = Evaluation(metrics, bins, risk_coverage=curve)
        if temperature is not None:
            evaluation.calibrated, evaluation.calibrated_detail, evaluation.calibrated_risk_coverage = self._scores(
                meters[1]
            )
        return evaluation

    def selective_units(
        self, model: nn.Module, split: str, temperature: Temperature | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per image: the mean over all its pixels of the raw top-class probability (``predict`` sees no mask;
        no temperature, which was fitted on validation, so the order of the images does not depend on that
        split) and the pixel error rate over its labeled pixels of the mask predicted with ``temperature``
        (an unlabeled split's truth masks where it keeps them). Images without a labeled pixel, or without
        truth, have no loss and are left out."""
        dataset = self.split_data(split)
        indices, scores, losses = list(range(len(dataset))), [], []
        done = 0
        for images, masks in self._batches(dataset, indices):
            if masks is None:  # an unlabeled split: its truth, known only for diagnostics (digitscenes)
                truths = [dataset.truth(i) for i in indices[done : done + len(images)]]
                shape = (len(images), *images.shape[2:])
                masks = torch.stack(truths) if None not in truths else torch.full(shape, IGNORE, dtype=torch.uint8)
            done += len(images)
            logits = self._logits(model, images)
            confidence, prediction = logits.float().softmax(dim=1).max(dim=1)
            if temperature is not None:  # the mask predict writes (per-class T can change a pixel's class)
                prediction = scale_logits(logits, temperature).softmax(dim=1).max(dim=1).indices
            masks = masks.to(self.device).long()
            valid = masks != IGNORE
            wrong = ((prediction != masks) & valid).sum(dim=(1, 2)).double()
            count = valid.sum(dim=(1, 2)).double()
            scores.append(confidence.double().mean(dim=(1, 2))[count > 0].cpu())
            losses.append((wrong / count.clamp(min=1))[count > 0].cpu())
        return torch.cat(scores), torch.cat(losses)

    def validate(self, model: nn.Module) -> tuple[dict[str, float], Temperature | None]:
        metrics, temperature, _ = self._validate(model, report=False)
        return metrics, temperature

    def validate_as_report(self, model: nn.Module) -> tuple[dict[str, float], Temperature | None, Evaluation]:
        metrics, temperature, evaluation = self._validate(model, report=True)
        assert evaluation is not None
        return metrics, temperature, evaluation

    def _validate(
        self, model: nn.Module, report: bool
    ) -> tuple[dict[str, float], Temperature | None, Evaluation | None]:
        """One pass: validation metrics and the temperature (``eval.pixel_temperature``) fitted on a uniform
        sample of at most 2^20 of its labeled pixels (``PixelPool``), the same on every process;
        ``temperature_pixels`` is the sample's size. With ``report``, also ``evaluate("val", T)``: the same
        pass's metrics, and its kept batches scaled by T (``KeptBatches``: a large split's later images
        are predicted again)."""
        mode = self.cfg.eval.pixel_temperature
        pool = PixelPool(len(self.data.classes), self.device) if mode != "off" else None
        keep = KeptBatches() if report and pool is not None else None
        evaluation = self._evaluate(model, "val", pool=pool, keep=keep)
        metrics = dict(evaluation.metrics)  # temperature_pixels is validation's, not the report's
        if pool is None:
            return metrics, None, evaluation if report else None
        logits, labels = pool.pixels()
        metrics["temperature_pixels"] = len(labels)
        fit = fit_class_temperatures if mode == "per_class" else fit_temperature
        temperature = fit(logits, labels)
        if keep is not None and temperature is not None:
            scored = self._rescored(model, keep, temperature)
            evaluation.calibrated, evaluation.calibrated_detail, evaluation.calibrated_risk_coverage = scored
        return metrics, temperature, evaluation if report else None

    def _rescored(
        self, model: nn.Module, keep: KeptBatches, temperature: Temperature
    ) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, list[float]]]:
        """Validation's metrics scaled by ``temperature`` as ``_evaluate`` computes them: the kept batches,
        then the images after them predicted again, in the same batches and order."""
        dataset = self.split_data("val")
        meter = SegmentationMeter(len(self.data.classes), self.device)
        rest = self._predict(model, dataset, self._shard(dataset)[keep.images :])
        for logits, masks, *_ in chain(keep.batches, rest):
            meter.update(scale_logits(logits, temperature), masks)
        return self._scores(meter)

    def describe(self, metrics: dict[str, float]) -> str:
        return f"miou {metrics['miou']:.4f} pixel_ece15 {metrics['pixel_ece_15']:.4f}"

    def score(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """Validation mIoU, ties broken by lower pixel NLL."""
        return (metrics["miou"], -metrics["pixel_nll"])

    # ------------------------------------------------------------------ description and artefacts

    def split_sizes(self) -> dict[str, int]:
        d = self.data
        sizes = {"labeled": len(d.labeled), "unlabeled": len(d.unlabeled) if d.unlabeled is not None else 0}
        return {**sizes, **{s: len(getattr(d, s)) if self.has_split(s) else 0 for s in SPLITS}}

    def meta(self) -> dict[str, Any]:
        d = self.data
        return {
            "config": self.cfg.to_dict(),
            "classes": d.classes,
            "palette": [list(c) for c in d.palette],
            "mean": list(d.mean),
            "std": list(d.std),
            "channels": 3,
            "crop_size": self.cfg.data.crop_size,
            "sliding_window": self.cfg.data.sliding_window,
        }

    def write_final(self, model: nn.Module, run_dir: Path) -> None:
        """Besides ``SSLTask``'s: prediction overlays of the first validation (else test) images, on the
        main process."""
        super().write_final(model, run_dir)
        if not dist.is_main():
            return
        split = next((s for s in SPLITS if self.has_split(s)), None)
        if split is None:
            return
        dataset = self.split_data(split)
        shown = list(range(min(OVERLAY_IMAGES, len(dataset))))
        images, masks, predictions = [], [], []
        for image, mask in self._batches(dataset, shown):
            predictions += list(self._logits(model, image).argmax(dim=1).cpu())
            images += list(image)
            masks += list(mask) if mask is not None else [None] * len(image)
        title = f"final EMA model, {split} images: image | ground truth | prediction"
        names = [dataset.name(i) for i in shown]
        segmentation_overlays(images, masks, predictions, self.data.palette, run_dir / "overlays.png", title, names)
