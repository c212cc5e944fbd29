"""What a finished run's final model shows beyond ``metrics.json``, for the HTML report: per-class
accuracy / IoU and calibration, raw and temperature-scaled, from one pass over the report split; for
segmentation, the first images of that split with truth, prediction and confidence; for a CalibrateMix
run, the pixels of the hardest images its data map lists.

The trainer collects them at the end of a run, while its task (data) and final EMA model are loaded, and
writes them to ``findings.pt``: the report then reads one small file and needs neither the data nor the
model (nor torchvision and the dataset's loader, the larger part of its start-up). For a finished run without
that file (an older trustmatch, a pass that failed at the end of training) the report rebuilds the task from ``last.pt``
(the final EMA model, the one ``final`` in ``metrics.json`` scores, with its temperature) and makes the
same pass; the task loads the run's data as training did, so the data map's row indices name the same images.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_bytes
from trustmatch.core.labels import IGNORE
from trustmatch.evaluation.class_metrics import ClassMeter
from trustmatch.evaluation.temperature import Temperature, describe_temperature, scale_logits

if TYPE_CHECKING:
    from trustmatch.tasks import Task

FILE = "findings.pt"
FORMAT = 1  # bump when Findings' fields change: a file of another format is computed again, never misread
OVERLAY_IMAGES = 4
HARDEST = 8  # thumbnails per data-map split


@dataclass
class Overlays:
    """The first images of the report split with their masks, predicted classes and confidences."""

    images: list[Tensor]
    masks: list[Tensor | None]
    predictions: list[Tensor]
    confidences: list[Tensor]
    names: list[str]
    palette: list[tuple[int, int, int]]


@dataclass
class Thumbnails:
    """The hardest images of one data-map split, hardest first, with a caption each."""

    images: Tensor  # uint8 [N, C, H, W]
    captions: list[str]


@dataclass
class Findings:
    checkpoint: str  # e.g. "last.pt (step 1500)"
    split: str
    classes: list[str]
    per_class: list[dict[str, Any]]
    temperature: Temperature | None = None
    per_class_scaled: list[dict[str, Any]] | None = None
    overlays: Overlays | None = None
    thumbnails: dict[str, Thumbnails] = field(default_factory=dict)


def collect_findings(
    task: Task,
    model: nn.Module,
    run_dir: Path,
    step: int,
    temperature: Temperature | None,
    segmentation_images: int = OVERLAY_IMAGES,
) -> Findings:
    """One pass of the final EMA ``model`` over the split ``final`` was scored on (test; validation where the
    run held test out or has none), and the data map's hardest images where the run wrote one."""
    cfg, meta = task.cfg, task.meta()
    split = task.report_split
    classes = list(meta["classes"])
    segmentation = cfg.task == "segmentation"
    ignore = IGNORE if segmentation else None
    device = next(model.parameters()).device
    meters = [ClassMeter(len(classes), device, ignore_index=ignore) for _ in range(1 + (temperature is not None))]
    kept: list[tuple[Tensor, Tensor]] = []  # segmentation: (prediction, confidence) of the first images
    for logits, targets in task.split_logits(model, split):
        meters[0].update(logits, targets)
        scaled = logits if temperature is None else scale_logits(logits, temperature)
        if temperature is not None:
            meters[1].update(scaled, targets)
        if segmentation and len(kept) < segmentation_images:
            confidence, prediction = scaled[: segmentation_images - len(kept)].softmax(dim=1).max(dim=1)
            kept += list(zip(prediction.cpu(), confidence.cpu()))
    findings = Findings(
        checkpoint=f"last.pt (step {step})",
        split=split,
        classes=classes,
        per_class=meters[0].rows(classes),
        temperature=temperature,
        per_class_scaled=meters[1].rows(classes) if len(meters) > 1 else None,
    )
    if segmentation and kept:
        dataset = task.split_data(split)
        loaded = [dataset.load(i) for i in range(len(kept))]
        findings.overlays = Overlays(
            images=[image for image, _ in loaded],
            masks=[mask for _, mask in loaded],
            predictions=[p for p, _ in kept],
            confidences=[c for _, c in kept],
            names=[dataset.name(i) for i in range(len(kept))],
            palette=[tuple(c) for c in meta["palette"]],
        )
    if not segmentation:
        findings.thumbnails = _hardest(Path(run_dir), task)
    return findings


def checkpoint_findings(run_dir: Path) -> Findings:
    """:func:`collect_findings` of ``last.pt``, its task rebuilt from the run's config (the slow way: it
    loads the data and the model), for a run without ``findings.pt``."""
    from trustmatch.run.loaded_run import load_run_model  # the tasks, the data loaders, torchvision: only here

    run = load_run_model(Path(run_dir) / "last.pt")
    task = run.task(run.cfg, run.precision)
    return collect_findings(task, run.model, Path(run_dir), int(run.meta["step"]), run.meta.get("temperature"))


def save_findings(findings: Findings, run_dir: Path, step: int) -> Path:
    """``findings.pt``, written atomically: plain containers and tensors, read back with ``weights_only``.
    Overlay predictions are stored as uint8 (class ids are 0..254) and confidences as float16: at
    Cityscapes' 2048 x 1024 an image's int64 prediction alone is 16 MB."""
    state = {"format": FORMAT, "step": step, **asdict(findings)}
    if findings.overlays is not None:
        state["overlays"]["predictions"] = [p.to(torch.uint8) for p in findings.overlays.predictions]
        state["overlays"]["confidences"] = [c.half() for c in findings.overlays.confidences]
    atomic_write_bytes(Path(run_dir) / FILE, lambda file: torch.save(state, file))
    return Path(run_dir) / FILE


def saved_findings(run_dir: Path, step: int) -> Findings | None:
    """The findings the run wrote at its end, where they belong to ``step`` (the step of ``final``); None
    where the run wrote none, wrote them before a resume took it further, or the file cannot be read or
    is of another format (derived data: the caller computes them again from ``last.pt``)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.pop("format") != FORMAT or state.pop("step") != step:
            return None
        overlays, thumbnails = state.pop("overlays"), state.pop("thumbnails")
        if overlays is not None:
            overlays["predictions"] = [p.long() for p in overlays["predictions"]]
            overlays["confidences"] = [c.float() for c in overlays["confidences"]]
        return Findings(
            **state,
            overlays=None if overlays is None else Overlays(**overlays),
            thumbnails={split: Thumbnails(**t) for split, t in thumbnails.items()},
        )
    except Exception:  # noqa: BLE001 (a cut or foreign file holds nothing last.pt cannot give again)
        return None


def describe_scaling(findings: Findings) -> str:
    """The temperature behind the scaled values ("temperature 1.77 (fitted on validation)"), or why there is none."""
    if findings.temperature is None:
        return "no temperature in last.pt (not fitted: no validation split, or validation all correct)"
    return f"temperature {describe_temperature(findings.temperature, 2)} (fitted on validation)"


def _rows(path: Path, limit: int, keep: str) -> list[dict[str, str]]:
    """The first ``limit`` rows of a data-map CSV (hardest first) whose column ``keep`` is filled."""
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get(keep)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} cannot be read ({e}): is the run directory intact?") from None
    return rows[:limit]


def _hardest(run_dir: Path, task: Any, limit: int = HARDEST) -> dict[str, Thumbnails]:
    """Thumbnails of the lowest-AUM labeled and lowest-APM unlabeled images of ``datamap_*.csv``."""
    found = {}
    captions = {
        "labeled": ("aum", lambda r: f"label {r['label']}, pred {r['predicted']}\nAUM {float(r['aum']):.2f}"),
        "unlabeled": (
            "apm",
            lambda r: f"PL {r['pseudo_label']}" + (f" (true {r['true_label']})" if r["true_label"] else "")
            + f"\nAPM {float(r['apm']):.2f}",
        ),
    }  # fmt: skip
    for split, (score, caption) in captions.items():
        path = run_dir / f"datamap_{split}.csv"
        if not path.is_file():
            continue
        rows = _rows(path, limit, score)
        images = task.split_data(split).images
        index = [int(r["index"]) for r in rows]
        if rows and max(index) < len(images):
            found[split] = Thumbnails(images[torch.tensor(index)], [caption(r) for r in rows])
    return found
