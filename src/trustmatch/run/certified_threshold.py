"""``--precision P [--delta D]`` of ``trustmatch predict`` and ``evaluate``: a confidence threshold
certified on the run's labeled validation split (``evaluation.certify``), and what it keeps of a split."""

from __future__ import annotations

from typing import Any

from trustmatch.core.errors import UserError
from trustmatch.evaluation.certify import Certificate, NotCertifiable, certify
from trustmatch.evaluation.temperature import Temperature, describe_temperature
from trustmatch.run.loaded_run import LoadedRun
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


def certification_temperature(run: LoadedRun, raw: bool, where: str) -> Temperature | None:
    """The temperature the certified confidences are computed with: the checkpoint's (what ``predict``
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


def describe(certificate: Certificate, temperature: Temperature | None, unit: str) -> dict[str, Any]:
    """What ``certified.json`` and ``evaluate``'s output say about a certificate."""
    scale = "raw" if temperature is None else f"temperature {describe_temperature(temperature)}"
    return {
        **certificate.as_dict(),
        "confidence": scale,
        "unit": unit,
        "rule": "accept a prediction when its confidence is > threshold, abstain otherwise",
        "procedure": "order-statistic thresholds at 5 %, 10 %, ..., 100 % validation coverage, Bonferroni over "
        "them (Learn-then-Test), each bounded exactly (binomial: Clopper-Pearson; betting: Waudby-Smith-Ramdas)",
        "assumption": "exchangeable validation and new data; the threshold holds for data like the validation "
        "split, not for the training images nor under distribution shift",
    }


def summary_line(certificate: Certificate) -> str:
    """One line for the terminal."""
    c = certificate
    return (
        f"certified threshold {c.threshold:.6f}: precision >= {c.precision:g} with probability >= {1 - c.delta:g} "
        f"(bound {c.certified_precision:.4f}); validation coverage {c.coverage:.3f} ({c.accepted}/{c.units}), "
        f"validation precision {c.validation_precision:.4f}"
    )
