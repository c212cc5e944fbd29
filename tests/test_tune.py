"""``trustmatch tune``: spaces, 2-trial studies on both tasks (validation only, test read once after),
resume, pruning, and every bad input as one line with nothing made."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.core.errors import UserError
from trustmatch.tasks.task import SSLTask
from trustmatch.tune import TuneRequest, load_space, parse_spec, shipped_spaces, tune
from trustmatch.tune.space import Param, check_space

TINY = ["train.steps=4", "train.eval_every=2", "train.log_every=2", "train.batch_size=8", "train.uratio=2"]
SMALL = [
    "data.scenes=24",
    "data.labeled_images=6",
    "data.val_images=4",
    "train.batch_size=2",
    "train.steps=2",
    "train.eval_every=1",
    "train.log_every=1",
    "train.eval_batch_size=64",
]


def _record_splits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every split a task reads images of, in order (the study must never read "test"): both tasks read
    them through ``SSLTask.split_data`` only, validation and report evaluations alike."""
    splits: list[str] = []
    split_data = SSLTask.split_data

    def recording(self, split):  # type: ignore[no-untyped-def]
        splits.append(split)
        return split_data(self, split)

    monkeypatch.setattr(SSLTask, "split_data", recording)
    return splits


# ---------------------------------------------------------------------------------------------- spaces


def test_spec_syntax() -> None:
    assert parse_spec("train.lr", "log:0.003:0.3") == Param("train.lr", "float", 0.003, 0.3, True)
    assert parse_spec("method.lambda_u", "0.25:4") == Param("method.lambda_u", "float", 0.25, 4.0)
    assert parse_spec("calibratemix.k", "int:1:5") == Param("calibratemix.k", "int", 1, 5)
    assert parse_spec("calibratemix.k", "int:log:1:64").log
    assert parse_spec("calibratemix.loss", "choice:bce,ce").choices == ("bce", "ce")
    assert parse_spec("method.tmp", ["true", "false"]).choices == (True, False)
    assert parse_spec("calibratemix.mode", "choice:off,faithful").choices == ("off", "faithful")  # YAML 1.2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0.3:0.1", "empty range (low 0.3 >= high 0.1)"),
        ("1:1", "empty range"),
        ("log:0:0.3", "a log range needs LOW > 0, got 0"),
        ("int:1.5:4", "'1.5' is not an integer"),
        ("abc", "not a range"),
        ("choice:bce", "a choice needs two values or more"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec("train.lr", spec)


def test_spaces_merge_names_files_and_key_specs(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("params:\n  calibratemix.k: int:1:5\n  train.lr: 0.01:0.1\n")  # 1:5 is not YAML 1.1's 65
    space = load_space(["ssl", str(path), "method.lambda_u=choice:1,2"])
    assert space.label == "ssl+mine+custom"
    assert space.params["calibratemix.k"] == Param("calibratemix.k", "int", 1, 5)
    assert space.params["train.lr"] == Param("train.lr", "float", 0.01, 0.1)  # the file's, after ssl's
    assert space.params["method.lambda_u"].choices == (1, 2)


@pytest.mark.parametrize(
    ("space", "config", "extra"),
    [
        ("fixmatch", "digits-fixmatch", []),
        ("ssl", "digits-softmatch", []),
        ("csl", "digits-csl", []),
        ("supervised", "digits-supervised", []),
        ("calibratemix", "digits-fixmatch", ["calibratemix.mode=efficient"]),
        ("unimatch", "digitscenes-unimatch", []),
        ("csl", "digitscenes-csl", []),
    ],
)
def test_shipped_spaces_fit_their_methods(space: str, config: str, extra: list[str]) -> None:
    assert space in shipped_spaces()
    check_space(load_space([space]), config, extra)


def test_list_spaces(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--spaces"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("fixmatch", "calibratemix", "unimatch", "csl", "supervised"))
    assert main(["list", "--spaces", "fixmatch"]) == 0
    assert "method.tau: 0.8:0.99" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.val_per_class=0", "--space", "ssl"], "no validation split to choose on (data.val_per_class=0"),
        (["--space", "method.lamda_u=0.25:4"], "did you mean 'method.lambda_u'?"),
        (["--space", "method.tau=0.5:1.5"], "'method.tau' must be in [0, 1]"),
        (["--space", "train.lr=0.3:0.1"], "empty range (low 0.3 >= high 0.1)"),
        (["--space", "train.lr=log:0:0.3"], "a log range needs LOW > 0"),
        (["--space", "ssl", "--storage", "sqlite:////nonexistent-dir/x/study.db"], "cannot reach --storage"),
        (["--space", "ssl", "--storage", "nosuchdb://host/x"], "cannot reach --storage"),
        (["--space", "nosuch"], "no shipped space, file or key=spec"),
        (["train.lr=0.1", "--space", "ssl"], "train.lr is both set (after CONFIG) and searched"),
        (["--space", "ssl", "--objective", "ece"], "--objective 'ece' is not one of metric, metric-ece"),
    ],
)
def test_bad_input_is_one_line_and_makes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["tune", "digits-fixmatch", *args, "--trials", "2", "--out", str(tmp_path / "t" / "study")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("trustmatch: error: "), err
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_trainer_without_validation_cannot_hold_test_out(tmp_path: Path) -> None:
    from trustmatch.run.trainer import Trainer

    cfg = load_config("digits-supervised", [*TINY, "data.val_per_class=0", "train.evaluate_test=false"])
    with pytest.raises(UserError, match="train.evaluate_test=false needs a validation split"):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- studies


def test_classification_study_reads_test_once_after_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = _record_splits(monkeypatch)
    out = tmp_path / "tune"
    request = TuneRequest("digits-fixmatch", TINY, load_space(["fixmatch"]), 2, out=out)
    markdown, _ = tune(request)
    assert splits.count("test") == 1 and splits[-1] == "test", splits  # the best trial, after the study
    assert set(splits[:-1]) == {"val"}, splits  # what the trials read
    assert {"report.md", "trials.csv", "history.png", "study.db", "trial-0", "trial-1"} <= set(os.listdir(out))
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "complete"] and "method.tau" in rows[0]
    for trial in ("trial-0", "trial-1"):  # ordinary runs, with the test split held out
        metrics = json.loads((out / trial / "metrics.json").read_text())
        assert "held out" in metrics["test_note"] and metrics["best"]["val"]
        assert load_config(str(out / trial / "config.yaml")).train.evaluate_test is False
    best = max(rows, key=lambda r: float(r["value"]))
    best_val = json.loads((out / best["run_dir"] / "metrics.json").read_text())["best"]["val"]["accuracy"]
    assert float(best["value"]) == pytest.approx(best_val, abs=1e-4)
    assert "trustmatch train digits-fixmatch train.steps=4" in markdown and "method.tau=" in markdown
    assert "test (read once, after the study)" in markdown and '"split": "test"' in markdown

    splits.clear()
    tune(TuneRequest("digits-fixmatch", TINY, load_space(["fixmatch"]), 3, out=out))  # resumes: one more
    assert (out / "trial-2").is_dir() and not (out / "trial-3").exists()
    assert splits.count("test") <= 1 and "test" not in splits[:-1]
    tune(TuneRequest("digits-fixmatch", TINY, load_space(["fixmatch"]), 3, out=out))  # done: no trial
    assert not (out / "trial-3").exists()
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3


def test_segmentation_study_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("trustmatch.data.digitscenes.TEST_SCENES", 12)  # the one test evaluation, quick
    splits = _record_splits(monkeypatch)
    out = tmp_path / "seg"
    args = ["tune", "digitscenes-unimatch", *SMALL, "--space", "train.lr=log:0.001:0.05", "--space"]
    code = main([*args, "method.lambda_u_rampup=0:0.5", "--trials", "2", "--out", str(out), "--quiet"])
    assert code == 0
    assert splits.count("test") == 1 and splits[-1] == "test", splits
    assert set(splits[:-1]) == {"val"}, splits  # the trials' validation and report passes, and overlays
    printed = capsys.readouterr().out
    assert "| number | state | value | train.lr | method.lambda_u_rampup |" in printed
    assert "trustmatch train digitscenes-unimatch data.scenes=24" in printed and '"miou"' in printed
    assert (out / "history.png").is_file()


def test_pruned_trial_is_kept_and_marked(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    pruner = optuna.pruners.ThresholdPruner(lower=2.0)  # accuracy < 2: pruned at the first evaluation
    request = TuneRequest("digits-supervised", TINY, load_space(["supervised"]), 1, out=out, pruner=pruner)
    markdown, _ = tune(request)
    mark = json.loads((out / "trial-0" / "pruned.json").read_text())
    assert mark["pruned_at_step"] == 2 and (out / "trial-0" / "last.pt").is_file()
    assert "| 0 | pruned | (" in markdown and "no complete trial yet" in markdown


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path: Path) -> None:
    """Two workers with one --storage URL finish N trials between them, each trial once."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-m", "trustmatch", "tune", "digits-supervised", *TINY, "--space", "supervised"]
    command += ["--trials", "4", "--storage", storage, "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    workers = [
        subprocess.Popen(
            [*command, "--out", str(tmp_path / name)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name in ("a", "b")
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err.decode()[-2000:]
    names = optuna.study.get_all_study_names(storage)
    assert len(names) == 1
    trials = optuna.load_study(study_name=names[0], storage=storage).get_trials()
    numbers = sorted(t.number for t in trials)  # two workers claiming the last place at once may add one
    assert numbers in ([0, 1, 2, 3], [0, 1, 2, 3, 4])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    ran = [p.name for w in ("a", "b") for p in (tmp_path / w).glob("trial-*")]
    assert sorted(ran) == [f"trial-{n}" for n in numbers]  # each trial run once, by one worker
