"""Classification predictions for a user's images: one CSV row per image with class, confidence and top-3."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from trustmatch.data.folders import decode_image, image_files
from trustmatch.data.views import Views
from trustmatch.engine.inference import predict_logits
from trustmatch.engine.precision import Precision
from trustmatch.errors import UserError
from trustmatch.fileio import atomic_write_text


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
) -> int:
    """Write a CSV row per image found in ``inputs`` to ``out``; returns the number of rows.
    Confidences are softmax(logits / temperature) when a temperature is given."""
    files = collect_images(inputs)
    mode = "L" if meta["channels"] == 1 else "RGB"
    images = torch.from_numpy(np.stack([decode_image(p, meta["image_size"], mode) for p in files]))
    views = Views(tuple(meta["mean"]), tuple(meta["std"]), hflip=False)
    probs = (predict_logits(model, images, views.plain, precision, batch_size) / (temperature or 1.0)).softmax(dim=1)
    classes = meta["classes"]
    top = probs.topk(min(3, probs.shape[1]), dim=1)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["path", "class", "confidence"]
    for k in range(top.indices.shape[1]):
        header += [f"top{k + 1}_class", f"top{k + 1}_confidence"]
    writer.writerow(header)
    for path, values, indices in zip(files, top.values.tolist(), top.indices.tolist()):
        row = [str(path), classes[indices[0]], f"{values[0]:.6f}"]
        for v, i in zip(values, indices):
            row += [classes[i], f"{v:.6f}"]
        writer.writerow(row)
    atomic_write_text(out, buffer.getvalue())
    return len(files)
