"""Tasks by name (``task`` in the config): classification and segmentation."""

from __future__ import annotations

from trustmatch.registry import Registry
from trustmatch.tasks.base import Evaluation, Regularizer, Stateful, StepOutput, Task
from trustmatch.tasks.classification import ClassificationTask
from trustmatch.tasks.segmentation import SegmentationTask

__all__ = ["TASKS", "Evaluation", "Regularizer", "Stateful", "StepOutput", "Task"]

TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("classification")(ClassificationTask)
TASKS.register("segmentation")(SegmentationTask)
