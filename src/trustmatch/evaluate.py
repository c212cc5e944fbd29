"""``trustmatch evaluate``: re-score a run's checkpoint on the split it was trained with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trustmatch.config import from_dict
from trustmatch.data import load_ssl_data
from trustmatch.data.views import Views
from trustmatch.engine.inference import predict_logits
from trustmatch.engine.trainer import resolve_device
from trustmatch.fileio import atomic_write_text
from trustmatch.metrics import classification_metrics, reliability_bins
from trustmatch.report import reliability_diagram
from trustmatch.runs import load_run_model


def evaluate_run(run_dir: Path, checkpoint: str = "best", split: str = "test") -> dict[str, Any]:
    """Metrics of the checkpoint on ``split``; writes a JSON file and a reliability diagram beside it."""
    run_dir = Path(run_dir)
    model, meta = load_run_model(run_dir, checkpoint)
    cfg = from_dict(meta["config"])
    device = resolve_device(cfg.train.device)
    data = load_ssl_data(cfg.data, cfg.seed)
    images = getattr(data, split)
    views = Views(data.mean, data.std, hflip=False)
    logits = predict_logits(model.to(device), images.images, views.plain, device, cfg.train.eval_batch_size)
    metrics = classification_metrics(logits, images.labels)
    result = {"checkpoint": checkpoint, "step": int(meta["step"]), "split": split, **metrics}
    stem = f"evaluation-{checkpoint}-{split}"
    text = json.dumps(result, indent=2)
    atomic_write_text(run_dir / f"{stem}.json", text)
    reliability_diagram(
        reliability_bins(logits, images.labels),
        run_dir / f"{stem}.png",
        f"{checkpoint} checkpoint (step {meta['step']}), {split} split",
        metrics["ece_15"],
    )
    return result
