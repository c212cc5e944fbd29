"""A run directory's model, rebuilt by its task from a checkpoint, for evaluation and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from trustmatch.config import Config, from_saved
from trustmatch.core.errors import UserError
from trustmatch.core.precision import Precision, resolve_device
from trustmatch.run.checkpoint import CHECKPOINT_VERSION, load_checkpoint, load_weights
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


class LoadedRun(NamedTuple):
    model: nn.Module  # the EMA model, in eval mode, on ``precision.device`` in its memory format
    meta: dict[str, Any]
    task: type[Task]
    cfg: Config
    precision: Precision


def load_run_model(path: Path) -> LoadedRun:
    """A checkpoint's EMA model (see ``checkpoint_path``), placed where it runs now (not where it
    was trained) with the run's precision, plus its metadata, task and config."""
    state = load_checkpoint(path)
    if state.get("version") != CHECKPOINT_VERSION or "ema" not in state.get("parts", {}) or "config" not in state:
        raise UserError(
            f"checkpoint {path} is not a trustmatch checkpoint of version {CHECKPOINT_VERSION} "
            f"(version {state.get('version')}): evaluate it with the trustmatch version that wrote it"
        )
    cfg = from_saved(state["config"])
    task = TASKS.get(cfg.task)
    model = task.model_for(state)
    load_weights(model, state["parts"]["ema"], path)
    precision = Precision.resolve(resolve_device("auto"), cfg.train.amp, cfg.train.channels_last)
    return LoadedRun(precision.prepare(model.to(precision.device)).eval(), state, task, cfg, precision)
