"""What the HTML report shows of one run: its files (``metrics.json``, ``train_log.jsonl``, PNGs it wrote)
and what its final checkpoint shows (``checkpoint_findings``), or why that is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmatch.core.errors import UserError
from trustmatch.reporting.run_comparison import read_metrics
from trustmatch.reporting.task_display import DISPLAYS
from trustmatch.run.checkpoint_findings import Findings, checkpoint_findings, saved_findings
from trustmatch.run.run_directory import TRAIN_LOG

__all__ = ["RunMaterial", "load_material"]


@dataclass
class RunMaterial:
    """Everything the page shows of one run."""

    label: str
    path: Path
    metrics: dict[str, Any]
    log: list[dict[str, Any]]
    findings: Findings | None
    findings_note: str = ""  # why there are no findings

    @property
    def task(self) -> str:
        return self.metrics.get("task", "classification")  # runs from before the task interface: classification

    def file(self, name: str) -> bytes | None:
        """A file the run wrote (a PNG to embed), None where it did not."""
        path = self.path / name
        return path.read_bytes() if path.is_file() else None


def _train_log(path: Path) -> list[dict[str, Any]]:
    """``train_log.jsonl``'s entries; a line cut short by a killed run (the last one) is left out."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def load_material(path: Path, label: str | None = None, checkpoint: bool = True) -> RunMaterial:
    """A finished run's files and, with ``checkpoint``, its final model's findings: the ``findings.pt`` the
    run wrote at its end, or else one pass of its ``last.pt``."""
    path = Path(path)
    metrics = read_metrics(path)
    if metrics.get("final") is None:
        raise UserError(
            f"{path} is unfinished (no final metrics yet): "
            f"wait for it, or continue it with `trustmatch train --resume {path}`"
        )
    if metrics.get("task", "classification") not in DISPLAYS:
        known = ", ".join(DISPLAYS)
        raise UserError(f"{path} is a run of task {metrics['task']!r}, which this trustmatch does not know ({known})")
    material = RunMaterial(label or path.name, path, metrics, _train_log(path / TRAIN_LOG), None)
    if not checkpoint:
        material.findings_note = "not computed"
    elif (saved := saved_findings(path, metrics.get("steps"))) is not None:
        material.findings = saved
    elif not (path / "last.pt").is_file():
        material.findings_note = "no last.pt in the run directory: they need the final checkpoint"
    else:
        try:
            material.findings = checkpoint_findings(path)
        except UserError as e:  # the data moved, a checkpoint of another version: the rest of the page stands
            material.findings_note = f"the final checkpoint could not be evaluated: {e}"
    return material
