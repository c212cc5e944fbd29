"""The run directory: checked before anything is built, created only once it is, and emptied again of
what a run added when it fails before its first ``last.pt`` (it never removes a file it did not write).

Only the main process calls these (through ``dist.on_main`` where every process must learn of a failure).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from trustmatch.config import Config, from_saved, merge_values, parse_overrides, read_yaml
from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text

# what a run writes into its directory: a failed start removes these, never anything else
RUN_FILES = (
    "config.yaml", "metrics.json", "train_log.jsonl", "last.pt", "best.pt", "findings.pt", "tensorboard", "*.png",
    "*.csv", ".*.tmp",
)  # fmt: skip
TRAIN_LOG = "train_log.jsonl"  # one line per train.log_every: the averages TensorBoard gets, without it

# what --resume may change: none of them changes the steps already taken
RESUME_KEYS = (
    "train.steps",
    "train.eval_every",
    "train.log_every",
    "train.save_every",
    "train.nonfinite",
    "train.prefetch",
)


class RunDirectory:
    """One run's folder, its config.yaml, metrics.json and TensorBoard writer."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.writer: Any = None  # a TensorBoard SummaryWriter once opened (tensorboard is optional)
        self._made: tuple[list[Path], set[str]] | None = None  # folders this run created, entries it found

    def check(self) -> None:
        """A clash with an existing run, or a folder that cannot be written, before anything is built."""
        if (self.path / "last.pt").exists():
            raise UserError(
                f"run directory {self.path} already holds a run: use --resume {self.path} "
                "to continue it, or --out with a new directory"
            )
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file: choose a directory for the run")
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot write the run directory {self.path}: {existing} is not writable; choose another --out"
            )

    def create(self, cfg: Config) -> None:
        """The directory and its config.yaml; a failed write removes what this call created."""
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        found = set(os.listdir(self.path)) if self.path.is_dir() else set()
        self._made = created, found
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.write_config(cfg)
        except (UserError, OSError) as e:
            self.unmake()
            if isinstance(e, UserError):
                raise
            reason = e.strerror or type(e).__name__
            raise UserError(f"cannot create the run directory {self.path} ({reason}): use another --out") from None

    def unmake(self) -> None:
        """Remove what this run added to its directory (and the folders it created): a run that
        failed on bad input before its first ``last.pt`` leaves nothing half-made behind."""
        if self._made is None:
            return
        created, found = self._made
        self.close()
        if self.path.is_dir():
            ours = {entry for pattern in RUN_FILES for entry in self.path.glob(pattern)}
            for entry in ours:
                if entry.name not in found:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break

    def saved_config(self, overrides: list[str]) -> Config:
        """The run's config.yaml, with ``overrides`` of the keys a resumed run may change (``RESUME_KEYS``)."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise UserError(f"{self.path} is not a trustmatch run directory (no config.yaml)")
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            if key not in RESUME_KEYS:
                raise UserError(
                    f"--resume can change only {', '.join(RESUME_KEYS)}, not {key!r}: start a new run (--out) instead"
                )
        return from_saved(merge_values(read_yaml(path), parse_overrides(overrides)))

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_text(self.path / "metrics.json", json.dumps(metrics, indent=2))

    def remove_stale_temp_files(self) -> None:
        """Temp files of checkpoint writes a SIGKILL interrupted: the run's own, never read."""
        for stale in self.path.glob(".*.pt.*.tmp"):
            stale.unlink(missing_ok=True)

    def open_writer(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(self.path / "tensorboard"))

    def log_train(self, values: dict[str, float], step: int) -> None:
        """Append the step's training averages to ``train_log.jsonl``: pseudo-label quantity and quality over
        training stay readable where TensorBoard is not installed."""
        with open(self.path / TRAIN_LOG, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def trim_train_log(self, step: int) -> None:
        """A resumed run drops the lines it logged after its ``last.pt``: it logs those steps again."""
        path = self.path / TRAIN_LOG
        if path.is_file():
            lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            atomic_write_text(path, "".join(line + "\n" for line in lines))

    def scalars(self, group: str, values: dict[str, Any], step: int) -> None:
        """``group/name`` TensorBoard scalars at ``step``, where a writer is open."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{group}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
