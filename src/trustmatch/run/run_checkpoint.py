"""``last.pt`` and resume: every stateful part, every process's RNG streams by rank, and the checks that
a checkpoint fits the run that resumes it (version, parts, process count, global batch)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError
from trustmatch.methods.step_output import Regularizer
from trustmatch.run.checkpoint import CHECKPOINT_VERSION, load_weights, save_checkpoint
from trustmatch.tasks import Stateful


@contextmanager
def whole_checkpoint(path: Path) -> Iterator[None]:
    """A parsed checkpoint without the structure a run reads is one line, not a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:  # parsed, not whole
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise UserError(
            f"checkpoint {path} is incomplete or damaged ({type(e).__name__}: {first}): "
            "use an earlier copy, or start the run again"
        ) from None


class RunCheckpoint:
    """Saves and restores ``parts`` (each by its ``state_dict``), the augmentation, torch and CUDA RNG
    streams and the regularizers' per-rank state of every process."""

    def __init__(
        self,
        parts: dict[str, Stateful],
        aug_rng: torch.Generator,
        device: torch.device,
        regularizers: dict[str, Regularizer],
    ) -> None:
        self.parts, self.aug_rng, self.device, self.regularizers = parts, aug_rng, device, regularizers

    def rank_state(self) -> dict[str, Any]:
        """What differs between processes: RNG streams and the regularizers' per-rank state."""
        state: dict[str, Any] = {"aug": self.aug_rng.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        state["regularizers"] = {name: r.rank_state() for name, r in self.regularizers.items()}
        return state

    def save(self, path: Path, meta: dict[str, Any], run: dict[str, Any]) -> None:
        """A collective: every process gives its RNG state; the main process writes (a failed write
        stops every process with the same line)."""
        rng = dist.all_gather_objects(self.rank_state())

        def save() -> None:
            parts = {name: part.state_dict() for name, part in self.parts.items()}
            save_checkpoint({**meta, "parts": parts, "rng": rng, "run": run}, path)

        dist.on_main(save)

    def restore(self, state: dict[str, Any], path: Path, batch_size: int) -> None:
        """Every part and this process's streams from a loaded ``state``; one line where it does not fit."""
        if state.get("version") != CHECKPOINT_VERSION or set(state.get("parts", {})) != set(self.parts):
            raise UserError(
                f"checkpoint {path} does not fit this run (version {state.get('version')}, parts "
                f"{sorted(state.get('parts', {}))}; this trustmatch expects version {CHECKPOINT_VERSION}, "
                f"parts {sorted(self.parts)}): resume it with the trustmatch version that wrote it"
            )
        for name, part in self.parts.items():
            load_weights(part, state["parts"][name], path)
        if len(state["rng"]) != dist.world_size():
            raise UserError(
                f"{path} was written by {len(state['rng'])} process(es): resume it with the same number "
                f"(this is {dist.world_size()}), so every process gets its own data and RNG streams back"
            )
        if len(state["rng"]) > 1 and not state.get("global_batch"):
            raise UserError(
                f"{path} was written when train.batch_size was per process: resume it with "
                f"train.batch_size={batch_size * len(state['rng'])} (the global batch it trained with) in its "
                "config.yaml"
            )
        rng = state["rng"][dist.rank()]
        self.aug_rng.set_state(rng["aug"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        for name, regularizer in self.regularizers.items():
            regularizer.load_rank_state(rng["regularizers"][name])
