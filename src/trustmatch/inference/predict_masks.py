"""Segmentation predictions for a user's images: one palette PNG of class ids per image, at the
image's own size, and on request a per-pixel confidence map beside it; with a certified threshold, the
images it abstains on get masks of 255 (ignore), and the accepted ones can be exported as a labeled folder."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_bytes, atomic_write_text, write_error
from trustmatch.core.labels import IGNORE
from trustmatch.core.precision import Precision
from trustmatch.data.seg_sets import FileSegSet
from trustmatch.data.segfiles import checked_size
from trustmatch.data.segviews import SegViews
from trustmatch.evaluation.forward import segment
from trustmatch.evaluation.temperature import Temperature, scale_logits
from trustmatch.inference.export import Exporter
from trustmatch.inference.predict_classes import collect_images

IGNORE_COLOUR = (224, 224, 192)
LARGE = 4  # an image whose longer side exceeds this many crops is predicted in sliding windows


def _write_png(path: Path, image: Image.Image) -> None:
    atomic_write_bytes(path, lambda f: image.save(f, format="PNG"))


def palette_with_ignore(colours: list[list[int]]) -> list[int]:
    """The classes' colours padded to 256 entries, ignore (255) in VOC's boundary colour: a palette that stops
    at the last class lets Pillow drop index 255 when it saves (an abstained mask would read back as a class)."""
    padded = [list(c) for c in colours] + [[0, 0, 0]] * (IGNORE - len(colours)) + [list(IGNORE_COLOUR)]
    return [value for colour in padded for value in colour]


def write_masks(
    model: nn.Module,
    meta: dict[str, Any],
    inputs: list[Path],
    out: Path,
    precision: Precision,
    temperature: Temperature | None = None,
    confidence_maps: bool = False,
    threshold: float | None = None,
    export: Path | None = None,
) -> tuple[int, int]:
    """``out/<stem>.png`` per image: class ids in a palette PNG (viewers show the class colours,
    ``np.array(Image.open(p))`` gives the ids). ``confidence_maps``: ``out/<stem>_confidence.png``,
    the top-class probability per pixel as 8-bit grey (0-255 for 0-1). With a ``temperature`` the
    probabilities are softmax(logits / T) (per class T_c: a pixel's class may change with them, so the
    mask and its confidence come from the same probabilities). With a ``threshold``, an image is accepted
    when its mean raw pixel confidence, before any temperature, is > threshold (the score a certified
    threshold holds for: ``SegmentationTask.selective_units``) and an abstained image's mask is all 255
    (ignore); with ``export``, each accepted image and its mask go to ``export/images``, ``export/masks``
    with ``export/classes.txt``: a labeled segmentation folder. Returns the number of images and of
    accepted ones."""
    files = collect_images(inputs)
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise UserError(f"{stems[path.stem]} and {path} would both write {path.stem}.png: predict them separately")
        stems[path.stem] = path
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: segmentation writes one mask per image into a directory")
    for path in files:  # a damaged image stops the command before the first mask is written
        checked_size(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    exporter = Exporter.start(export) if export is not None else None
    if exporter is not None:
        atomic_write_text(exporter.root / "classes.txt", "".join(f"{name}\n" for name in meta["classes"]))
    accepted = 0
    views = SegViews(tuple(meta["mean"]), tuple(meta["std"]), meta["crop_size"])
    window = meta["crop_size"]
    palette = palette_with_ignore(meta["palette"])
    images = FileSegSet([(path, None) for path in files], len(meta["classes"]))
    for i, path in enumerate(files):
        image, _ = images.load(i)
        x = views.plain(image[None].to(precision.device))
        # crop-sized windows where the run evaluates so, or where a whole photo would not fit in memory
        crop = window if meta["sliding_window"] or max(image.shape[1:]) > LARGE * window else None
        logits = segment(model, x, precision, crop)
        probs = (logits if temperature is None else scale_logits(logits, temperature))[0].float().softmax(dim=0)
        confidence, classes = probs.max(dim=0)
        raw = confidence if temperature is None else logits[0].float().softmax(dim=0).amax(dim=0)
        keep = threshold is None or float(raw.double().mean()) > threshold
        accepted += keep
        ids = classes.to(torch.uint8).cpu().numpy()
        mask = Image.fromarray(ids if keep else np.full_like(ids, IGNORE), mode="P")
        mask.putpalette(palette)
        _write_png(out / f"{path.stem}.png", mask)
        if exporter is not None and keep:
            image_name = exporter.copy(path, Path("images") / path.name)
            exporter.write(Path("masks") / f"{image_name.stem}.png", partial(mask.save, format="PNG"))
        if confidence_maps:
            grey = (confidence * 255).round().byte().cpu().numpy().astype(np.uint8)
            _write_png(out / f"{path.stem}_confidence.png", Image.fromarray(grey, mode="L"))
    return len(files), accepted
