"""The plots of a run's evaluations, drawn from what a task declares (its calibration metric, the unit
of a diagram's samples, its curves): tasks compute, the run layer draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustmatch.evaluation.temperature import Temperature, describe_temperature
from trustmatch.reporting.plots import reliability_diagram, training_curves
from trustmatch.tasks import Evaluation, Task


def write_diagram(task: Task, evaluation: Evaluation, stem: Path, title: str) -> Path:
    """The reliability diagram of one evaluation at ``stem``.png (segmentation: every labeled pixel)."""
    ece = evaluation.metrics[task.calibration_metric]
    return reliability_diagram(evaluation.detail, stem.with_suffix(".png"), title + task.diagram_unit, ece)


def write_curves(task: Task, history: list[dict[str, Any]], run_dir: Path) -> Path:
    """``curves.png``: the task's headline and calibration metrics over the run's evaluations."""
    return training_curves(history, run_dir / "curves.png", task.curves)


def write_final_plots(
    task: Task,
    test: Evaluation,
    temperature: Temperature | None,
    history: list[dict[str, Any]],
    run_dir: Path,
    step: int,
) -> None:
    """The final model's diagrams (raw, and temperature-scaled where a temperature was fitted) and curves."""
    title = f"final EMA model (step {step})"
    write_diagram(task, test, run_dir / "reliability_final", title)
    if test.calibrated is not None and temperature is not None:
        calibrated = Evaluation(test.calibrated, test.calibrated_detail)
        scaled = f"{title}\ntemperature {describe_temperature(temperature)}, fitted on validation"
        write_diagram(task, calibrated, run_dir / "reliability_final_calibrated", scaled)
    write_curves(task, history, run_dir)
