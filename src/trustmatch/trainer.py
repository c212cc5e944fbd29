"""The one training loop: every task, every method, one process or many (torchrun).

The trainer owns what every run shares: the loop, EMA, optimizer and schedule, checkpoints, RNG
streams, processes, progress and the run directory. Everything task-specific is behind ``Task``.
Every stateful part (model, EMA, optimizer, scheduler and the task's selector, streams and
trackers) is one entry of ``parts``, saved and restored by the same code, so ``--resume``
continues the run as if it had never stopped. Only the main process writes files.

SIGINT and SIGTERM (a scheduler's notice before preemption) end the current step, save ``last.pt``
at it and stop; every process agrees on the step in the same collective that checks the loss for
non-finite values, so no process waits for another in a collective it never reaches.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trustmatch import distributed as dist
from trustmatch.config import Config, from_dict, merge_values, parse_overrides, read_yaml
from trustmatch.data.sampler import IndexStream
from trustmatch.engine.checkpoint import CHECKPOINT_VERSION, load_checkpoint, load_weights, save_checkpoint
from trustmatch.engine.ema import ModelEMA
from trustmatch.engine.optim import build_optimizer, build_scheduler
from trustmatch.engine.precision import Precision, resolve_device
from trustmatch.engine.progress import Progress
from trustmatch.errors import UserError
from trustmatch.fileio import atomic_write_text
from trustmatch.metrics import NonFiniteLogits
from trustmatch.step import StepOutput
from trustmatch.tasks import TASKS, Evaluation, Stateful

# what --resume may change: none of them changes the steps already taken
RESUME_KEYS = ("train.steps", "train.eval_every", "train.log_every", "train.save_every", "train.nonfinite")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHOWN = ("loss_sup", "loss_unsup", "mask", "pl_acc")  # the averages a progress line shows
MAX_CONSECUTIVE_SKIPS = 100  # train.nonfinite=skip: a run this broken stops instead of skipping on
# what a run writes into its directory: a failed start removes these, never anything else
RUN_FILES = ("config.yaml", "metrics.json", "last.pt", "best.pt", "tensorboard", "*.png", "*.csv", ".*.tmp")
NO_BEST = "no validation split: no checkpoint is chosen, `final` is the result"
NO_TEMPERATURE = "no validation split (data.val_per_class=0): temperature scaling cannot be fitted (never on test)"
SEPARABLE = (
    "the validation split is classified without error, so its NLL falls as T -> 0 and identifies no "
    "temperature: the model is reported raw"
)
NO_TEST = (
    "no test split (a segmentation folder without data.test_dir): `final` and every history entry's `test` "
    "are the validation split, which also chose `best`; give a test folder for an unbiased figure"
)
OPTIMISTIC = "max over evaluations of test {metric}, as USB reports it: optimistic, never used for a choice"


class NonFiniteLoss(UserError):
    """The loss of a step was NaN or infinite (``train.nonfinite=stop``)."""


class Trainer:
    """Builds a run from a config (or resumes one from its directory) and trains it."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        task_cls = TASKS.get(cfg.task)
        self.device = resolve_device(cfg.train.device)
        dist.init_from_env(self.device)
        if not resume:
            dist.on_main(self._check_run_dir)  # before the data load: a clash is reported at once
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.precision = Precision.resolve(self.device, cfg.train.amp, cfg.train.channels_last)
        self.task = task_cls(cfg, self.precision)
        for regularizer in self.task.regularizers.values():
            regularizer.to(self.device)

        torch.manual_seed(cfg.seed)  # the same initial weights on every process ...
        self.model = self.precision.prepare(self.task.build_model().to(self.device))
        dist.broadcast_module(self.model)  # ... guaranteed, before the EMA copies them
        self.ema = ModelEMA(self.model, cfg.train.ema)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.train_model: nn.Module = self.model
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)
        torch.manual_seed(cfg.seed + dist.rank())  # per-process streams (dropout) from here on
        self.aug_rng = torch.Generator().manual_seed(cfg.seed * 7919 + dist.rank())
        self.parts: dict[str, Stateful] = {
            "model": self.model,
            "ema": self.ema,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            **self.task.state_parts(),
            **{f"regularizer.{name}": r for name, r in self.task.regularizers.items()},
        }
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0
        self._last_test: Evaluation | None = None
        self.temperature: float | None = None  # fitted on validation at the last evaluation ...
        self.temperature_step = -1  # ... of the model at this step
        self.skipped = 0  # steps skipped for a non-finite loss or update (train.nonfinite=skip)
        self.consecutive_skips = 0
        self.saved_step: int | None = None  # the step of the last.pt on disk, for error messages
        self._made: tuple[list[Path], set[str]] | None = None  # folders this run created, entries it found
        self.stop_requested: int | None = None  # a SIGINT / SIGTERM this process received during ``fit``
        self.stop_signal: int | None = None  # ... once every process knows of it (at the same step)
        if resume:
            self._restore(self.run_dir / "last.pt")
            self.saved_step = self.step
        else:
            dist.on_main(self._create_run_dir)  # only once the data and the model are built: no half-made run
        self.writer = self._tensorboard()

    # ------------------------------------------------------------------ run directory and state

    def _check_run_dir(self) -> None:
        """A clash with an existing run, or a folder that cannot be written, before anything is built."""
        if (self.run_dir / "last.pt").exists():
            raise UserError(
                f"run directory {self.run_dir} already holds a run: use --resume {self.run_dir} "
                "to continue it, or --out with a new directory"
            )
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir} is a file: choose a directory for the run")
        existing = next(p for p in (self.run_dir, *self.run_dir.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot write the run directory {self.run_dir}: {existing} is not writable; choose another --out"
            )

    def _create_run_dir(self) -> None:
        """The directory and its config.yaml; a failed write removes what this call created."""
        created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        found = set(os.listdir(self.run_dir)) if self.run_dir.is_dir() else set()
        self._made = created, found
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        except (UserError, OSError) as e:
            self._unmake_run_dir()
            if isinstance(e, UserError):
                raise
            reason = e.strerror or type(e).__name__
            raise UserError(f"cannot create the run directory {self.run_dir} ({reason}): use another --out") from None

    def _unmake_run_dir(self) -> None:
        """Remove what this run added to its directory (and the folders it created): a run that
        failed on bad input before its first ``last.pt`` leaves nothing half-made behind."""
        if self._made is None:
            return
        created, found = self._made
        if getattr(self, "writer", None) is not None:
            self.writer.close()
            self.writer = None
        if self.run_dir.is_dir():
            ours = {entry for pattern in RUN_FILES for entry in self.run_dir.glob(pattern)}
            for entry in ours:
                if entry.name not in found:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break

    def _write_config(self) -> None:
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _tensorboard(self) -> Any:
        if not dist.is_main():
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _meta(self) -> dict[str, Any]:
        """What inference needs; the temperature only where it was fitted on this step's model."""
        meta = {**self.task.meta(), "version": CHECKPOINT_VERSION, "step": self.step, "global_batch": True}
        fitted = self.temperature is not None and self.temperature_step == self.step
        return {**meta, "temperature": self.temperature} if fitted else meta

    def _rank_state(self) -> dict[str, Any]:
        """What differs between processes: RNG streams and the regularizers' per-rank state."""
        state: dict[str, Any] = {"aug": self.aug_rng.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        state["regularizers"] = {name: r.rank_state() for name, r in self.task.regularizers.items()}
        return state

    def _save_last(self) -> None:
        """``last.pt``: every part, every process's RNG streams (by rank) and the run's record."""
        rng = dist.all_gather_objects(self._rank_state())  # collective: every process calls it

        def save() -> None:
            state = {
                **self._meta(),
                "parts": {name: part.state_dict() for name, part in self.parts.items()},
                "rng": rng,
                "run": {"history": self.history, "best": self.best, "elapsed": self.elapsed, "skipped": self.skipped},
            }
            save_checkpoint(state, self.run_dir / "last.pt")

        dist.on_main(save)  # a failed write stops every process with the same line
        self.saved_step = self.step

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        try:
            self._restore_state(state, path)
        except torch.OutOfMemoryError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:  # parsed, not whole
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            raise UserError(
                f"checkpoint {path} is incomplete or damaged ({type(e).__name__}: {first}): "
                "use an earlier copy, or start the run again"
            ) from None
        if dist.is_main():  # temp files of writes a SIGKILL interrupted: the run's own, never read
            for stale in self.run_dir.glob(".*.pt.*.tmp"):
                stale.unlink(missing_ok=True)

    def _restore_state(self, state: dict[str, Any], path: Path) -> None:
        if state.get("version") != CHECKPOINT_VERSION or set(state.get("parts", {})) != set(self.parts):
            raise UserError(
                f"checkpoint {path} does not fit this run (version {state.get('version')}, parts "
                f"{sorted(state.get('parts', {}))}; this trustmatch expects version {CHECKPOINT_VERSION}, "
                f"parts {sorted(self.parts)}): resume it with the trustmatch version that wrote it"
            )
        for name, part in self.parts.items():
            load_weights(part, state["parts"][name], path)
        # the current lr from the schedule (which may now span an extended train.steps), not as saved
        lrs = zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas)
        for group, base, factor in lrs:
            group["lr"] = base * factor(self.scheduler.last_epoch)
        if len(state["rng"]) != dist.world_size():
            raise UserError(
                f"{path} was written by {len(state['rng'])} process(es): resume it with the same number "
                f"(this is {dist.world_size()}), so every process gets its own data and RNG streams back"
            )
        if len(state["rng"]) > 1 and not state.get("global_batch"):
            batch = self.cfg.train.batch_size
            raise UserError(
                f"{path} was written when train.batch_size was per process: resume it with "
                f"train.batch_size={batch * len(state['rng'])} (the global batch it trained with) in its config.yaml"
            )
        rng = state["rng"][dist.rank()]
        self.aug_rng.set_state(rng["aug"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        for name, regularizer in self.task.regularizers.items():
            regularizer.load_rank_state(rng["regularizers"][name])
        self.step = int(state["step"])
        run = state["run"]
        self.history, self.best, self.elapsed = run["history"], run["best"], float(run["elapsed"])
        self.skipped = int(run.get("skipped", 0))
        self.temperature = state.get("temperature")
        self.temperature_step = self.step

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None, progress: bool = True) -> Trainer:
        """Continue the run in ``run_dir``; ``overrides`` may change RESUME_KEYS (extend train.steps)."""
        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise UserError(f"{run_dir} is not a trustmatch run directory (no config.yaml)")
        values = read_yaml(path)
        for item in overrides or []:
            key = item.split("=", 1)[0].strip()
            if key not in RESUME_KEYS:
                raise UserError(
                    f"--resume can change only {', '.join(RESUME_KEYS)}, not {key!r}: start a new run (--out) instead"
                )
        values = merge_values(values, parse_overrides(overrides or []))
        trainer = cls(from_dict(values), Path(run_dir), resume=True, progress=progress)
        if trainer.step > trainer.cfg.train.steps:
            raise UserError(
                f"{run_dir} is at step {trainer.step}: train.steps={trainer.cfg.train.steps} cannot shorten it"
            )
        if overrides and dist.is_main():
            trainer._write_config()
        return trainer

    # ------------------------------------------------------------------ training

    def next_batch(self) -> Any:
        return self.task.next_batch(self.aug_rng)

    def train_step(self) -> StepOutput:
        return self.optimize(self.next_batch())

    def optimize(self, batch: Any) -> StepOutput:
        """Forward, backward and update on a prepared batch (the part the speed benchmark isolates).

        Between forward and backward every process learns whether any loss was non-finite and
        whether any process was asked to stop (one small collective under torchrun)."""
        self.train_model.train()
        snapshot = self._snapshot() if self.cfg.train.nonfinite == "skip" else None
        with self.precision.autocast():
            out = self.task.step_with_regularizers(self.train_model, batch, self.step, self.cfg.train.steps)
        bad_rank, what = self._agree(out.loss), "the loss is"
        if bad_rank is None and snapshot is not None:  # skip mode: the update must be finite too
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()  # DDP's averaged gradients are the same on every process
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            bad_rank = None if bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) else dist.rank()
            what = "the gradient is"
        if bad_rank is not None:
            if snapshot is None:
                raise self._nonfinite_error(out, bad_rank)
            return self._skip(out, snapshot, bad_rank, what)
        if snapshot is None:
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        self.consecutive_skips = 0
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return out

    def _agree(self, loss: torch.Tensor) -> int | None:
        """The rank of a process whose loss is not finite (None: all finite); records a stop any
        process was asked for. One collective for both under torchrun."""
        bad = ~torch.isfinite(loss.detach())
        if not dist.is_distributed():
            return 0 if bool(bad) else None
        requested = torch.tensor(self.stop_requested or 0, dtype=torch.int32, device=loss.device)
        flags = torch.stack([bad.to(torch.int32) * (dist.rank() + 1), requested])
        dist.all_reduce_max_(flags)
        if int(flags[1]):
            self.stop_signal = int(flags[1])
        return int(flags[0]) - 1 if int(flags[0]) else None

    def _skip(self, out: StepOutput, snapshot: dict[str, Any], bad_rank: int, what: str) -> StepOutput:
        """No update; what the forward changed is restored; the schedule and the data move on."""
        self._restore_snapshot(snapshot)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # no optimizer.step() on purpose: the schedule follows the step count
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise self._nonfinite_error(out, bad_rank, f"{MAX_CONSECUTIVE_SKIPS} steps in a row, up to ", what)
        self.step += 1
        out.logs = {}
        return out

    def _nonfinite_error(
        self, out: StepOutput | None, bad_rank: int, span: str = "", what: str = "the loss is"
    ) -> NonFiniteLoss:
        where = f" on process {bad_rank}" if dist.is_distributed() else ""
        logs = out.logs if out is not None else {}
        parts = ", ".join(f"{k} {float(v):.3g}" for k, v in logs.items() if k.startswith("loss"))
        shown = f" ({parts})" if parts and not where else ""
        saved = "no checkpoint was saved yet"
        if self.saved_step is not None:
            saved = f"the last good checkpoint is {self.run_dir / 'last.pt'} (step {self.saved_step})"
        if span:  # skipping did not help
            fix = "lower train.lr and start again"
        elif self.saved_step is not None:
            fix = "resume it with train.nonfinite=skip to skip such steps, or lower train.lr and start again"
        else:
            fix = "lower train.lr and start again (train.nonfinite=skip skips such steps)"
        step = self.step + (out is not None)  # a step's loss: the step being taken; an evaluation: the one taken
        error = NonFiniteLoss(f"{what} not finite{where} at {span}step {step}{shown}; {saved}: {fix}")
        error.everywhere = out is not None  # a step's verdict is agreed: the CLI prints it once
        return error

    def _snapshot(self) -> dict[str, Any]:
        """What a step's forward changes besides the weights: BatchNorm statistics, selector and
        regularizer state (streams move on: a skipped batch is not drawn again)."""
        kept = ("model", "ema", "optimizer", "scheduler")  # untouched by a skipped step, or moving on
        parts = {n: p for n, p in self.parts.items() if n not in kept and not isinstance(p, IndexStream)}
        return {
            "buffers": [b.detach().clone() for b in self.model.buffers()],
            "parts": {n: copy.deepcopy(p.state_dict()) for n, p in parts.items()},
            "rank": {n: copy.deepcopy(r.rank_state()) for n, r in self.task.regularizers.items()},
        }

    def _restore_snapshot(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), snapshot["buffers"]):
                buffer.copy_(saved)
        for name, state in snapshot["parts"].items():
            self.parts[name].load_state_dict(state)
        for name, state in snapshot["rank"].items():
            self.task.regularizers[name].load_rank_state(state)

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps``. ``stop_at``, SIGINT or SIGTERM save ``last.pt`` at the current step
        and stop early (``stop_signal`` names the signal)."""
        t = self.cfg.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        desc = f"{self.cfg.method.name} on {self.cfg.data.name}"
        progress = Progress(t.steps, self.step, desc, enabled=self.progress and dist.is_main())
        if dist.is_main():
            progress.write(f"{self.task.summary()}; {self.precision.describe()}; run directory {self.run_dir}")
        start = time.perf_counter() - self.elapsed
        self.stop_requested = self.stop_signal = None
        previous = self._catch_stop_signals()
        try:
            try:
                self._train(end, progress, start)
            except UserError as e:  # bad input met in training (a file read late, a full disk)
                if self.saved_step is None and dist.is_main() and not isinstance(e, NonFiniteLoss):
                    self._unmake_run_dir()  # (a diverged run keeps its logs)
                raise
            finally:
                progress.close()
            if self.step < t.steps:
                self.elapsed = time.perf_counter() - start
                if self.saved_step != self.step:
                    self._save_at_stop()  # still under the handlers: a repeated SIGTERM cannot cut it short
                if self.stop_signal is not None and dist.is_main():
                    name = signal.Signals(self.stop_signal).name
                    progress.write(f"{name}: saved {self.run_dir / 'last.pt'} at step {self.step}")
                return self.metrics(final=None)
        finally:
            self._restore_signals(previous)
        return self._finish()

    def _train(self, end: int, progress: Progress, start: float) -> None:
        t = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        count = 0
        while self.step < end and self._stopping() is None:
            logs = self.train_step().logs  # the step's logits are not kept alive through the next step
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += bool(logs)
            progress.update(1)
            if (self.step % t.log_every == 0 or self.step == t.steps) and count:
                self._log_train({k: float(v) / count for k, v in sums.items()}, progress)
                sums, count = {}, 0
            if self.step % t.eval_every == 0 or self.step == t.steps:
                self.elapsed = time.perf_counter() - start
                self._evaluate_and_save(progress)
            elif t.save_every and self.step % t.save_every == 0:
                self.elapsed = time.perf_counter() - start
                self._save_last()

    def _stopping(self) -> int | None:
        """The signal to stop at this step: one process's own, or under torchrun the one all agreed on."""
        if not dist.is_distributed():
            self.stop_signal = self.stop_requested
        return self.stop_signal

    def _save_at_stop(self) -> None:
        """``last.pt`` between evaluations. With ``stop_at`` it keeps a temperature for its model; a
        signal saves at once (a scheduler's grace period is short), without one."""
        if self.stop_signal is None and self.task.fits_temperature and self.temperature_step != self.step:
            dist.broadcast_module(self.ema.module)
            _, self.temperature = self._validate()
            self.temperature_step = self.step
        self._save_last()

    def _catch_stop_signals(self) -> dict[int, Any]:
        """SIGINT / SIGTERM set ``stop_signal``: the step ends, then ``fit`` saves and returns. A second
        signal stops at once (KeyboardInterrupt); the last saved checkpoint stays intact."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}  # signals reach only the main thread; a trainer in a thread is stopped by its owner

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested is None:
                self.stop_requested = signum
            elif signum == signal.SIGINT:  # a person pressing Ctrl-C again; a repeated SIGTERM (a
                raise KeyboardInterrupt  # scheduler signalling every process torchrun also signals) waits

        previous = {}
        for signum in STOP_SIGNALS:
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _log_train(self, logs: dict[str, float], progress: Progress) -> None:
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        logs.update(self.task.train_stats())
        progress.log({k: v for k, v in logs.items() if k in SHOWN})
        if self.writer is not None:
            for k, v in logs.items():
                self.writer.add_scalar(f"train/{k}", v, self.step)

    # ------------------------------------------------------------------ evaluation

    @property
    def report_split(self) -> str:
        """The split behind `final` and `test`: the test split, or validation where a task has no test."""
        return "test" if self.task.has_split("test") else "val"

    def evaluate(self, split: str, temperature: float | None = None) -> Evaluation:
        """The EMA model on ``split``, streamed and sharded over processes (and temperature-scaled)."""
        return self.task.evaluate(self.ema.module, split, temperature)

    def _validate(self) -> tuple[dict[str, float], float | None]:
        """The EMA model's validation metrics and temperature ({} and None without a validation split)."""
        return self.task.validate(self.ema.module) if self.task.has_split("val") else ({}, None)

    def _evaluate_and_save(self, progress: Progress) -> None:
        # EMA parameters agree across processes; its buffers, copied from each process's last
        # forward, do not: rank 0's are the ones saved, so every shard evaluates with them.
        dist.broadcast_module(self.ema.module)
        try:
            val, self.temperature = self._validate()
            self.temperature_step = self.step
            self._last_test = test = self.evaluate(self.report_split, self.temperature)
        except NonFiniteLogits:
            raise self._nonfinite_error(None, dist.rank(), what="the EMA model's outputs are") from None
        entry = {"step": self.step, "elapsed_s": round(self.elapsed, 2), "val": val, "test": test.metrics}
        if test.calibrated is not None:
            entry.update(temperature=self.temperature, test_calibrated=test.calibrated)
        self.history.append(entry)
        score = self.task.score
        improved = bool(val) and (self.best is None or score(val) > score(self.best["val"]))
        if improved:
            self.best = entry
            state = {**self._meta(), "parts": {"ema": self.ema.state_dict()}}
            dist.on_main(lambda: save_checkpoint(state, self.run_dir / "best.pt"))  # before last.pt, which records it
        self._save_last()
        dist.on_main(lambda: self._report(progress, val, test, improved))

    def _report(self, progress: Progress, val: dict[str, float], test: Evaluation, improved: bool) -> None:
        """The main process's log line, TensorBoard scalars, diagram and metrics.json of an evaluation."""
        key = self.task.primary
        shown = f"val {key} {val[key]:.4f} | " if val else ""
        best = " (best)" if improved else ""
        progress.write(f"step {self.step}: {shown}test {self.task.describe(test.metrics)}{best}")
        if self.writer is not None:
            for split, m in (("val", val), ("test", test.metrics)):
                for k, v in m.items():
                    if isinstance(v, (int, float)):  # not segmentation's per-class table
                        self.writer.add_scalar(f"{split}/{k}", v, self.step)
        if improved:
            title = f"best (step {self.step}, chosen on validation)"
            self.task.write_artefacts(test, self.run_dir / "reliability_best", title)
        self._write_metrics(final=None)

    def _finish(self) -> dict[str, Any]:
        final = self.history[-1]["test"]
        if self._last_test is None:  # a resumed, already finished run
            self.temperature = self.history[-1].get("temperature")
            self._last_test = self.evaluate(self.report_split, self.temperature)
        test = self._last_test
        self.task.write_final(self.ema.module, self.run_dir)  # every process calls it (the task may use collectives)

        def write() -> None:
            title = f"final EMA model (step {self.step})"
            self.task.write_artefacts(test, self.run_dir / "reliability_final", title)
            if test.calibrated is not None:
                calibrated = Evaluation(test.calibrated, test.calibrated_detail)
                scaled = f"{title}\ntemperature {self.temperature:.3f}, fitted on validation"
                self.task.write_artefacts(calibrated, self.run_dir / "reliability_final_calibrated", scaled)
            self.task.write_history(self.history, self.run_dir)
            self._write_metrics(final=final)
            if self.writer is not None:
                self.writer.close()

        dist.on_main(write)  # a collective: every process learns of a failed write
        return self.metrics(final)

    def metrics(self, final: dict[str, float] | None) -> dict[str, Any]:
        key = self.task.primary
        best = None
        if self.best is not None:
            best = {**self.best["test"], "step": self.best["step"], "val": self.best["val"]}
            if "temperature" in self.best:
                best.update(temperature=self.best["temperature"], calibrated=self.best["test_calibrated"])
        last, test = (self.history[-1] if self.history else {}), self._last_test
        calibration = {
            "temperature": last.get("temperature"),
            **({"temperature_note": self._temperature_note()} if self._temperature_missing(last) else {}),
            "final_calibrated": last.get("test_calibrated") if final is not None else None,
            "final_bins": {"15": test.detail} if final is not None and test is not None else None,
            "final_calibrated_bins": {"15": test.calibrated_detail}
            if final is not None and test is not None and test.calibrated is not None
            else None,
        }
        optimistic = max(self.history, key=lambda e: e["test"][key], default=None)
        return {
            "task": self.cfg.task,
            "method": self.cfg.method.name,
            "dataset": self.cfg.data.name,
            "seed": self.cfg.seed,
            "steps": self.step,
            "precision": self.precision.describe(),
            "wall_time_s": round(self.elapsed, 2),
            "skipped_steps": self.skipped,
            "final": final,
            **calibration,
            "best": best,
            **({} if self.task.has_split("val") else {"best_note": NO_BEST}),
            **({} if self.report_split == "test" else {"test_note": NO_TEST}),
            "optimistic_best_test": None
            if optimistic is None
            else {key: optimistic["test"][key], "step": optimistic["step"], "note": OPTIMISTIC.format(metric=key)},
            "history": self.history,
            "split": self.task.split_sizes(),
        }

    def _temperature_missing(self, last: dict[str, Any]) -> bool:
        """No temperature where one was tried (an evaluation ran), or where none can be (no val split)."""
        tried = bool(last) or not self.task.has_split("val")
        return self.task.fits_temperature and last.get("temperature") is None and tried

    def _temperature_note(self) -> str:
        return SEPARABLE if self.task.has_split("val") else NO_TEMPERATURE

    def _write_metrics(self, final: dict[str, float] | None) -> None:
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(self.metrics(final), indent=2))
