"""``trustmatch report RUN... --html``: one self-contained page of finished runs (classification and
segmentation), side by side.

Most of the page comes from the run directory's files (``metrics.json``, ``train_log.jsonl``, the data map's
CSVs and PNG, ``csl_selection.png``); the per-class values and the segmentation overlays come from one pass
of the final checkpoint over the run's report split (``checkpoint_findings``). A run lacking any of it keeps
its place on the page with a sentence saying what is missing and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text
from trustmatch.reporting.html_page import page
from trustmatch.run.report_material import load_material
from trustmatch.run.report_sections import SECTIONS

__all__ = ["PAGE", "write_html_report"]

PAGE = "report.html"


def write_html_report(paths: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> Path:
    """``out/report.html`` for the runs at ``paths`` (``labels``: one name each, default the directory names)."""
    if labels is not None and len(labels) != len(paths):
        raise UserError(f"--labels gave {len(labels)} names for {len(paths)} run directories: give one per run")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a directory for {PAGE}")
    for p in paths:  # every run checked before the slow part, so a typo in the last one fails at once
        load_material(p, checkpoint=False)
    runs = [load_material(p, None if labels is None else labels[i]) for i, p in enumerate(paths)]
    sections = [build(runs) for build in SECTIONS]
    names = ", ".join(run.label for run in runs)
    subtitle = f"{len(runs)} run{'s' * (len(runs) > 1)}: {names}. Written by trustmatch report --html."
    html = page("trustmatch report", subtitle, sections)
    atomic_write_text(out / PAGE, html)
    return out / PAGE
