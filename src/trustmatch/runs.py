"""A run directory's model, rebuilt by its task from a checkpoint, for evaluation and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmatch.engine.checkpoint import CHECKPOINT_VERSION, load_checkpoint, load_weights
from trustmatch.errors import UserError
from trustmatch.tasks import TASKS, Task

CHECKPOINTS = ("auto", "best", "last")


def checkpoint_path(run_dir: Path, which: str = "auto") -> Path:
    """``best.pt`` (chosen on validation); ``auto``: best.pt, or last.pt for a run without validation split."""
    if which not in CHECKPOINTS:
        raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if which == "auto":
        which = "best" if (run_dir / "best.pt").is_file() else "last"
    elif which == "best" and not (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file():
        raise UserError(
            f"run {run_dir} has no best.pt (no validation split, or no evaluation yet): use --checkpoint last (or auto)"
        )
    return run_dir / f"{which}.pt"


def load_run_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any], type[Task]]:
    """The EMA model of a checkpoint (see ``checkpoint_path``) in eval mode, its metadata and its task."""
    state = load_checkpoint(path, device)
    if state.get("version") != CHECKPOINT_VERSION or "ema" not in state.get("parts", {}) or "config" not in state:
        raise UserError(
            f"checkpoint {path} is not a trustmatch checkpoint of version {CHECKPOINT_VERSION} "
            f"(version {state.get('version')}): evaluate it with the trustmatch version that wrote it"
        )
    task = TASKS.get(state["config"].get("task", "classification"))
    model = task.model_for(state).to(device)
    load_weights(model, state["parts"]["ema"], path)
    return model.eval(), state, task
