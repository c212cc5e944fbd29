"""The one training loop: every task, every method, one process or many (torchrun).

The trainer owns what every run shares: the loop, EMA, optimizer and schedule, checkpoints, RNG
streams, processes and progress; its files are a ``RunDirectory``'s, what it found a ``RunRecord``'s.
Everything task-specific is behind ``Task``. Every stateful part (model, EMA, optimizer, scheduler and
the task's selector, streams and trackers) is one entry of ``parts``, saved and restored by the same
code, so ``--resume`` continues the run as if it had never stopped. Only the main process writes files.

SIGINT and SIGTERM (``StopSignals``) end the current step, save ``last.pt`` at it and stop; every
process agrees on the step in the same collective that checks the loss for non-finite values
(``NonFinitePolicy``), so no process waits for another in a collective it never reaches.
"""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trustmatch.config import Config
from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError
from trustmatch.core.precision import Precision, resolve_device
from trustmatch.evaluation.metrics import NonFiniteLogits
from trustmatch.evaluation.temperature import Temperature
from trustmatch.models.weights import check_source
from trustmatch.run.artefacts import write_diagram, write_final_plots
from trustmatch.run.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from trustmatch.run.checkpoint_findings import collect_findings, save_findings
from trustmatch.run.compiled_step import check_cuda_graphs, compile_step
from trustmatch.run.ema import ModelEMA
from trustmatch.run.nonfinite import NonFiniteLoss, NonFinitePolicy
from trustmatch.run.optim import build_optimizer, build_scheduler
from trustmatch.run.prefetch import BatchSource, prefetch_enabled
from trustmatch.run.progress import Progress
from trustmatch.run.run_checkpoint import RunCheckpoint, whole_checkpoint
from trustmatch.run.run_directory import RunDirectory
from trustmatch.run.run_record import RunRecord
from trustmatch.run.stop_signals import StopSignals
from trustmatch.tasks import TASKS, Evaluation, Stateful, StepOutput

SHOWN = ("loss_sup", "loss_unsup", "mask", "pl_acc")  # the averages a progress line shows

#: called after each evaluation (once last.pt holds it) with the step and the validation metrics; an
#: exception it raises ends ``fit`` there (tune's pruning). Under torchrun it must decide alike everywhere.
EvaluationHook = Callable[[int, dict[str, float]], None]


class Trainer:
    """Builds a run from a config (or resumes one from its directory) and trains it."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.directory, self.progress = cfg, RunDirectory(run_dir), progress
        task_cls = TASKS.get(cfg.task)
        self.device = resolve_device(cfg.train.device)
        dist.init_from_env(self.device)
        check_cuda_graphs(cfg, self.device)
        if not resume:
            dist.on_main(self.directory.check)  # before the data load: a clash is reported at once
            check_source(cfg.model.weights)  # a missing weights file too (a resume never reads it)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.precision = Precision.resolve(self.device, cfg.train.amp, cfg.train.channels_last)
        self.task = task_cls(cfg, self.precision)
        if not cfg.train.evaluate_test and not self.task.has_split("val"):  # before the run directory exists
            raise UserError(
                "train.evaluate_test=false needs a validation split to evaluate on: this data has none "
                "(set data.val_per_class, or give segmentation a validation folder)"
            )
        for regularizer in self.task.regularizers.values():
            regularizer.to(self.device)

        torch.manual_seed(cfg.seed)  # the same initial weights on every process ...
        self.model = self.precision.prepare(self.task.build_model(initial_weights=not resume).to(self.device))
        dist.broadcast_module(self.model)  # ... guaranteed, before the EMA copies them
        self.ema = ModelEMA(self.model, cfg.train.ema)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.train_model: nn.Module = self.model
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.compiled_step = compile_step(cfg, self.task.step_with_regularizers)
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
        self.checkpoint = RunCheckpoint(self.parts, self.aug_rng, self.device, self.task.regularizers)
        self.batches = BatchSource(
            lambda: self.task.next_batch(self.aug_rng),
            self.aug_rng,
            self.task.batch_parts(),
            self.device,
            prefetch_enabled(cfg, self.device),
        )
        last = self.run_dir / "last.pt"
        self.nonfinite = NonFinitePolicy(cfg.train.nonfinite, self.model, self.parts, self.task.regularizers, last)
        self.signals = StopSignals()
        self.record = RunRecord(self.task, test_held_out=not cfg.train.evaluate_test)
        self.evaluation_hooks: list[EvaluationHook] = []
        self.step = 0
        self.saved_step: int | None = None  # the step of the last.pt on disk, for error messages
        if resume:
            self._restore(last)
            self.saved_step = self.step
        else:  # only once the data and the model are built: no half-made run
            dist.on_main(lambda: self.directory.create(cfg))
        if dist.is_main():
            self.directory.open_writer()

    @property
    def run_dir(self) -> Path:
        return self.directory.path

    @property
    def stop_signal(self) -> int | None:
        """The SIGINT / SIGTERM that stopped the last ``fit`` (None: it was not signalled)."""
        return self.signals.agreed

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite loss or update (``train.nonfinite=skip``)."""
        return self.record.skipped

    # ------------------------------------------------------------------ checkpoints and resume

    def _meta(self) -> dict[str, Any]:
        """What inference needs; the temperature only where it was fitted on this step's model."""
        meta = {**self.task.meta(), "version": CHECKPOINT_VERSION, "step": self.step, "global_batch": True}
        temperature = self.record.temperature_at(self.step)
        return meta if temperature is None else {**meta, "temperature": temperature}

    def _save_last(self) -> None:
        """``last.pt``: every part, every process's RNG streams (by rank) and the run's record; the data
        streams as before a batch built ahead (it is built again on resume)."""
        with self.batches.rewound():
            self.checkpoint.save(self.run_dir / "last.pt", self._meta(), self.record.state())
        self.saved_step = self.step

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        with whole_checkpoint(path):
            self.checkpoint.restore(state, path, self.cfg.train.batch_size)
            # the current lr from the schedule (which may now span an extended train.steps), not as saved
            lrs = zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas)
            for group, base, factor in lrs:
                group["lr"] = base * factor(self.scheduler.last_epoch)
            self.step = int(state["step"])
            self.record.load(state, self.step)
        if dist.is_main():
            self.directory.remove_stale_temp_files()
            self.directory.trim_train_log(self.step)

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None, progress: bool = True) -> Trainer:
        """Continue the run in ``run_dir``; ``overrides`` may change ``RESUME_KEYS`` (extend train.steps)."""
        cfg = RunDirectory(Path(run_dir)).saved_config(overrides or [])
        trainer = cls(cfg, Path(run_dir), resume=True, progress=progress)
        if trainer.step > trainer.cfg.train.steps:
            raise UserError(
                f"{run_dir} is at step {trainer.step}: train.steps={trainer.cfg.train.steps} cannot shorten it"
            )
        if overrides and dist.is_main():
            trainer.directory.write_config(trainer.cfg)
        return trainer

    # ------------------------------------------------------------------ training

    def next_batch(self) -> Any:
        return self.batches.next()

    def train_step(self, more: bool = False) -> StepOutput:
        """One update on the next batch; with ``train.prefetch``, ``more`` (another step follows) builds the
        batch after it in the background meanwhile."""
        return self.optimize(self.batches.next(more))

    def optimize(self, batch: Any) -> StepOutput:
        """Forward, backward and update on a prepared batch (the part the speed benchmark isolates).

        Under torchrun, between forward and backward every process learns whether any loss was
        non-finite and whether any process was asked to stop (one small collective); skip mode learns
        it there too. In one process in stop mode nothing is read: the verdict stays on the device
        until the next log, save or evaluation (``NonFinitePolicy.watch``)."""
        self.train_model.train()
        snapshot = self.nonfinite.snapshot()
        step_function = self.compiled_step or self.task.step_with_regularizers
        with self.precision.autocast():
            out = step_function(self.train_model, batch, self.step, self.cfg.train.steps)
        self.task.record(out, batch)
        bad_rank, what = None, "the loss is"
        if snapshot is None and not dist.is_distributed():  # stop mode, one process: no wait here
            self.nonfinite.watch(out, self.step)
        else:  # skip mode's restore and torchrun's collective need the verdict now
            bad_rank = self.signals.agree(out.loss)
        if bad_rank is None and snapshot is not None:  # skip mode: the update must be finite too
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()  # DDP's averaged gradients are the same on every process
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            bad_rank = None if bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) else dist.rank()
            what = "the gradient is"
        if bad_rank is not None:
            if snapshot is None:
                raise self.nonfinite.error(out.logs, bad_rank, self.step, self.saved_step)
            return self._skip(out, snapshot, bad_rank, what)
        if snapshot is None:
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        self.nonfinite.finite()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return out

    def _skip(self, out: StepOutput, snapshot: dict[str, Any], bad_rank: int, what: str) -> StepOutput:
        """No update; what the forward changed is restored; the schedule and the data move on."""
        self.nonfinite.restore(snapshot)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # no optimizer.step() on purpose: the schedule follows the step count
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.record.skipped += 1
        self.nonfinite.count_skip(out.logs, bad_rank, self.step, self.saved_step, what)
        self.step += 1
        out.logs = {}
        return out

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps``. ``stop_at``, SIGINT or SIGTERM save ``last.pt`` at the current step
        and stop early (``stop_signal`` names the signal)."""
        t = self.cfg.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        desc = f"{self.cfg.method.name} on {self.cfg.data.name}"
        progress = Progress(t.steps, self.step, desc, enabled=self.progress and dist.is_main())
        if dist.is_main():
            progress.write(f"{self.task.summary()}; {self.precision.describe()}; run directory {self.run_dir}")
        start = time.perf_counter() - self.record.elapsed
        with self.signals:
            try:
                self._train(end, progress, start)
            except UserError as e:  # bad input met in training (a file read late, a full disk)
                if self.saved_step is None and dist.is_main() and not isinstance(e, NonFiniteLoss):
                    self.directory.unmake()  # (a diverged run keeps its logs)
                raise
            finally:
                self.batches.close()  # no thread outlives fit; a batch built ahead is dropped, its state rewound
                progress.close()
            if self.step < t.steps:
                self.record.elapsed = time.perf_counter() - start
                if self.saved_step != self.step:
                    self._save_at_stop()  # still under the handlers: a repeated SIGTERM cannot cut it short
                if self.stop_signal is not None and dist.is_main():
                    name = signal.Signals(self.stop_signal).name
                    progress.write(f"{name}: saved {self.run_dir / 'last.pt'} at step {self.step}")
                return self.metrics(final=None)
        return self._finish()

    def _train(self, end: int, progress: Progress, start: float) -> None:
        t = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        count = 0
        while self.step < end and self.signals.stopping() is None:
            logs = self.train_step(more=self.step + 1 < end).logs  # the logits are not kept through the next step
            for k, v in logs.items():  # summed on the device, read once per log interval
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += bool(logs)
            progress.update(1)
            log = self.step % t.log_every == 0 or self.step == t.steps
            evaluate = self.step % t.eval_every == 0 or self.step == t.steps
            save = bool(t.save_every) and self.step % t.save_every == 0
            if log or evaluate or save:  # where the host reads anyway: a bad step stops the run here
                self.nonfinite.check(self.saved_step)
            if log and count:
                values = torch.stack(list(sums.values())).tolist()  # one read for every average
                self._log_train({k: v / count for k, v in zip(sums, values)}, progress)
                sums, count = {}, 0
            if evaluate:
                self.record.elapsed = time.perf_counter() - start
                self._evaluate_and_save(progress)
            elif save:
                self.record.elapsed = time.perf_counter() - start
                self._save_last()
        self.nonfinite.check(self.saved_step)  # before a save at a stop

    def _save_at_stop(self) -> None:
        """``last.pt`` between evaluations. With ``stop_at`` it keeps a temperature for its model; a
        signal saves at once (a scheduler's grace period is short), without one."""
        if self.stop_signal is None and self.task.fits_temperature and self.record.temperature_step != self.step:
            dist.broadcast_module(self.ema.module)
            _, self.record.temperature = self._validate()
            self.record.temperature_step = self.step
        self._save_last()

    def _log_train(self, logs: dict[str, float], progress: Progress) -> None:
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        logs.update(self.task.train_stats())
        progress.log({k: v for k, v in logs.items() if k in SHOWN})
        if dist.is_main():
            self.directory.log_train(logs, self.step)
        self.directory.scalars("train", logs, self.step)

    # ------------------------------------------------------------------ evaluation

    @property
    def report_split(self) -> str:
        """The split behind `final` and `test` (``Task.report_split``)."""
        return self.task.report_split

    def evaluate(self, split: str, temperature: Temperature | None = None) -> Evaluation:
        """The EMA model on ``split``, streamed and sharded over processes (and temperature-scaled)."""
        return self.task.evaluate(self.ema.module, split, temperature)

    def _validate(self) -> tuple[dict[str, float], Temperature | None]:
        """The EMA model's validation metrics and temperature ({} and None without a validation split)."""
        return self.task.validate(self.ema.module) if self.task.has_split("val") else ({}, None)

    def _validate_and_report(self) -> tuple[dict[str, float], Temperature | None, Evaluation]:
        """Validation metrics, temperature and the report split's evaluation; one pass over validation
        where it is the report split (every tune trial), not one to validate and one to report."""
        if self.report_split == "val":
            return self.task.validate_as_report(self.ema.module)
        val, temperature = self._validate()
        return val, temperature, self.evaluate(self.report_split, temperature)

    def _evaluate_and_save(self, progress: Progress) -> None:
        # EMA parameters agree across processes; its buffers, copied from each process's last
        # forward, do not: rank 0's are the ones saved, so every shard evaluates with them.
        dist.broadcast_module(self.ema.module)
        try:
            val, self.record.temperature, test = self._validate_and_report()
            self.record.temperature_step = self.step
        except NonFiniteLogits:
            what = "the EMA model's outputs are"
            raise self.nonfinite.error(None, dist.rank(), self.step, self.saved_step, what=what) from None
        improved = self.record.add_evaluation(self.step, val, test)
        if improved:
            state = {**self._meta(), "parts": {"ema": self.ema.state_dict()}}
            dist.on_main(lambda: save_checkpoint(state, self.run_dir / "best.pt"))  # before last.pt, which records it
        self._save_last()
        dist.on_main(lambda: self._report(progress, val, test, improved))
        for hook in self.evaluation_hooks:
            hook(self.step, val)

    def _report(self, progress: Progress, val: dict[str, float], test: Evaluation, improved: bool) -> None:
        """The main process's log line, TensorBoard scalars, diagram and metrics.json of an evaluation."""
        key = self.task.primary
        shown = f"val {key} {val[key]:.4f} | " if val and self.report_split != "val" else ""
        best = " (best)" if improved else ""
        progress.write(f"step {self.step}: {shown}{self.report_split} {self.task.describe(test.metrics)}{best}")
        for split, m in (("val", val), ("test", test.metrics)):  # not segmentation's per-class table
            self.directory.scalars(split, {k: v for k, v in m.items() if isinstance(v, (int, float))}, self.step)
        if improved:
            self._write_best_outputs(test)
        self.directory.write_metrics(self.metrics(final=None))

    def _finish(self) -> dict[str, Any]:
        final = self.record.history[-1]["test"]
        if self.record.last_test is None:  # a resumed, already finished run
            self.record.temperature = self.record.history[-1].get("temperature")
            self.record.last_test = self.evaluate(self.report_split, self.record.temperature)
        self._write_final_outputs(self.record.last_test, final)
        return self.metrics(final)

    def metrics(self, final: dict[str, float] | None) -> dict[str, Any]:
        """metrics.json: ``final`` is the report split's metrics at the end (None before it)."""
        cfg = self.cfg
        run = {"task": cfg.task, "method": cfg.method.name, "dataset": cfg.data.name, "seed": cfg.seed}
        return self.record.metrics(final, {**run, "steps": self.step, "precision": self.precision.describe()})

    # ------------------------------------------------------------------ plots and the task's own files

    def _write_best_outputs(self, test: Evaluation) -> None:
        """(main process) The reliability diagram of the model just chosen on validation."""
        title = f"best (step {self.step}, chosen on validation)"
        write_diagram(self.task, test, self.run_dir / "reliability_best", title)

    def _write_final_outputs(self, test: Evaluation, final: dict[str, float]) -> None:
        """The final model's files: the task's own on every process (it may use collectives), then
        on the main process its diagrams and curves, metrics.json, the TensorBoard log closed, and last
        the report's findings (one more pass over the report split, so that the report needs neither the
        data nor the model): a failure there costs the report its speed, never the finished run."""
        self.task.write_final(self.ema.module, self.run_dir)

        def write() -> None:
            write_final_plots(self.task, test, self.record.temperature, self.record.history, self.run_dir, self.step)
            self.directory.write_metrics(self.metrics(final))
            self.directory.close()
            try:
                temperature = self.record.temperature_at(self.step)
                findings = collect_findings(self.task, self.ema.module, self.run_dir, self.step, temperature)
                save_findings(findings, self.run_dir, self.step)
            except Exception as e:  # noqa: BLE001 (derived data: `report --html` then passes last.pt itself)
                warnings.warn(
                    f"findings.pt not written ({type(e).__name__}: {e}): the report reads last.pt", stacklevel=1
                )

        dist.on_main(write)  # a collective: every process learns of a failed write
