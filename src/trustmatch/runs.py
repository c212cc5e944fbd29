"""Loading a finished (or interrupted) run's model for evaluation and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmatch.engine.checkpoint import load_checkpoint, load_weights
from trustmatch.errors import UserError
from trustmatch.models import build_model

CHECKPOINTS = ("best", "last")


def load_run_model(
    run_dir: Path, which: str = "best", device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The EMA model of ``best.pt`` (chosen on validation) or ``last.pt``, in eval mode, and its metadata."""
    if which not in CHECKPOINTS:
        raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    path = run_dir / f"{which}.pt"
    state = load_checkpoint(path, device)
    weights = state["model"] if which == "best" else state["ema"]
    cfg = state["config"]
    model = build_model(
        cfg["model"]["name"],
        len(state["classes"]),
        state["channels"],
        bn_momentum=cfg["model"]["bn_momentum"],
        dropout=cfg["model"]["dropout"],
    ).to(device)
    load_weights(model, weights, path)
    return model.eval(), state
