"""``trustmatch tune`` from start to report: check, open (or resume) the study, run the trials it lacks,
report, and only then read the test split once, for the best trial."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna

from trustmatch.tune.report import write_report
from trustmatch.tune.study import TuneRequest, open_study, prepare, run_trials


def tune(req: TuneRequest) -> tuple[str, Path]:
    """The report's markdown and the tune directory."""
    cfg, name, out = prepare(req)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial is one line of ours
    with warnings.catch_warnings():  # the heartbeat (stale trials of dead workers) is "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = open_study(req, name, out)
        run_trials(study, req, cfg, out)
    return write_report(study, req, out, cfg.task), out
