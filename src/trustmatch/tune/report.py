"""The tune report: trials (markdown + CSV), parameter importance, the optimisation history, and the
best trial as a ready ``trustmatch train`` command with its test metrics, read once, after the study.

The best trial is chosen here, not by Optuna: a small validation split ties often (49 of 50 images
right is 0.98 for any two trials that get there), and Optuna's ``best_trial`` then returns whichever
row the storage finds first. Ties go to the lower validation NLL of the trial's best checkpoint (the
finer judge of the same predictions), then to the earlier trial."""

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
from trustmatch.tune.study import DIVERGED, OBJECTIVES, VAL_NLL, TuneRequest, nll_value, storage_text

TIES = "ties broken by validation NLL (lower wins)"


def _state(trial: FrozenTrial) -> str:
    return DIVERGED if DIVERGED in trial.user_attrs else trial.state.name.lower()


def _value(trial: FrozenTrial) -> str:
    if trial.state == TrialState.PRUNED and trial.intermediate_values:  # its last report, where it stopped
        step = max(trial.intermediate_values)
        return f"({trial.intermediate_values[step]:.4f} at step {step})"
    return "" if trial.value is None else f"{trial.value:.4f}"


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_rows(
    trials: list[FrozenTrial], keys: list[str], nlls: dict[int, float | None], tied: frozenset[int] = frozenset()
) -> list[list[str]]:
    """number, state, value (`` (tie)`` for the ``tied`` numbers), validation NLL, one column per parameter,
    run directory."""
    return [
        [
            str(t.number),
            _state(t),
            _value(t) + (" (tie)" if t.number in tied else ""),
            "" if nlls.get(t.number) is None else f"{nlls[t.number]:.4f}",
            *(_param(t.params.get(k, "")) for k in keys),
            t.user_attrs.get("run_dir", ""),
        ]
        for t in trials
    ]


def trial_nll(trial: FrozenTrial, out: Path, task: str) -> float | None:
    """A complete trial's validation NLL: from the study, else (a study older than the attribute) from its
    run's metrics.json (``best.val``), where this machine has it; None where neither has it."""
    if trial.state != TrialState.COMPLETE:
        return None
    if VAL_NLL in trial.user_attrs:
        return float(trial.user_attrs[VAL_NLL])
    if "run_dir" not in trial.user_attrs:
        return None
    try:
        best = json.loads((out / trial.user_attrs["run_dir"] / "metrics.json").read_text())["best"]
        return nll_value(task, best["val"])
    except (OSError, ValueError, KeyError, TypeError):  # not here, unreadable, or no best checkpoint
        return None


def best_trial(
    trials: list[FrozenTrial], nlls: dict[int, float | None]
) -> tuple[FrozenTrial | None, list[FrozenTrial]]:
    """The complete trial of the highest objective, ties broken by the lower NLL (an unknown NLL loses),
    then the lower number; and the trials tied at that objective ([] where there is no tie)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None, []
    top = max(t.value for t in complete)  # type: ignore[type-var]
    tied = [t for t in complete if t.value == top]
    nll = {t.number: float("inf") if nlls.get(t.number) is None else nlls[t.number] for t in tied}
    best = min(tied, key=lambda t: (nll[t.number], t.number))
    return best, tied if len(tied) > 1 else []


def metrics_table(result: dict[str, Any]) -> list[str]:
    """The scalar test metrics as aligned ``metric | value`` rows, indented (a code block in markdown)."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in _headline(result).items()]
    rows = [("metric", "value"), *rows]
    key_width, value_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    lines = [f"{k:<{key_width}} | {v:>{value_width}}" for k, v in rows]
    lines.insert(1, "-" * key_width + "-+-" + "-" * value_width)
    return ["    " + line for line in lines]


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


def waiting(running: list[int]) -> str:
    """Why test is not read yet: a trial still running elsewhere may become the best, and test is read for
    the study's final choice only."""
    listed = ", ".join(map(str, running))
    return (
        f"not read yet: trial{'s' * (len(running) > 1)} {listed} still running in another worker and may become "
        "the best; the last worker to finish reads the best trial on test (or rerun this command once they end)"
    )


def write_report(study: optuna.Study, req: TuneRequest, out: Path, task: str) -> str:
    """report.md, trials.csv and history.png in ``out``; returns the markdown."""
    trials = study.get_trials(deepcopy=False)
    keys = list(req.space.params)
    header = ["number", "state", "value", "val_nll", *keys, "run_dir"]
    nlls = {t.number: trial_nll(t, out, task) for t in trials}
    best, tied = best_trial(trials, nlls)
    rows = trial_rows(trials, keys, nlls)
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
    lines.append(f"objective (maximised): {req.objective}, {OBJECTIVES[req.objective]}; {TIES}")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    marked = trial_rows(trials, keys, nlls, frozenset(t.number for t in tied))
    lines += ["| " + " | ".join(row) + " |" for row in marked]
    scores, why = importance(study, req.seed)
    lines += ["", "## parameter importance (fANOVA)", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in scores.items()] or [why]
    lines += ["", "## best trial", ""]
    if best is None:
        lines.append("no complete trial yet")
    else:
        command = shlex.join(["trustmatch", "train", req.config, *req.overrides, *best.user_attrs["overrides"]])
        lines.append(f"trial {best.number}, validation objective {best.value:.4f}")
        if tied:
            listing = ", ".join(f"trial {t.number} {_nll(nlls[t.number])}" for t in tied)
            lines[-1] += f": {len(tied)} trials tied at it ({listing}), {TIES}"
        lines += ["", f"    {command}", ""]
        running = [t.number for t in trials if t.state == TrialState.RUNNING]
        test, note = (None, waiting(running)) if running else test_once(out, best)
        if test is None:
            lines.append(f"test (read once, after the study): {note}")
        else:
            step = f", step {test['step']}" if "step" in test else ""
            lines += [f"test (read once, after the study), trial {best.number}'s best.pt{step}:", ""]
            lines += metrics_table({k: v for k, v in test.items() if k not in ("checkpoint", "step", "split")})
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", markdown)
    return markdown


def _nll(value: float | None) -> str:
    return "NLL unknown" if value is None else f"NLL {value:.4f}"


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar test metrics (not segmentation's per-class table)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
