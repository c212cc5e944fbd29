"""``trustmatch tune``: an Optuna study whose trials are ordinary runs, chosen on validation only.

Each trial is ``<tune dir>/trial-<n>/``, a ``trustmatch train`` run with the trial's overrides and
``train.evaluate_test=false``, so no trial reads the test split; its value is the validation objective
of its validation-chosen best checkpoint, and every evaluation reports to the median pruner (a pruned
trial's directory is kept, with ``pruned.json``). TPE is seeded from (``--seed``, the trial's
number), so concurrent workers differ and a resumed study samples as an uninterrupted one (unless a trial
was stopped: its number stays taken). A study
holds N trials once N are complete, pruned or diverged (trials killed with their process are failed
after a heartbeat grace period and run again).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from trustmatch.config import Config, load_config
from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text
from trustmatch.run.nonfinite import NonFiniteLoss
from trustmatch.run.trainer import Trainer
from trustmatch.tasks import TASKS
from trustmatch.tune.space import Space, check_space
from trustmatch.tune.storage import default_url, open_storage, shown

#: name -> what the study maximises, from the validation metrics of a run's best checkpoint
OBJECTIVES = {
    "metric": "validation accuracy (classification) or mIoU (segmentation)",
    "metric-ece": "the metric minus its validation ECE-15 (segmentation: pixel ECE-15)",
}
HELD_OUT = "train.evaluate_test=false"  # every trial's: the test split is never read during the study
DIVERGED = "diverged"  # user attribute of a trial stopped by a non-finite loss: it counts as run
VAL_NLL = "val_nll"  # user attribute: the validation NLL of a complete trial's best checkpoint (breaks ties)


class Stopped(Exception):
    """SIGINT / SIGTERM stopped a trial (its last.pt is saved); the study resumes without it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class TuneRequest:
    """What ``trustmatch tune`` was asked."""

    config: str
    overrides: list[str]
    space: Space
    trials: int
    objective: str = "metric"
    storage: str | None = None
    storage_source: str = "--storage"  # where the URL came from, for messages (or TRUSTMATCH_STORAGE)
    study: str | None = None
    out: Path | None = None
    seed: int = 0
    progress: bool = False
    pruner: optuna.pruners.BasePruner = field(default_factory=optuna.pruners.MedianPruner)


def nll_value(task: str, val: dict[str, Any]) -> float | None:
    """The validation NLL that breaks ties of the objective (pixel NLL for segmentation; None: none)."""
    key = TASKS.get(task).nll_metric
    return None if key is None or key not in val else float(val[key])


def objective_value(task: str, objective: str, val: dict[str, Any]) -> float:
    cls = TASKS.get(task)
    value = float(val[cls.primary])
    return value - float(val[cls.calibration_metric]) if objective == "metric-ece" else value


def missing_validation(cfg: Config) -> str | None:
    """Why the config's data has no validation split (None: it has one), read from the config alone."""
    if cfg.task == "segmentation":
        if cfg.data.name == "digitscenes":
            return None if cfg.data.val_images > 0 else "data.val_images=0; set data.val_images=100"
        if cfg.data.name == "folder":
            return None if cfg.data.val_dir else "the folder has no data.val_dir; give one (images/ + masks/)"
        return f"{cfg.data.name} scores its val.txt as the test split (the published protocol)"
    return None if cfg.data.val_per_class > 0 else "data.val_per_class=0; set data.val_per_class=5"


def study_name(cfg: Config, req: TuneRequest) -> str:
    """``<config>-<space>-<hash>``: the same command on any machine names the same study."""
    key = json.dumps([cfg.to_dict(), req.space.describe(), req.objective], sort_keys=True)
    return f"{Path(req.config).stem}-{req.space.label}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def prepare(req: TuneRequest) -> tuple[Config, str, Path]:
    """The config, study name and tune directory, every input checked before anything is made."""
    if req.objective not in OBJECTIVES:
        raise UserError(f"--objective {req.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if req.trials < 1:
        raise UserError(f"--trials must be at least 1, got {req.trials}")
    if dist.world_size() > 1:  # every rank would sample its own trial into one process group
        raise UserError(
            "trustmatch tune runs one trial per process: start it without torchrun (several "
            "machines or processes share a study through --storage)"
        )
    cfg = load_config(req.config, req.overrides)
    if "train.evaluate_test" in {o.split("=", 1)[0].strip() for o in req.overrides} | set(req.space.params):
        raise UserError("tune sets train.evaluate_test=false in every trial (never the test split): drop the key")
    why = missing_validation(cfg)
    if why is not None:
        raise UserError(f"{req.config} has no validation split to choose on ({why}); tune never chooses on test")
    check_space(req.space, req.config, req.overrides)
    name = req.study or study_name(cfg, req)
    out = req.out or Path("tunes") / name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a directory for the study")
    record = out / "tune.json"
    if record.is_file() and json.loads(record.read_text()).get("study") != name:
        raise UserError(f"{out} holds another study ({json.loads(record.read_text())['study']}): use another --out")
    return cfg, name, out


def storage_text(req: TuneRequest, out: Path) -> str:
    """Where the study lives, as it may be printed or written: the password hidden."""
    return str(out / "study.db") if req.storage is None else f"{shown(req.storage)} (from {req.storage_source})"


def counted(study: optuna.Study) -> int:
    """Trials that hold a place in the N: complete, pruned, diverged, or running now."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=states)
    return sum(t.state != TrialState.FAIL or DIVERGED in t.user_attrs for t in trials)


def open_study(req: TuneRequest, name: str, out: Path) -> optuna.Study:
    """The study (made or loaded); the tune directory is made only once every input is good."""
    storage = open_storage(req.storage, req.storage_source) if req.storage else None  # nothing half-made
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        sampler = optuna.samplers.TPESampler(seed=req.seed)
        study = optuna.create_study(
            storage=storage or open_storage(default_url(out)),
            study_name=name,
            direction="maximize",
            sampler=sampler,
            pruner=req.pruner,
            load_if_exists=True,
        )
        info = {"study": name, "config": req.config, "overrides": req.overrides, "space": req.space.describe()}
        info.update(objective=req.objective, storage=storage_text(req, out))
        atomic_write_text(out / "tune.json", json.dumps(info, indent=2))
        print(f"study {name} in {storage_text(req, out)}", file=sys.stderr)
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    return study


def run_trials(study: optuna.Study, req: TuneRequest, cfg: Config, out: Path) -> None:
    """Trials until the study holds ``req.trials``; a diverged trial counts, a stopped one does not."""
    while True:
        optuna.storages.fail_stale_trials(study)
        if counted(study) >= req.trials:
            return
        number = len(study.get_trials(deepcopy=False))  # the next trial's number, but for a race
        # (seed, number) through a SeedSequence: --seed 1 is not --seed 0 shifted by one trial
        trial_seed = int(np.random.SeedSequence([req.seed, number]).generate_state(1)[0])
        study.sampler = optuna.samplers.TPESampler(seed=trial_seed)
        study.optimize(
            lambda trial: _trial(trial, req, cfg, out),
            n_trials=1,
            catch=(NonFiniteLoss,),
            callbacks=[lambda _, trial: _print_trial(trial)],
        )


def _trial(trial: optuna.Trial, req: TuneRequest, cfg: Config, out: Path) -> float:
    params = req.space.suggest(trial)
    run_dir = out / f"trial-{trial.number}"
    trial.set_user_attr("overrides", params)
    trial.set_user_attr("run_dir", run_dir.name)
    print(f"trial {trial.number}: {' '.join(params)} -> {run_dir}", file=sys.stderr)
    trainer = Trainer(load_config(req.config, [*req.overrides, *params, HELD_OUT]), run_dir, progress=req.progress)

    def report(step: int, val: dict[str, Any]) -> None:
        trial.report(objective_value(cfg.task, req.objective, val), step)
        if step < trainer.cfg.train.steps and trial.should_prune():  # a finished trial is never thrown away
            raise optuna.TrialPruned(f"pruned at step {step}")

    trainer.evaluation_hooks.append(report)
    try:
        trainer.fit()
    except optuna.TrialPruned:
        trainer.directory.close()
        value = objective_value(cfg.task, req.objective, trainer.record.history[-1]["val"])
        note = "pruned: its validation objective here was below the median of earlier trials' (last.pt holds it)"
        mark = {"pruned_at_step": trainer.step, "value": value, "note": note}
        atomic_write_text(run_dir / "pruned.json", json.dumps(mark, indent=2))
        raise
    except NonFiniteLoss as e:
        trial.set_user_attr(DIVERGED, str(e))
        raise
    if trainer.stop_signal is not None:
        raise Stopped(trainer.stop_signal)
    assert trainer.record.best is not None  # a validation split is checked before the study
    nll = nll_value(cfg.task, trainer.record.best["val"])
    if nll is not None:  # in the study, so a worker reporting on another's trial has it too
        trial.set_user_attr(VAL_NLL, nll)
    return objective_value(cfg.task, req.objective, trainer.record.best["val"])


def _print_trial(trial: FrozenTrial) -> None:
    if trial.state.is_finished():
        value = "" if trial.value is None else f": {trial.value:.4f}"
        print(f"trial {trial.number} {trial.state.name.lower()}{value}", file=sys.stderr)
