"""``--precision P [--delta D]`` of ``trustmatch predict`` and ``evaluate``: a confidence threshold
certified on the run's labeled validation split (``evaluation.certify``), and what it keeps of a split.

The certificate needs a model and a score that the validation split did not choose: ``--checkpoint auto``
means ``last.pt`` here, since ``best.pt`` was picked by its validation accuracy; ``best`` (and per-class
temperatures, which can change predicted classes and were fitted on the same split) leave the guarantee
approximate, and the output says so (:func:`caveats`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustmatch.core.errors import UserError
from trustmatch.evaluation.certify import Certificate, NotCertifiable, certify
from trustmatch.evaluation.temperature import Temperature, describe_temperature
from trustmatch.run.loaded_run import LoadedRun, checkpoint_path
from trustmatch.tasks import Task

DEFAULT_DELTA = 0.05


def check_request(precision: float | None, delta: float | None, raw: bool = False) -> float:
    """Refuse ``--precision`` / ``--delta`` outside (0, 1), and ``--delta`` or ``evaluate --raw`` (``raw``: what
    only a certificate reads) without ``--precision``, before anything is loaded; the delta to use."""
    if precision is None:
        if delta is not None:
            raise UserError(f"--delta {delta:g} only applies with --precision P: add e.g. --precision 0.95, or drop it")
        if raw:
            raise UserError("evaluate --raw only applies with --precision P: add e.g. --precision 0.95, or drop it")
    elif not 0 < precision < 1:
        raise UserError(f"--precision {precision:g} must lie strictly between 0 and 1, e.g. --precision 0.95")
    delta = DEFAULT_DELTA if delta is None else delta
    if not 0 < delta < 1:
        raise UserError(f"--delta {delta:g} must lie strictly between 0 and 1, e.g. --delta 0.05")
    return delta


def checkpoint_for(run_dir: Path, which: str, precision: float | None) -> Path:
    """``checkpoint_path``, except that with a ``precision`` ``auto`` is ``last.pt``: the final model, which
    validation did not choose (``best.pt`` was chosen by its accuracy on the split that certifies)."""
    return checkpoint_path(run_dir, "last" if precision is not None and which == "auto" else which)


def caveats(path: Path, temperature: Temperature | None) -> list[str]:
    """Why a certificate computed with this checkpoint and temperature holds only approximately (none: as stated;
    ``evaluation.certify``'s assumptions)."""
    notes = []
    if path.stem == "best":
        notes.append(
            "best.pt was chosen by its accuracy on this validation split, so the split is not fresh data for it "
            "(--checkpoint auto certifies last.pt)"
        )
    if isinstance(temperature, list):
        notes.append(
            "per-class temperatures fitted on this validation split can change the predicted classes whose "
            "precision is certified (--raw certifies the unscaled predictions)"
        )
    return notes


def certification_temperature(run: LoadedRun, raw: bool, where: str) -> Temperature | None:
    """The temperature the certified predictions are computed with: the checkpoint's (what ``predict``
    applies), none with ``raw``; a run without one is refused, since its threshold would be on other numbers."""
    if raw:
        return None
    temperature = run.meta.get("temperature")
    if temperature is None:
        raise UserError(
            f"checkpoint {where} has no saved temperature (no validation split, eval.pixel_temperature=off, or "
            "saved between evaluations): pass --raw to certify a threshold on the raw confidences"
        )
    return temperature


def certify_run(
    run: LoadedRun, task: Task, precision: float, delta: float, temperature: Temperature | None, where: str
) -> Certificate:
    """The certified threshold on ``task``'s validation split; one line where it has none or is too small."""
    if not task.has_split("val"):
        raise UserError(
            f"run {where} has no validation split: a precision can only be certified on labeled validation "
            "data (train with data.val_per_class > 0; segmentation: data.val_images or data.val_dir)"
        )
    scores, losses = task.selective_units(run.model, "val", temperature)
    try:
        return certify(scores.numpy(), losses.numpy(), precision, delta, task.certify_bound)
    except NotCertifiable as e:
        best = int(e.best * 1e4) / 1e4  # rounded down: a target at most this is certified
        raise UserError(
            f"precision {precision:g} cannot be certified at delta {delta:g} on the validation split of run {where} "
            f"({e.units} images): the best certifiable there is {best:.4f}; ask for at most that, raise --delta, "
            "or train with a larger validation split"
        ) from None


def kept(
    task: Task, run: LoadedRun, split: str, thresholds: dict[str, float], temperature: Temperature | None
) -> dict[str, Any] | None:
    """Per named threshold, the precision (mean 1 - loss of the accepted units) and coverage of ``split``'s
    units whose truth is known (None where none is)."""
    scores, losses = task.selective_units(run.model, split, temperature)
    if len(scores) == 0:
        return None
    result = {}
    for name, threshold in thresholds.items():
        accepted = scores > threshold
        count = int(accepted.sum())
        precision = float(1 - losses[accepted].mean()) if count else None
        result[name] = {"precision": precision, "coverage": count / len(scores), "accepted": count}
    return {"units": len(scores), **result}


def describe(certificate: Certificate, temperature: Temperature | None, task: Task, path: Path) -> dict[str, Any]:
    """What ``certified.json`` and ``evaluate``'s output say about a certificate computed with the checkpoint
    at ``path``."""
    scale = "raw" if temperature is None else f"temperature {describe_temperature(temperature)}"
    notes = caveats(path, temperature)
    return {
        **certificate.as_dict(),
        "checkpoint": str(path),
        "confidence": scale if temperature is None else f"raw (predictions at {scale})",
        "unit": task.certify_unit,
        "rule": "accept a prediction when its confidence is > threshold, abstain otherwise",
        "procedure": "order-statistic thresholds at 5 %, 10 %, ..., 100 % validation coverage, Bonferroni over "
        "them (Learn-then-Test), each bounded exactly (binomial: Clopper-Pearson; betting: Waudby-Smith-Ramdas)",
        "guarantee": f"approximate: {'; '.join(notes)}" if notes else "as stated under the assumption",
        "assumption": "with probability >= 1 - delta over the validation draw, the expected (population) precision "
        "of the accepted predictions on new data is >= the target; a finite batch can fall below it. New data "
        "must be exchangeable with the validation split, class mix included: a split of a fixed number of "
        "images per class is balanced, so on data with other class proportions the precision can differ. Not "
        "for the training images (the unlabeled ones included), nor under distribution shift; a model, settings "
        "(trustmatch tune) or a score chosen on this validation split make it approximate (guarantee)",
    }


def summary_line(certificate: Certificate, path: Path, temperature: Temperature | None) -> str:
    """One line for the terminal (and the caveats, where the guarantee is approximate)."""
    c = certificate
    notes = caveats(path, temperature)
    return (
        f"certified threshold {c.threshold:.6f} on {path.name}: expected precision of what it accepts >= "
        f"{c.precision:g} with probability >= {1 - c.delta:g} (bound {c.certified_precision:.4f}); validation "
        f"coverage {c.coverage:.3f} ({c.accepted}/{c.units}), validation precision {c.validation_precision:.4f}"
        + (f"; approximate: {'; '.join(notes)}" if notes else "")
    )
