"""Tasks by name (``task`` in the config), each with the predictor ``trustmatch predict`` runs for it."""

from __future__ import annotations

from trustmatch.core.registry import Registry
from trustmatch.inference.predict_classes import write_predictions
from trustmatch.inference.predict_masks import write_masks
from trustmatch.tasks.image_classification import ClassificationTask
from trustmatch.tasks.semantic_segmentation import SegmentationTask
from trustmatch.tasks.task import Evaluation, Regularizer, SSLTask, Stateful, StepOutput, Task

__all__ = ["TASKS", "Evaluation", "Regularizer", "SSLTask", "Stateful", "StepOutput", "Task"]

TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("classification", predict=write_predictions)(ClassificationTask)  # a CSV of classes
TASKS.register("segmentation", predict=write_masks)(SegmentationTask)  # PNG masks (and confidence maps)
