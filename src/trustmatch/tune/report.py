"""The tune report: trials (markdown + CSV), parameter importance, the optimisation history, and the
best trial as a ready ``trustmatch train`` command with its test metrics, read once, after the study."""

from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text
from trustmatch.reporting.plots import optimisation_history
from trustmatch.run.checkpoint_evaluation import evaluate_run
from trustmatch.tune.study import DIVERGED, OBJECTIVES, TuneRequest, storage_text


def _state(trial: FrozenTrial) -> str:
    return DIVERGED if DIVERGED in trial.user_attrs else trial.state.name.lower()


def _value(trial: FrozenTrial) -> str:
    if trial.state == TrialState.PRUNED and trial.intermediate_values:  # its last report, where it stopped
        step = max(trial.intermediate_values)
        return f"({trial.intermediate_values[step]:.4f} at step {step})"
    return "" if trial.value is None else f"{trial.value:.4f}"


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_rows(trials: list[FrozenTrial], keys: list[str]) -> list[list[str]]:
    """number, state, value, one column per parameter, run directory."""
    return [
        [
            str(t.number),
            _state(t),
            _value(t),
            *(_param(t.params.get(k, "")) for k in keys),
            t.user_attrs.get("run_dir", ""),
        ]
        for t in trials
    ]


def importance(study: optuna.Study, seed: int) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importance over the complete trials ({} and why where it cannot be computed)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"needs 2 complete trials or more ({len(complete)} so far)"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return optuna.importance.get_param_importances(study, evaluator=evaluator), ""
    except (ValueError, RuntimeError) as e:  # e.g. every trial with the same values
        return {}, f"not computed: {e}"


def test_once(out: Path, best: FrozenTrial) -> tuple[dict[str, Any] | None, str]:
    """The best trial's validation-chosen checkpoint on test: evaluated once, then read from its file."""
    run_dir = out / best.user_attrs["run_dir"]
    saved = run_dir / "evaluation-best-test.json"
    if saved.is_file():
        return json.loads(saved.read_text()), ""
    if not (run_dir / "best.pt").is_file():
        return None, f"{run_dir} is not on this machine (another worker ran it): `trustmatch evaluate` it there"
    try:
        return evaluate_run(run_dir, "best", "test"), ""
    except UserError as e:  # e.g. a segmentation folder without a test folder
        return None, str(e)


def write_report(study: optuna.Study, req: TuneRequest, out: Path) -> str:
    """report.md, trials.csv and history.png in ``out``; returns the markdown."""
    trials = study.get_trials(deepcopy=False)
    keys = list(req.space.params)
    header = ["number", "state", "value", *keys, "run_dir"]
    rows = trial_rows(trials, keys)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(out / "trials.csv", buffer.getvalue())
    complete = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [
        (t.number, t.intermediate_values[max(t.intermediate_values)])
        for t in trials
        if t.state == TrialState.PRUNED and t.intermediate_values
    ]
    optimisation_history(complete, pruned, out / "history.png", req.objective)

    lines = [f"# tune: {study.study_name}", "", f"storage: {storage_text(req, out)}", ""]
    lines.append(f"objective (maximised): {req.objective}, {OBJECTIVES[req.objective]}")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    scores, why = importance(study, req.seed)
    lines += ["", "## parameter importance (fANOVA)", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in scores.items()] or [why]
    lines += ["", "## best trial", ""]
    if not complete:
        lines.append("no complete trial yet")
    else:
        best = study.best_trial
        command = shlex.join(["trustmatch", "train", req.config, *req.overrides, *best.user_attrs["overrides"]])
        lines += [f"trial {best.number}, validation objective {best.value:.4f}", "", f"    {command}", ""]
        test, note = test_once(out, best)
        lines.append(f"test (read once, after the study): {json.dumps(_headline(test)) if test else note}")
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", markdown)
    return markdown


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar test metrics (not segmentation's per-class table)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
