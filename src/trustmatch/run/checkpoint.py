"""Checkpoints that survive crashes and never execute code on load.

Writes go to a temporary file in the same directory, are flushed to disk, then atomically
renamed over the old file: an interrupted write leaves the previous checkpoint intact. Loads use
``weights_only=True``, so a checkpoint carrying pickled code is refused instead of run. Before
loading, every record of the archive is checked against its CRC-32 (``torch.save`` writes them;
``torch.load`` does not check them): a flipped byte in a tensor would otherwise load silently.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_bytes

CHECKPOINT_VERSION = 2  # 2: every stateful part under "parts" (1: fixed top-level keys)


def save_checkpoint(state: Any, path: Path) -> None:
    """Write ``state`` atomically, with the CRC-32s ``load_checkpoint`` checks (whatever the
    process-wide ``torch.serialization.set_crc32_options`` says)."""
    serialization = torch.serialization
    if not hasattr(serialization, "get_crc32_options"):  # torch < 2.6 always writes them
        atomic_write_bytes(path, lambda f: torch.save(state, f))
        return
    crc = serialization.get_crc32_options()
    serialization.set_crc32_options(True)
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    finally:
        serialization.set_crc32_options(crc)


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
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise UserError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data "
            f"({first[:160]}); only load checkpoints you trust, written by trustmatch"
        ) from None
    except Exception as e:  # a damaged archive fails in many ways (zip, pickle, unicode, struct): all mean the same
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} is unreadable or truncated ({first}): use an earlier copy, or start the run again"
        ) from None


def _check_archive(path: Path) -> None:
    """One line for a file that is not a whole zip archive or whose records fail their CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(
            f"checkpoint {path} is unreadable or truncated ({e}): use an earlier copy, or start the run again"
        ) from None
    if damaged is not None:
        raise UserError(
            f"checkpoint {path} is damaged ({damaged} fails its CRC-32 check): use an earlier copy, "
            "or start the run again"
        )
