"""``trustmatch evaluate``: re-score a run's checkpoint on a split of the data it was trained with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trustmatch.config import from_dict
from trustmatch.engine.precision import Precision, resolve_device
from trustmatch.errors import UserError
from trustmatch.fileio import atomic_write_text
from trustmatch.runs import checkpoint_path, load_run_model


def evaluate_run(run_dir: Path, checkpoint: str = "auto", split: str = "test") -> dict[str, Any]:
    """Metrics of the checkpoint on ``split``; writes a JSON file and the task's plots beside it."""
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    model, meta, task_cls = load_run_model(path)
    cfg = from_dict(meta["config"])
    if split == "val" and cfg.data.val_per_class == 0:  # said before the data load
        raise UserError(f"run {run_dir} has no val split (data.val_per_class=0): use --split test")
    device = resolve_device("auto")  # where it runs now, not where it was trained
    precision = Precision.resolve(device, cfg.train.amp, cfg.train.channels_last)
    task = task_cls(cfg, precision)
    if not task.has_split(split):
        raise UserError(f"run {run_dir} has no {split} split: use --split test")
    evaluation = task.evaluate(precision.prepare(model.to(device)), split)
    which = path.stem
    result = {"checkpoint": which, "step": int(meta["step"]), "split": split, **evaluation.metrics}
    stem = run_dir / f"evaluation-{which}-{split}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=2))
    task.write_artefacts(evaluation, stem, f"{which} checkpoint (step {meta['step']}), {split} split")
    return result
