"""Checkpoints that survive crashes and never execute code on load.

Writes go to a temporary file in the same directory, are flushed to disk, then atomically
renamed over the old file: an interrupted write leaves the previous checkpoint intact. Loads use
``weights_only=True``, so a checkpoint carrying pickled code is refused instead of run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from trustmatch.errors import UserError


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_weights(module: Any, state: dict[str, Any], path: Path) -> None:
    """``module.load_state_dict`` with a one-line error when the checkpoint does not fit the model."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = str(e).strip().splitlines()
        detail = lines[-1].strip()[:160] if lines else type(e).__name__
        raise UserError(
            f"checkpoint {path} does not fit the model its config builds ({detail}); "
            "was it written by another trustmatch version or edited?"
        ) from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: is this a trustmatch run directory?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise UserError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data "
            f"({first[:160]}); only load checkpoints you trust, written by trustmatch"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"checkpoint {path} is unreadable or truncated ({str(e).splitlines()[0][:160]})") from None
