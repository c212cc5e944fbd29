"""Checkpoints that survive crashes and never execute code on load.

Writes go to a temporary file in the same directory, are flushed to disk, then atomically
renamed over the old file: an interrupted write leaves the previous checkpoint intact. Loads use
``weights_only=True``, so a checkpoint carrying pickled code is refused instead of run.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from trustmatch.errors import UserError
from trustmatch.fileio import atomic_write_bytes

CHECKPOINT_VERSION = 2  # 2: every stateful part under "parts" (1: fixed top-level keys)


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
