"""The one training loop: every task, every method, one process or many (torchrun).

The trainer owns what every run shares: the loop, EMA, optimizer and schedule, checkpoints, RNG
streams, processes, progress and the run directory. Everything task-specific is behind ``Task``.
Every stateful part (model, EMA, optimizer, scheduler and the task's selector, streams and
trackers) is one entry of ``parts``, saved and restored by the same code, so ``--resume``
continues the run as if it had never stopped. Only the main process writes files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from trustmatch import distributed as dist
from trustmatch.config import Config, from_dict, merge_values, parse_overrides, read_yaml
from trustmatch.engine.checkpoint import CHECKPOINT_VERSION, load_checkpoint, load_weights, save_checkpoint
from trustmatch.engine.ema import ModelEMA
from trustmatch.engine.optim import build_optimizer, build_scheduler
from trustmatch.engine.precision import Precision, resolve_device
from trustmatch.errors import UserError
from trustmatch.fileio import atomic_write_text
from trustmatch.step import StepOutput
from trustmatch.tasks import TASKS, Evaluation, Stateful

RESUME_KEYS = ("train.steps", "train.eval_every", "train.log_every")  # what --resume may change
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


class Trainer:
    """Builds a run from a config (or resumes one from its directory) and trains it."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        task_cls = TASKS.get(cfg.task)
        self.device = resolve_device(cfg.train.device)
        dist.init_from_env(self.device)
        if not resume and dist.is_main():
            self._prepare_run_dir()  # before the data load: a clash is reported at once
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
        self.temperature: float | None = None  # fitted on validation at the last evaluation
        if resume:
            self._restore(self.run_dir / "last.pt")
        self.writer = self._tensorboard()

    # ------------------------------------------------------------------ run directory and state

    def _prepare_run_dir(self) -> None:
        if (self.run_dir / "last.pt").exists():
            raise UserError(
                f"run directory {self.run_dir} already holds a run: use --resume {self.run_dir} "
                "to continue it, or --out with a new directory"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()

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
        meta = {**self.task.meta(), "version": CHECKPOINT_VERSION, "step": self.step}
        return meta if self.temperature is None else {**meta, "temperature": self.temperature}

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
        if dist.is_main():
            state = {
                **self._meta(),
                "parts": {name: part.state_dict() for name, part in self.parts.items()},
                "rng": rng,
                "run": {"history": self.history, "best": self.best, "elapsed": self.elapsed},
            }
            save_checkpoint(state, self.run_dir / "last.pt")

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
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
        self.temperature = state.get("temperature")

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
        """Forward, backward and update on a prepared batch (the part the speed benchmark isolates)."""
        self.train_model.train()
        with self.precision.autocast():
            out = self.task.step_with_regularizers(self.train_model, batch, self.step, self.cfg.train.steps)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return out

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps``; ``stop_at`` saves ``last.pt`` and stops early, as an interruption would."""
        t = self.cfg.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (self.progress and dist.is_main()),
            desc=f"{self.cfg.method.name} on {self.cfg.data.name}",
            unit="step",
            dynamic_ncols=True,
        )
        if dist.is_main():
            bar.write(f"{self.task.summary()}; {self.precision.describe()}; run directory {self.run_dir}")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        start = time.perf_counter() - self.elapsed
        while self.step < end:
            logs = self.train_step().logs  # the step's logits are not kept alive through the next step
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log_train({k: float(v) / count for k, v in sums.items()}, bar)
                sums, count = {}, 0
            if self.step % t.eval_every == 0 or self.step == t.steps:
                self.elapsed = time.perf_counter() - start
                self._evaluate_and_save(bar)
        bar.close()
        if self.step < t.steps:
            self.elapsed = time.perf_counter() - start
            if self.history and self.history[-1]["step"] != self.step:  # last.pt keeps the T of its model
                dist.broadcast_module(self.ema.module)
                _, self.temperature = self._validate()
            self._save_last()
            return self.metrics(final=None)
        return self._finish()

    def _log_train(self, logs: dict[str, float], bar: tqdm) -> None:
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        logs.update(self.task.train_stats())
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss_sup", "loss_unsup", "mask", "pl_acc")})
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

    def _evaluate_and_save(self, bar: tqdm) -> None:
        # EMA parameters agree across processes; its buffers, copied from each process's last
        # forward, do not: rank 0's are the ones saved, so every shard evaluates with them.
        dist.broadcast_module(self.ema.module)
        val, self.temperature = self._validate()
        self._last_test = test = self.evaluate(self.report_split, self.temperature)
        entry = {"step": self.step, "elapsed_s": round(self.elapsed, 2), "val": val, "test": test.metrics}
        if test.calibrated is not None:
            entry.update(temperature=self.temperature, test_calibrated=test.calibrated)
        self.history.append(entry)
        score = self.task.score
        improved = bool(val) and (self.best is None or score(val) > score(self.best["val"]))
        if improved:
            self.best = entry
            if dist.is_main():  # before last.pt, which records this choice
                save_checkpoint({**self._meta(), "parts": {"ema": self.ema.state_dict()}}, self.run_dir / "best.pt")
        self._save_last()
        if not dist.is_main():
            return
        key = self.task.primary
        shown = f"val {key} {val[key]:.4f} | " if val else ""
        bar.write(f"step {self.step}: {shown}test {self.task.describe(test.metrics)}" + (" (best)" if improved else ""))
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
        if dist.is_main():
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
        dist.barrier()
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
