"""Tasks by name (``task`` in the config): classification today, segmentation next."""

from __future__ import annotations

from trustmatch.registry import Registry
from trustmatch.tasks.base import Evaluation, Regularizer, Stateful, StepOutput, Task
from trustmatch.tasks.classification import ClassificationTask

__all__ = ["TASKS", "Evaluation", "Regularizer", "Stateful", "StepOutput", "Task"]

TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("classification")(ClassificationTask)
