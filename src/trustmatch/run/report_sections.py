"""The sections of the HTML report, one function each, in page order (``SECTIONS``).

A section shows every run side by side (the metrics table: one column group per run) and puts a short
note where a run lacks what the section draws: an older run without risk-coverage curves, a run without
a checkpoint, a method without a data map or a CSL selection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from trustmatch.evaluation.temperature import describe_temperature
from trustmatch.methods.csl_recorder import FILE as CSL_FILE
from trustmatch.reporting.html_page import Section, figure, note, side_by_side, table
from trustmatch.reporting.plots import ReliabilityPanel, curves_figure, overlays_figure, png_bytes
from trustmatch.reporting.report_figures import (
    LogPanel,
    log_figure,
    per_class_figure,
    reliability_pair,
    risk_coverage_figure,
    thumbnails_figure,
)
from trustmatch.reporting.task_display import DISPLAYS
from trustmatch.run.checkpoint_findings import describe_scaling
from trustmatch.run.report_material import RunMaterial
from trustmatch.run.run_directory import TRAIN_LOG

NOT_RECORDED = "not recorded by this run"
DASH = "—"

# ------------------------------------------------------------------ numbers

COUNTS = {"n", "n_pixels", "temperature_pixels"}
PLAIN = {"nll", "brier", "pixel_nll", "aurc", "eaurc"}  # not fractions of a whole: four decimals
LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "miou": "mIoU",
    "pixel_accuracy": "pixel accuracy",
    "mean_class_accuracy": "mean class accuracy",
    "ece_15": "ECE-15",
    "ece_10": "ECE-10",
    "mce_15": "MCE-15",
    "mce_10": "MCE-10",
    "pixel_ece_15": "pixel ECE-15",
    "nll": "NLL",
    "pixel_nll": "pixel NLL",
    "brier": "Brier",
    "mean_confidence": "mean confidence",
    "aurc": "AURC",
    "eaurc": "excess AURC",
    "accuracy_at_coverage_50": "accuracy at 50 % coverage",
    "accuracy_at_coverage_80": "accuracy at 80 % coverage",
    "accuracy_at_coverage_90": "accuracy at 90 % coverage",
    "n": "samples",
    "n_pixels": "pixels",
}
SELECTIVE = ("aurc", "eaurc", "accuracy_at_coverage_50", "accuracy_at_coverage_80", "accuracy_at_coverage_90")


def number(key: str, value: Any) -> str:
    """A metric as the page shows it: counts whole, NLL / Brier / AURC with four decimals, fractions in %."""
    if value is None:
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key in COUNTS or isinstance(value, int):
        return f"{value:,}"
    if key in PLAIN:
        return f"{value:.4f}"
    return percent(value) if 0 <= value <= 1 else f"{value:.4g}"


def percent(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.2f} %"


def _scalars(block: Any) -> dict[str, float]:
    """The numbers of a ``final`` / ``best`` block (its nested validation, scaled and per-class entries left out)."""
    if not isinstance(block, dict):
        return {}
    numbers = {k: v for k, v in block.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: v for k, v in numbers.items() if k not in ("step", "temperature")}


def _png(fig: Any, alt: str, caption: str = "") -> str:
    return figure(png_bytes(fig), alt, caption)


def _scaled(run: RunMaterial) -> str:
    t = run.metrics.get("temperature")
    return DASH if t is None else describe_temperature(t, 2)


def _per_run(runs: Sequence[RunMaterial], blocks: Callable[[RunMaterial], list[str]]) -> str:
    return side_by_side([(run.label, blocks(run)) for run in runs])


# ------------------------------------------------------------------ sections


def overview(runs: Sequence[RunMaterial]) -> Section:
    header = ["run", "task", "method", "dataset", "seed", "steps", "wall time", "split sizes", "temperature"]
    rows, notes = [], []
    for run in runs:
        m = run.metrics
        sizes = ", ".join(f"{k} {v:,}" for k, v in (m.get("split") or {}).items())
        wall = m.get("wall_time_s")
        row = [run.label, run.task, m.get("method", "?"), m.get("dataset", "?"), str(m.get("seed", "?"))]
        rows.append([*row, number("steps", m.get("steps")), DASH if wall is None else f"{wall:.0f} s", sizes,
                     _scaled(run)])  # fmt: skip
        notes += [f"{run.label}: {m[key]}" for key in ("test_note", "best_note", "temperature_note") if m.get(key)]
    return Section(
        "runs", "Runs", "Each run's directory, as trustmatch train wrote it.", [table(header, rows), *map(note, notes)]
    )


def metrics(runs: Sequence[RunMaterial]) -> Section:
    """One column group per run: final (EMA model at the end), final after temperature scaling, best."""
    columns = []  # (run, column name, scalars)
    for run in runs:
        m = run.metrics
        best = m.get("best")
        columns += [
            (run, "final", _scalars(m["final"])),
            (run, f"final + TS (T {_scaled(run)})", _scalars(m.get("final_calibrated"))),
            (run, DASH if best is None else f"best (step {best.get('step', '?')})", _scalars(best)),
        ]
    keys = [k for k in LABELS if any(k in c[2] for c in columns)]
    keys += list(dict.fromkeys(k for c in columns for k in c[2] if k not in LABELS))
    rows = [[LABELS.get(k, k), *(number(k, c[2].get(k)) for c in columns)] for k in keys]
    header = ["metric", *(c[1] for c in columns)]
    groups = [(run.label, 3) for run in runs]
    intro = (
        "The report split (test; validation where a run had none or held it out) scored by the final EMA model, "
        "by the same model after temperature scaling (T fitted on validation), and by the checkpoint with the best "
        "validation score. A dash: the run has no such value."
    )
    return Section("metrics", "Metrics", intro, [table(header, rows, groups)])


def _bins(entry: Any) -> dict | None:
    return entry.get("15") if isinstance(entry, dict) else None


def reliability(runs: Sequence[RunMaterial]) -> Section:
    def blocks(run: RunMaterial) -> list[str]:
        m = run.metrics
        unit = DISPLAYS[run.task].diagram_unit
        ece_key = DISPLAYS[run.task].calibration_metric
        panels = []
        if _bins(m.get("final_bins")) is not None:
            panels.append(ReliabilityPanel(f"final{unit}", _bins(m["final_bins"]), m["final"].get(ece_key)))
        calibrated = m.get("final_calibrated") or {}
        if _bins(m.get("final_calibrated_bins")) is not None:
            title = f"final + TS (T {_scaled(run)}){unit}"
            panels.append(ReliabilityPanel(title, _bins(m["final_calibrated_bins"]), calibrated.get(ece_key)))
        if not panels:
            return [note("no reliability bins in metrics.json (a run of an older trustmatch)")]
        shown = [_png(reliability_pair(panels), f"reliability diagrams of {run.label}")]
        if len(panels) == 1:
            shown.append(note(f"no temperature-scaled diagram: {m.get('temperature_note') or 'no temperature'}"))
        return shown

    intro = (
        "Accuracy against confidence in 15 bins (segmentation: every labeled pixel). Bars under the diagonal: "
        "over-confidence; the count panel shows how many samples each bar rests on."
    )
    return Section("reliability", "Reliability diagrams", intro, [_per_run(runs, blocks)])


def risk_coverage(runs: Sequence[RunMaterial]) -> Section:
    def blocks(run: RunMaterial) -> list[str]:
        m = run.metrics
        curves = [
            (name, m[key]["coverage"], m[key]["risk"])
            for name, key in (("final", "final_risk_coverage"), (f"final + TS (T {_scaled(run)})",
                                                                 "final_calibrated_risk_coverage"))
            if isinstance(m.get(key), dict) and m[key].get("coverage")
        ]  # fmt: skip
        scalars = [
            (name, _scalars(m.get(key))) for name, key in (("final", "final"), ("final + TS", "final_calibrated"))
        ]
        scalars = [(name, s) for name, s in scalars if any(k in s for k in SELECTIVE)]
        if not curves and not scalars:
            return [note(f"risk-coverage: {NOT_RECORDED} (trained before trustmatch measured selective risk)")]
        shown = [] if not curves else [_png(risk_coverage_figure(curves), f"risk-coverage curves of {run.label}")]
        if scalars:
            rows = [[LABELS[k], *(number(k, s.get(k)) for _, s in scalars)] for k in SELECTIVE]
            shown.append(table(["", *(name for name, _ in scalars)], rows))
        if not curves:
            shown.append(note(f"the curve: {NOT_RECORDED}"))
        return shown

    intro = (
        "Keep the most confident predictions (segmentation: pixels) first: the error rate of those kept (risk) "
        "against the share kept (coverage). AURC is the area under the curve; excess AURC subtracts the area an "
        "oracle ranking with the same errors would reach."
    )
    return Section("risk-coverage", "Risk-coverage", intro, [_per_run(runs, blocks)])


QUANTITY = (
    ("mask", "mask ratio (weight used)"),
    ("reliable", "CSL reliable share"),
    ("hidden", "TMP hidden share"),
    ("weight_bg", "mean weight, true bg"),
    ("weight_fg", "mean weight, true fg"),
    ("trusted_bg", "weight 1, true bg"),
    ("trusted_fg", "weight 1, true fg"),
    ("fg_pseudo", "fg share of pseudo-labels"),
    ("fg_true", "fg share of truth"),
)
QUALITY = (
    ("pl_acc", "accuracy, all"),
    ("pl_acc_selected", "accuracy, weighted by selection"),
    ("pl_acc_bg", "accuracy, true bg"),
    ("pl_acc_fg", "accuracy, true fg"),
    ("wrong_loss_share", "loss share of wrong ones"),
)


def _logged(log: Sequence[dict], series: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(key, label) for key, label in series if any(key in entry for entry in log)]


def pseudo_labels(runs: Sequence[RunMaterial]) -> Section:
    def blocks(run: RunMaterial) -> list[str]:
        shown = []
        losses = sorted({k for entry in run.log for k in entry if k.split("/")[-1].startswith("loss")})
        panels = [
            LogPanel("pseudo-label quantity", _logged(run.log, QUANTITY)),
            LogPanel("pseudo-label quality (true labels known)", _logged(run.log, QUALITY)),
            LogPanel("losses", [(k, k) for k in losses], percent=False),
        ]
        panels = [p for p in panels if p.series]
        if not run.log:
            shown.append(note(f"no {TRAIN_LOG} in the run directory"))
        elif panels:
            shown.append(_png(log_figure(run.log, panels), f"training log of {run.label}"))
        if run.log and not _logged(run.log, QUANTITY[:1]):
            shown.append(note("no pseudo-labels: the supervised baseline trains on the labeled images only"))
        elif run.log and not _logged(run.log, QUALITY):
            shown.append(note("pseudo-label accuracy not logged: the unlabeled images' true labels are unknown"))
        history = run.metrics.get("history") or []
        if history:
            curves = DISPLAYS[run.task].curves
            caption = "validation and report split over the run's evaluations"
            shown.append(_png(curves_figure(history, curves), f"evaluation history of {run.label}", caption))
        else:
            shown.append(note("no evaluation history in metrics.json"))
        return shown

    intro = (
        "Training averages of every log interval (train_log.jsonl): how much pseudo-label weight the method "
        "used and, where the unlabeled images' truth is known (digits, Fashion-MNIST, digitscenes), how often "
        "the pseudo-labels were right; segmentation splits them into true background (bg) and foreground (fg). "
        "Under them, the evaluations over training (metrics.json history)."
    )
    return Section("pseudo-labels", "Pseudo-labels and evaluations over training", intro, [_per_run(runs, blocks)])


def per_class(runs: Sequence[RunMaterial]) -> Section:
    def blocks(run: RunMaterial) -> list[str]:
        found = run.findings
        if found is None:
            return [note(f"per-class values: {run.findings_note}")]
        segmentation = run.task == "segmentation"
        headline = "iou" if segmentation else "recall"
        name = "IoU" if segmentation else "accuracy (recall)"
        scaled = found.per_class_scaled
        ece = {"raw": [r["ece"] for r in found.per_class]}
        if scaled is not None:
            ece["temperature-scaled"] = [r["ece"] for r in scaled]
        panels = [(name, {name: [r[headline] for r in found.per_class]}), ("ECE-15 of its predictions", ece)]
        caption = f"{found.checkpoint} on the {found.split} split; {describe_scaling(found)}"
        shown = [_png(per_class_figure(found.classes, panels), f"per-class values of {run.label}", caption)]
        header = ["class", "support", name, "precision", "mean confidence", "ECE-15"]
        header += [] if scaled is None else ["ECE-15 after TS"]
        rows = [
            [r["class"], f"{r['support']:,}", percent(r[headline]), percent(r["precision"]),
             percent(r["confidence"]), percent(r["ece"]), *([] if scaled is None else [percent(s["ece"])])]
            for r, s in zip(found.per_class, scaled or found.per_class)
        ]  # fmt: skip
        return [*shown, table(header, rows)]

    intro = (
        "From one pass of the final checkpoint over the report split. Calibration per class conditions on the "
        "predicted class: the ECE-15 of the predictions of that class, and their mean confidence beside their "
        "precision. Summed with weights (each class's share of the predictions), these ECEs give the top-label "
        "ECE, which is at least the ECE of the metrics table: over- and under-confident classes no longer cancel."
    )
    return Section("per-class", "Per class", intro, [_per_run(runs, blocks)])


def data_map(runs: Sequence[RunMaterial]) -> Section:
    def blocks(run: RunMaterial) -> list[str]:
        scatter = run.file("datamap.png")
        if scatter is None:
            return [note("no data map: only CalibrateMix runs (calibratemix.mode) track AUM and APM")]
        shown = [figure(scatter, f"data map of {run.label}", "datamap.png, as the run wrote it")]
        thumbs = {} if run.findings is None else run.findings.thumbnails
        titles = {
            "labeled": "hardest labeled images (lowest AUM)",
            "unlabeled": "hardest unlabeled images (lowest APM)",
        }
        for split, title in titles.items():
            if split in thumbs:
                t = thumbs[split]
                shown.append(_png(thumbnails_figure(t.images, t.captions, title), f"{title} of {run.label}"))
            else:
                why = run.findings_note if run.findings is None else f"no datamap_{split}.csv rows to show"
                shown.append(note(f"{title}: {why}"))
        return shown

    intro = (
        "CalibrateMix's training dynamics: labeled images by their area under the margin (AUM: low or negative, "
        "learned against their label for most of training) and unlabeled ones by the margin of their final "
        "pseudo-label (APM: low, the model kept changing its mind), against the final confidence."
    )
    return Section("data-map", "Data map", intro, [_per_run(runs, blocks)])


def overlays(runs: Sequence[RunMaterial]) -> Section:
    def blocks(run: RunMaterial) -> list[str]:
        if run.task != "segmentation":
            return [note("a classification run: no masks to overlay")]
        found = run.findings
        if found is None or found.overlays is None:
            return [note(f"overlays: {run.findings_note or 'no images in the report split'}")]
        o = found.overlays
        title = f"{found.checkpoint}, {found.split} images"
        fig = overlays_figure(o.images, o.masks, o.predictions, o.palette, title, o.names, o.confidences)
        caption = f"prediction and confidence as trustmatch predict computes them: {describe_scaling(found)}"
        return [_png(fig, f"segmentation overlays of {run.label}", caption)]

    intro = "The first images of the report split: the image, its ground truth, the prediction and its confidence."
    return Section("overlays", "Segmentation overlays", intro, [_per_run(runs, blocks)])


def csl_selection(runs: Sequence[RunMaterial]) -> Section:
    def blocks(run: RunMaterial) -> list[str]:
        scatter = run.file(CSL_FILE)
        if scatter is None:
            return [note(f"no {CSL_FILE}: only CSL runs record their selection")]
        return [figure(scatter, f"CSL selection of {run.label}", f"{CSL_FILE}, as the run wrote it")]

    intro = (
        "CSL's selection at 10, 50 and 100 % of training: each pixel (classification: each image of the batch) "
        "by its max confidence and residual dispersion, coloured by its weight; red crosses are wrong "
        "pseudo-labels where the truth is known."
    )
    return Section("csl-selection", "CSL selection", intro, [_per_run(runs, blocks)])


SECTIONS: tuple[Callable[[Sequence[RunMaterial]], Section], ...] = (
    overview,
    metrics,
    reliability,
    risk_coverage,
    pseudo_labels,
    per_class,
    data_map,
    overlays,
    csl_selection,
)
