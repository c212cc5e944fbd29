"""The one training loop: every method, every dataset, one process or many (torchrun).

Everything a run depends on — weights, EMA, optimiser, schedule position, selector statistics,
data-stream positions and all RNG streams — is in ``last.pt``, so ``--resume`` continues the run
as if it had never stopped. Only the main process writes files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from trustmatch.classification import Batch, StepResult, supervised_step, weak_to_strong_step
from trustmatch.config import Config, from_dict
from trustmatch.data import load_ssl_data
from trustmatch.data.sampler import IndexStream
from trustmatch.data.split import SSLData
from trustmatch.data.views import Views
from trustmatch import distributed as dist
from trustmatch.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from trustmatch.engine.ema import ModelEMA
from trustmatch.engine.inference import autocast_for, predict_logits
from trustmatch.errors import UserError
from trustmatch.fileio import atomic_write_text
from trustmatch.metrics import classification_metrics, reliability_bins
from trustmatch.models import build_model
from trustmatch.report import reliability_diagram, training_curves
from trustmatch.selection import Selector, build_selector

CHECKPOINT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'train.device' got {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
    return device


def cosine_factor(step: int, total: int) -> float:
    """FixMatch's schedule: lr = lr0 * cos(7 pi k / (16 K))."""
    return math.cos(7.0 * math.pi * step / (16.0 * total))


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """SGD with nesterov; no weight decay on BatchNorm parameters and biases (as USB)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    t = cfg.train
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0)


class Trainer:
    """Builds a run from a config (or resumes one from its directory) and trains it."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.device = resolve_device(cfg.train.device)
        dist.init_from_env(self.device)
        if not resume and dist.is_main():
            self._prepare_run_dir()  # before the data load: a clash is reported at once
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed + dist.rank())
        self.data: SSLData = load_ssl_data(cfg.data, cfg.seed)
        self.views = Views(self.data.mean, self.data.std, self.data.hflip)
        self.cuda = self.device.type == "cuda"
        self.channels_last = cfg.train.channels_last and self.cuda
        self.amp = cfg.train.amp and self.cuda

        model = build_model(
            cfg.model.name,
            self.data.num_classes,
            self.data.labeled.images.shape[1],
            bn_momentum=cfg.model.bn_momentum,
            dropout=cfg.model.dropout,
        ).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEMA(model, cfg.train.ema)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: cosine_factor(k, cfg.train.steps))
        self.selector: Selector | None = None
        if cfg.method.name != "supervised":
            self.selector = build_selector(cfg.method, self.data.num_classes, len(self.data.unlabeled)).to(self.device)
        self.train_model: nn.Module = model
        if dist.is_distributed():
            ids = [self.device.index] if self.cuda else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)

        b = cfg.train.batch_size
        self.lb_stream = IndexStream(len(self.data.labeled), b, cfg.seed)
        self.ulb_stream = IndexStream(len(self.data.unlabeled), b * cfg.train.uratio, cfg.seed + 1)
        self.aug_rng = torch.Generator().manual_seed(cfg.seed * 7919 + dist.rank())
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0
        self._test_logits: torch.Tensor | None = None
        if resume:  # on the CPU: RNG states must stay there; load_state_dict moves the rest
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
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        atomic_write_text(self.run_dir / "config.yaml", text)

    def _tensorboard(self) -> Any:
        if not dist.is_main():
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _meta(self) -> dict[str, Any]:
        """What inference needs besides the weights: enough to rebuild and feed the model."""
        d = self.data
        return {
            "config": self.cfg.to_dict(),
            "classes": d.classes,
            "mean": list(d.mean),
            "std": list(d.std),
            "channels": int(d.labeled.images.shape[1]),
            "image_size": int(d.labeled.images.shape[-1]),
            "version": CHECKPOINT_VERSION,
        }

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"aug": self.aug_rng.get_state(), "torch": torch.get_rng_state()}
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _state(self, rng: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The whole run; ``rng`` holds every process's RNG streams, indexed by rank."""
        state = {
            **self._meta(),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "selector": self.selector.state_dict() if self.selector is not None else {},
            "lb_stream": self.lb_stream.state_dict(),
            "ulb_stream": self.ulb_stream.state_dict(),
            "rng": rng,
            "history": self.history,
            "best": self.best,
            "elapsed": self.elapsed,
        }
        return state

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.step = int(state["step"])
        for module, key in [
            (self.model, "model"),
            (self.ema, "ema"),
            (self.optimizer, "optimizer"),
            (self.scheduler, "scheduler"),
            (self.selector, "selector"),
        ]:
            if module is not None:
                load_weights(module, state[key], path)
        self.lb_stream.load_state_dict(state["lb_stream"])
        self.ulb_stream.load_state_dict(state["ulb_stream"])
        if len(state["rng"]) != dist.world_size():
            raise UserError(
                f"{path} was written by {len(state['rng'])} process(es): resume it with the same number "
                f"(this is {dist.world_size()}), so every process gets its own data and RNG streams back"
            )
        rng = state["rng"][dist.rank()]
        self.aug_rng.set_state(rng["aug"])
        torch.set_rng_state(rng["torch"])
        if self.cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.history, self.best, self.elapsed = state["history"], state["best"], float(state["elapsed"])

    @classmethod
    def resume(cls, run_dir: Path, progress: bool = True) -> Trainer:
        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise UserError(f"{run_dir} is not a trustmatch run directory (no config.yaml)")
        return cls(from_dict(yaml.safe_load(path.read_text())), Path(run_dir), resume=True, progress=progress)

    # ------------------------------------------------------------------ training

    def next_batch(self) -> Batch:
        """Gather the next labeled (and unlabeled) batch and build its views on the device."""
        d, dev = self.data, self.device
        idx_lb = self.lb_stream.next()
        x_lb = self.views.weak(d.labeled.images[idx_lb].to(dev, non_blocking=True), self.aug_rng)
        batch = Batch(self._layout(x_lb), d.labeled.labels[idx_lb].to(dev), idx_lb.to(dev))
        if self.selector is not None:
            idx_ulb = self.ulb_stream.next()
            u = d.unlabeled.images[idx_ulb].to(dev, non_blocking=True)
            batch.u_weak = self._layout(self.views.weak(u, self.aug_rng))
            batch.u_strong = self._layout(self.views.strong(u, self.aug_rng))
            batch.idx_ulb = idx_ulb.to(dev)
            batch.y_ulb = d.unlabeled.labels[idx_ulb].to(dev)
        return batch

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_step(self) -> StepResult:
        return self.optimize(self.next_batch())

    def optimize(self, batch: Batch) -> StepResult:
        """Forward, backward and update on a prepared batch (the part the speed benchmark isolates)."""
        self.train_model.train()
        with autocast_for(self.device, self.amp):
            if self.selector is None:
                result = supervised_step(self.train_model, batch)
            else:
                result = weak_to_strong_step(self.train_model, batch, self.selector, self.cfg.method.lambda_u)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return result

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
            bar.write(f"{self.cfg.data.name}: {self.data.summary()}; run directory {self.run_dir}")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        start = time.perf_counter() - self.elapsed
        while self.step < end:
            result = self.train_step()
            for k, v in result.logs.items():
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
            rng = dist.all_gather_objects(self._rng_state())
            if dist.is_main():
                save_checkpoint(self._state(rng), self.run_dir / "last.pt")
            return self.metrics(final=None)
        return self._finish()

    def _log_train(self, logs: dict[str, float], bar: tqdm) -> None:
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.selector is not None:
            logs.update(self.selector.stats())
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss_sup", "loss_unsup", "mask", "pl_acc")})
        if self.writer is not None:
            for k, v in logs.items():
                self.writer.add_scalar(f"train/{k}", v, self.step)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, split: str) -> tuple[dict[str, float], torch.Tensor]:
        images = getattr(self.data, split)
        logits = predict_logits(
            self.ema.module,
            images.images,
            self.views.plain,
            self.device,
            self.cfg.train.eval_batch_size,
            self.amp,
            self.channels_last,
            shard=True,
        )
        return classification_metrics(logits, images.labels), logits

    def _evaluate_and_save(self, bar: tqdm) -> None:
        val = self.evaluate("val")[0] if len(self.data.val) else {}
        test, logits = self.evaluate("test")
        self._test_logits = logits
        entry = {"step": self.step, "elapsed_s": round(self.elapsed, 2), "val": val, "test": test}
        self.history.append(entry)
        improved = self.best is None or not val or _val_score(val) > _val_score(self.best["val"])
        if improved:
            self.best = entry
        rng = dist.all_gather_objects(self._rng_state())  # collective: before the main-only part
        if not dist.is_main():
            return
        bar.write(
            f"step {self.step}: val acc {val.get('accuracy', float('nan')):.4f} | test acc {test['accuracy']:.4f} "
            f"ece15 {test['ece_15']:.4f} nll {test['nll']:.4f}" + (" (best)" if improved else "")
        )
        if self.writer is not None:
            for split, m in (("val", val), ("test", test)):
                for k, v in m.items():
                    self.writer.add_scalar(f"{split}/{k}", v, self.step)
        if improved:
            best_state = {**self._meta(), "step": self.step, "model": self.ema.state_dict()}
            save_checkpoint(best_state, self.run_dir / "best.pt")
            reliability_diagram(
                reliability_bins(logits, self.data.test.labels),
                self.run_dir / "reliability_best.png",
                f"best (step {self.step}, chosen on validation)",
                test["ece_15"],
            )
        save_checkpoint(self._state(rng), self.run_dir / "last.pt")
        self._write_metrics(final=None)

    def _finish(self) -> dict[str, Any]:
        final = self.history[-1]["test"]
        logits = self._test_logits if self._test_logits is not None else self.evaluate("test")[1]
        if dist.is_main():
            reliability_diagram(
                reliability_bins(logits, self.data.test.labels),
                self.run_dir / "reliability_final.png",
                f"final EMA model (step {self.step})",
                final["ece_15"],
            )
            training_curves(self.history, self.run_dir / "curves.png")
            self._write_metrics(final=final)
            if self.writer is not None:
                self.writer.close()
        dist.barrier()
        return self.metrics(final)

    def metrics(self, final: dict[str, float] | None) -> dict[str, Any]:
        best = self.best or {}
        return {
            "method": self.cfg.method.name,
            "dataset": self.cfg.data.name,
            "seed": self.cfg.seed,
            "steps": self.step,
            "wall_time_s": round(self.elapsed, 2),
            "final": final,
            "best": {**best.get("test", {}), "step": best.get("step"), "val": best.get("val", {})} if best else None,
            "history": self.history,
            "split": {
                "labeled": len(self.data.labeled),
                "unlabeled": len(self.data.unlabeled),
                "val": len(self.data.val),
                "test": len(self.data.test),
            },
        }

    def _write_metrics(self, final: dict[str, float] | None) -> None:
        text = json.dumps(self.metrics(final), indent=2)
        atomic_write_text(self.run_dir / "metrics.json", text)


def _val_score(val: dict[str, float]) -> tuple[float, float]:
    """Validation accuracy, ties broken by lower NLL (without a validation split the latest wins)."""
    return (val["accuracy"], -val["nll"])
