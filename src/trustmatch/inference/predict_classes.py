"""Classification predictions for a user's images: one CSV row per image with class, confidence and top-3;
with a certified threshold, whether each is accepted, and the accepted images exported as class folders."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text
from trustmatch.core.precision import Precision
from trustmatch.data.folders import decode_batch, image_files
from trustmatch.data.views import Views
from trustmatch.evaluation.forward import predict_logits
from trustmatch.inference.export import Exporter


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly, or found recursively in the folders named."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = image_files(item)
            if not found:
                raise UserError(f"folder {item} holds no images (extensions: {' '.join(IMG_EXTENSIONS)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item} does not exist: pass image files or folders of images")
    return files


def write_predictions(
    model: nn.Module,
    meta: dict[str, Any],
    inputs: list[Path],
    out: Path,
    precision: Precision,
    temperature: float | None = None,
    batch_size: int = 256,
    threshold: float | None = None,
    export: Path | None = None,
) -> tuple[int, int]:
    """Write a CSV row per image found in ``inputs`` to ``out``; returns the number of rows and of accepted
    ones. Confidences are softmax(logits / temperature) when a temperature is given. Images are decoded a
    batch at a time, so any number of them fits in memory (only the per-image top-k is kept). With a
    ``threshold`` a ``raw_confidence`` column (softmax(logits) without the temperature: the score a certified
    threshold is chosen on, which no validation fit reorders) and an ``accepted`` one (1: raw_confidence >
    threshold, the class stands; 0: abstained), and with ``export`` the accepted image files copied into
    ``export/<class>/``, a labeled folder for the next round."""
    files = collect_images(inputs)
    exporter = Exporter.start(export) if export is not None else None
    mode = "L" if meta["channels"] == 1 else "RGB"
    interpolation = meta["config"]["data"].get("interpolation")  # the training decoder's filter (older runs: none)
    views = Views(tuple(meta["mean"]), tuple(meta["std"]), hflip=False)
    chunks, raw = [], []
    for start in range(0, len(files), batch_size):
        images = torch.from_numpy(
            decode_batch(files[start : start + batch_size], meta["image_size"], mode, interpolation)
        )
        logits = predict_logits(model, images, views.plain, precision, batch_size)
        probs = (logits / (temperature or 1.0)).softmax(dim=1)
        chunks.append(probs.topk(min(3, probs.shape[1]), dim=1))
        if threshold is not None:  # the score the certified threshold applies to
            raw.append(logits.float().softmax(dim=1).amax(dim=1))
    classes = meta["classes"]
    top_values, top_indices = torch.cat([c.values for c in chunks]), torch.cat([c.indices for c in chunks])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["path", "class", "confidence", *(["raw_confidence", "accepted"] if threshold is not None else [])]
    for k in range(top_indices.shape[1]):
        header += [f"top{k + 1}_class", f"top{k + 1}_confidence"]
    writer.writerow(header)
    raw_top = torch.cat(raw) if threshold is not None else torch.zeros(len(files))
    accepted = raw_top.double() > threshold if threshold is not None else torch.ones(len(files), dtype=torch.bool)
    for path, values, indices, score, keep in zip(
        files, top_values.tolist(), top_indices.tolist(), raw_top.tolist(), accepted.tolist(), strict=True
    ):
        row = [str(path), classes[indices[0]], f"{values[0]:.6f}"]
        row += [f"{score:.6f}", int(keep)] if threshold is not None else []
        for v, i in zip(values, indices):
            row += [classes[i], f"{v:.6f}"]
        writer.writerow(row)
        if exporter is not None and keep:
            exporter.copy(path, Path(classes[indices[0]]) / path.name)
    atomic_write_text(out, buffer.getvalue())
    return len(files), int(accepted.sum())
