"""``trustmatch report``: the calibration and selective risk of finished classification runs, side by side.

Reads only what ``trustmatch train`` wrote into each run directory (``metrics.json``), so comparing
runs needs neither torch nor the data. Each run gives one table row for its final EMA model and, where
temperature scaling was fitted on validation, a second row with the temperature-scaled test metrics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text
from trustmatch.reporting.plots import ReliabilityPanel, reliability_comparison

__all__ = [
    "HEADER",
    "RunSummary",
    "load_run",
    "load_runs",
    "markdown_report",
    "read_metrics",
    "table_rows",
    "write_report",
]

HEADER = (
    "run",
    "method",
    "seed",
    "accuracy",
    "ECE-15",
    "ECE-10",
    "NLL",
    "Brier",
    "AURC",
    "e-AURC",
    "acc@50/80/90% cov.",
)


@dataclass(frozen=True)
class RunSummary:
    """What the report needs of one finished classification run."""

    label: str
    method: str
    seed: str
    final: dict[str, float]
    bins: dict
    temperature: float | None = None
    calibrated: dict[str, float] | None = None
    calibrated_bins: dict | None = None
    temperature_note: str = ""

    @property
    def scaled(self) -> bool:
        """Whether temperature-scaled metrics exist (the temperature was fitted on validation)."""
        return self.temperature is not None and self.calibrated is not None


def read_metrics(path: Path) -> dict[str, Any]:
    """``metrics.json`` of a run directory, refusing anything ``trustmatch train`` did not write."""
    hint = "pass the directories that `trustmatch train` wrote"
    if not path.is_dir():
        raise UserError(f"{path} is not a trustmatch run directory (not a directory): {hint}")
    for name in ("metrics.json", "config.yaml"):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a trustmatch run directory (no {name}): {hint}")
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'metrics.json'} cannot be read ({e}): is the run directory intact?") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{path / 'metrics.json'} holds no metrics object: is the run directory intact?")
    return metrics


def _bins15(tables: dict | None) -> dict | None:
    """The 15-bin reliability table of a ``final_bins``-style entry, if there is one."""
    return tables.get("15") if isinstance(tables, dict) else None


def load_run(path: Path, label: str | None = None) -> RunSummary:
    """Summarise a finished classification run; ``label`` defaults to the directory name."""
    path = Path(path)
    metrics = read_metrics(path)
    task = metrics.get("task", "classification")  # runs from before the task interface were classification
    if task != "classification":
        raise UserError(f"{path} is a {task} run: `trustmatch report` compares classification runs only")
    if metrics.get("final") is None:
        raise UserError(
            f"{path} is unfinished (no final metrics yet): "
            f"wait for it, or continue it with `trustmatch train --resume {path}`"
        )
    bins = _bins15(metrics.get("final_bins"))
    if bins is None:
        raise UserError(
            f"{path} was written by an older trustmatch (no final_bins in metrics.json): "
            "train it again with this version to compare it"
        )
    return RunSummary(
        label=path.resolve().name if label is None else label,
        method=str(metrics.get("method", "?")),
        seed=str(metrics.get("seed", "?")),
        final=metrics["final"],
        bins=bins,
        temperature=metrics.get("temperature"),
        calibrated=metrics.get("final_calibrated"),
        calibrated_bins=_bins15(metrics.get("final_calibrated_bins")),
        temperature_note=metrics.get("temperature_note") or "",
    )


def load_runs(paths: Sequence[Path], labels: Sequence[str] | None = None) -> list[RunSummary]:
    """:func:`load_run` for each path, with ``labels`` (one per path) replacing the directory names."""
    if labels is not None and len(labels) != len(paths):
        raise UserError(f"--labels gave {len(labels)} names for {len(paths)} run directories: give one per run")
    return [load_run(p, None if labels is None else labels[i]) for i, p in enumerate(paths)]


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def _selective(m: dict[str, float]) -> list[str]:
    """AURC, e-AURC and accuracy at 50/80/90 % coverage; a dash for a run written before they were measured."""
    if "aurc" not in m:
        return ["-", "-", "-"]
    at = " / ".join(_percent(m[f"accuracy_at_coverage_{p}"]) for p in (50, 80, 90))
    return [f"{m['aurc']:.4f}", f"{m['eaurc']:.4f}", at]


def _row(label: str, run: RunSummary, m: dict[str, float]) -> list[str]:
    numbers = (_percent(m["accuracy"]), _percent(m["ece_15"]), _percent(m["ece_10"]), f"{m['nll']:.4f}")
    return [label, run.method, run.seed, *numbers, f"{m['brier']:.4f}", *_selective(m)]


def _scaled_label(run: RunSummary) -> str:
    return f"{run.label} + TS (T={run.temperature:.2f})"


def table_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    """One row per run, and under it a ``+ TS`` row with its temperature-scaled metrics where fitted."""
    rows = []
    for run in runs:
        rows.append(_row(run.label, run, run.final))
        if run.scaled:
            rows.append(_row(_scaled_label(run), run, run.calibrated))
    return rows


def _notes(runs: Sequence[RunSummary]) -> list[str]:
    """Why a run has no ``+ TS`` row, so a missing row is not read as a failure of the report."""
    return [
        f"{run.label} has no temperature-scaled row: {run.temperature_note or 'temperature scaling was not fitted'}"
        for run in runs
        if not run.scaled
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_report(runs: Sequence[RunSummary]) -> str:
    """The comparison table in Markdown, with a note per run that has no temperature-scaled row."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in table_rows(runs)]
    notes = _notes(runs)
    if notes:
        lines += ["", *(f"Note: {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def _panels(run: RunSummary) -> list[ReliabilityPanel]:
    """The raw diagram of a run, and the temperature-scaled one below it where fitted."""
    panels = [ReliabilityPanel(run.label, run.bins, run.final["ece_15"])]
    if run.scaled and run.calibrated_bins is not None:
        panels.append(ReliabilityPanel(_scaled_label(run), run.calibrated_bins, run.calibrated["ece_15"]))
    return panels


def write_report(runs: Sequence[RunSummary], out: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` into ``out`` (created) and return their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a directory for report.md and report.png")
    markdown, png = out / "report.md", out / "report.png"
    atomic_write_text(markdown, markdown_report(runs))
    reliability_comparison([_panels(run) for run in runs], HEADER, table_rows(runs), png)
    return markdown, png
