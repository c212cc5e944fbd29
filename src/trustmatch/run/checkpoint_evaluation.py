"""``trustmatch evaluate``: re-score a run's checkpoint on a split of the data it was trained with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text
from trustmatch.run import certified_threshold as certified
from trustmatch.run.artefacts import write_diagram
from trustmatch.run.loaded_run import load_run_model

UNLABELED_NOTE = (
    "the unlabeled training images, where their truth is known: not fresh data (the model fitted its own "
    "pseudo-labels on them), so the guarantee is not claimed there"
)


def evaluate_run(
    run_dir: Path,
    checkpoint: str = "auto",
    split: str = "test",
    precision: float | None = None,
    delta: float | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """Metrics of the checkpoint on ``split``; writes a JSON file and the task's plots beside it. With a
    ``precision`` (``auto`` then means ``last.pt``: ``certified_threshold.checkpoint_for``), also the
    threshold certified on validation and what it keeps of ``split`` (and of the unlabeled training images,
    where their truth is known), beside the uncertified rule "confidence > precision". ``delta``:
    ``certified_threshold.DEFAULT_DELTA`` when None."""
    delta = certified.check_request(precision, delta, raw)
    run_dir = Path(run_dir)
    path = certified.checkpoint_for(run_dir, checkpoint, precision)  # with a precision, auto is last.pt
    run = load_run_model(path)
    certify_temperature = certified.certification_temperature(run, raw, str(path)) if precision else None
    meta = run.meta
    if split == "val" and run.cfg.data.val_per_class == 0:  # said before the data load
        raise UserError(f"run {run_dir} has no val split (data.val_per_class=0): use --split test")
    task = run.task(run.cfg, run.precision)
    if not task.has_split(split):
        other = "val" if split == "test" else "test"
        raise UserError(f"run {run_dir} has no {split} split: use --split {other}")
    # fitted on validation when the checkpoint was written: scaled validation metrics would be in-sample
    temperature = meta.get("temperature") if split == "test" else None
    evaluation = task.evaluate(run.model, split, temperature)
    which = path.stem
    result = {"checkpoint": which, "step": int(meta["step"]), "split": split, **evaluation.metrics}
    if evaluation.calibrated is not None:
        result.update(temperature=temperature, calibrated=evaluation.calibrated)
    if precision is not None:
        certificate = certified.certify_run(run, task, precision, delta, certify_temperature, str(run_dir))
        thresholds = {"certified": certificate.threshold, "uncertified": precision}
        result["certified"] = {
            **certified.describe(certificate, certify_temperature, task, path),
            "uncertified_rule": f"accept when confidence > {precision:g}, as if confidence were precision",
            split: certified.kept(task, run, split, thresholds, certify_temperature),
        }
        if split != "val":  # the uncertified rule in-sample, beside the certificate's own validation figures
            result["certified"]["val"] = certified.kept(
                task, run, "val", {"uncertified": precision}, certify_temperature
            )
        pool = certified.kept(task, run, "unlabeled", thresholds, certify_temperature)
        if pool is not None:
            result["certified"]["unlabeled"] = {**pool, "note": UNLABELED_NOTE}
    stem = run_dir / f"evaluation-{which}-{split}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=2))
    write_diagram(task, evaluation, stem, f"{which} checkpoint (step {meta['step']}), {split} split")
    return result
