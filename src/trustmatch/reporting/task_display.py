"""How each task's evaluations are drawn, by task name: the calibration metric a reliability diagram shows,
what one sample of that diagram is, and the panels of the curves over a run's evaluations.

The tasks take these class attributes from here, and the HTML report reads them here, so that drawing a
finished run's page never imports the tasks (and with them the data loaders and torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskDisplay:
    calibration_metric: str  # the calibration error of an evaluation's metrics; its bins make the diagram
    curves: tuple[tuple[str, str], ...]  # (metric, label) panels of the curves over the run's evaluations
    diagram_unit: str = ""  # what one sample of a diagram is, where not an image


DISPLAYS = {
    "classification": TaskDisplay("ece_15", (("accuracy", "accuracy"), ("ece_15", "ECE (15 bins)"))),
    "segmentation": TaskDisplay(
        "pixel_ece_15", (("miou", "mIoU"), ("pixel_ece_15", "pixel ECE (15 bins)")), ", per pixel"
    ),  # every labeled pixel of the split is one sample of the diagram
}
