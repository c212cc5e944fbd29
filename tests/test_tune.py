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
from trustmatch.reporting.plots import draw_history
from trustmatch.tasks.task import SSLTask
from trustmatch.tune import TuneRequest, load_space, parse_spec, shipped_spaces, storage, tune
from trustmatch.tune import report as report_module
from trustmatch.tune.report import best_trial, metrics_table, write_report
from trustmatch.tune.space import Param, check_space
from trustmatch.tune.study import nll_value

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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tuner:hunter2@db.example/tune", "postgresql://tuner:***@db.example/tune"),
        (
            "mysql+pymysql://tuner:hunter2@db:3306/tune?charset=utf8",
            "mysql+pymysql://tuner:***@db:3306/tune?charset=utf8",
        ),
        ("postgresql://tuner:hunter2@db:port/tune", "postgresql://tuner:***@db:port/tune"),  # unparsable port
        ("postgresql://tuner:hun@ter2@db/tune", "postgresql://tuner:***@db/tune"),  # an unescaped '@'
        ("postgresql://tuner@db/tune", "postgresql://tuner@db/tune"),
        ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
    ],
)
def test_storage_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert storage.shown(url) == shown


@pytest.mark.parametrize("via_env", [False, True])
def test_unreachable_storage_hides_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], via_env: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    url = "postgresql+nosuchdriver://tuner:hunter2@127.0.0.1:1/tune"
    args = ["tune", "digits-fixmatch", "--space", "ssl", "--trials", "2", "--out", str(tmp_path / "t")]
    if via_env:
        monkeypatch.setenv(storage.ENV, url)
    else:
        args += ["--storage", url]
    assert main(args) == 2
    err = capsys.readouterr().err
    source = "TRUSTMATCH_STORAGE" if via_env else "--storage"
    assert err.count("\n") == 1 and f"cannot reach {source} '{url.replace('hunter2', '***')}'" in err
    assert "hunter2" not in err
    assert list(tmp_path.iterdir()) == []


def test_storage_password_is_hidden_in_everything_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reachable server with a password, stood in for by SQLite: stdout, stderr and the files hide it."""
    sqlite = f"sqlite:///{tmp_path / 'server.db'}"
    opened: list[str] = []

    def server(url: str, source: str = "--storage") -> optuna.storages.RDBStorage:
        opened.append(url)
        return storage.open_storage(sqlite, source)

    monkeypatch.setattr("trustmatch.tune.study.open_storage", server)
    monkeypatch.setattr("trustmatch.tune.command.run_trials", lambda *args: None)  # the study, not its trials
    monkeypatch.setenv(storage.ENV, "postgresql://tuner:hunter2@db.example/tune")
    out = tmp_path / "t"
    assert main(["tune", "digits-supervised", "--space", "supervised", "--trials", "1", "--out", str(out)]) == 0
    assert opened == ["postgresql://tuner:hunter2@db.example/tune"]  # the password reaches the driver only
    printed = capsys.readouterr()
    written = [(out / name).read_text() for name in ("report.md", "tune.json")]
    for text in (printed.out, printed.err, *written):
        assert "hunter2" not in text
    assert "storage: postgresql://tuner:***@db.example/tune (from TRUSTMATCH_STORAGE)" in written[0]
    assert "postgresql://tuner:***@db.example/tune" in printed.err


def test_storage_from_the_environment_and_the_flag_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env_url, flag_url = (f"sqlite:///{tmp_path / name}" for name in ("env.db", "flag.db"))
    monkeypatch.setenv(storage.ENV, env_url)
    args = ["tune", "digits-supervised", *TINY, "--space", "supervised", "--trials", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0  # one trial, run: it lands in the variable's study
    (name,) = optuna.study.get_all_study_names(env_url)
    (trial,) = optuna.load_study(study_name=name, storage=env_url).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and not (tmp_path / "a" / "study.db").exists()
    metrics = json.loads((tmp_path / "a" / "trial-0" / "metrics.json").read_text())
    assert trial.user_attrs["val_nll"] == pytest.approx(metrics["best"]["val"]["nll"])

    monkeypatch.setattr("trustmatch.tune.command.run_trials", lambda *args: None)
    assert main([*args, "--out", str(tmp_path / "b"), "--storage", flag_url]) == 0
    assert optuna.study.get_all_study_names(flag_url) == [name]  # --storage wins over the variable
    assert len(optuna.load_study(study_name=name, storage=env_url).get_trials()) == 1  # untouched
    assert "(from --storage)" in (tmp_path / "b" / "report.md").read_text()
    assert "--storage wins" in " ".join(_help(capsys).split())


def _help(capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    return capsys.readouterr().out


def test_trainer_without_validation_cannot_hold_test_out(tmp_path: Path) -> None:
    from trustmatch.run.trainer import Trainer

    cfg = load_config("digits-supervised", [*TINY, "data.val_per_class=0", "train.evaluate_test=false"])
    with pytest.raises(UserError, match="train.evaluate_test=false needs a validation split"):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- studies


@pytest.mark.slow
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
    assert "test (read once, after the study), trial " in markdown and "best.pt, step " in markdown
    assert "\n    accuracy " in markdown and "\n    nll " in markdown  # the metric | value table
    assert "ties broken by validation NLL" in markdown
    for row in rows:  # the NLL that breaks ties: the best checkpoint's validation NLL, from the study
        metrics = json.loads((out / row["run_dir"] / "metrics.json").read_text())
        assert float(row["val_nll"]) == pytest.approx(metrics["best"]["val"]["nll"], abs=1e-4)

    splits.clear()
    tune(TuneRequest("digits-fixmatch", TINY, load_space(["fixmatch"]), 3, out=out))  # resumes: one more
    assert (out / "trial-2").is_dir() and not (out / "trial-3").exists()
    assert splits.count("test") <= 1 and "test" not in splits[:-1]
    tune(TuneRequest("digits-fixmatch", TINY, load_space(["fixmatch"]), 3, out=out))  # done: no trial
    assert not (out / "trial-3").exists()
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3


@pytest.mark.slow
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
    assert "| number | state | value | val_nll | train.lr | method.lambda_u_rampup |" in printed
    assert "trustmatch train digitscenes-unimatch data.scenes=24" in printed and "\n    miou " in printed
    rows = list(csv.DictReader((out / "trials.csv").open()))
    for row in rows:  # segmentation breaks ties by the pixel NLL
        metrics = json.loads((out / row["run_dir"] / "metrics.json").read_text())
        assert float(row["val_nll"]) == pytest.approx(metrics["best"]["val"]["pixel_nll"], abs=1e-4)
    assert (out / "history.png").is_file()


def test_pruned_trial_is_kept_and_marked(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    pruner = optuna.pruners.ThresholdPruner(lower=2.0)  # accuracy < 2: pruned at the first evaluation
    request = TuneRequest("digits-supervised", TINY, load_space(["supervised"]), 1, out=out, pruner=pruner)
    markdown, _ = tune(request)
    mark = json.loads((out / "trial-0" / "pruned.json").read_text())
    assert mark["pruned_at_step"] == 2 and (out / "trial-0" / "last.pt").is_file()
    assert "| 0 | pruned | (" in markdown and "no complete trial yet" in markdown


# ---------------------------------------------------------------------------------------------- report


def _complete(lr: float, value: float, attrs: dict[str, object]) -> optuna.trial.FrozenTrial:
    """A finished trial as the study stores it, without training a run."""
    return optuna.trial.create_trial(
        params={"train.lr": lr},
        distributions={"train.lr": optuna.distributions.FloatDistribution(0.003, 0.3, log=True)},
        value=value,
        user_attrs={"overrides": [f"train.lr={lr}"], **attrs},
    )


def test_tie_goes_to_the_lower_validation_nll(tmp_path: Path) -> None:
    """The issue's study: two trials tie at 0.98; the one at the edge of the lr range has the worse NLL."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(_complete(0.29, 0.98, {"run_dir": "trial-0", "val_nll": 0.41}))
    study.add_trial(_complete(0.01, 0.96, {"run_dir": "trial-1", "val_nll": 0.12}))
    study.add_trial(_complete(0.03, 0.98, {"run_dir": "trial-2"}))  # older study: its NLL in metrics.json only
    (tmp_path / "trial-2").mkdir()
    (tmp_path / "trial-2" / "metrics.json").write_text(json.dumps({"best": {"val": {"accuracy": 0.98, "nll": 0.2}}}))
    study.add_trial(_complete(0.05, 0.98, {"run_dir": "trial-3"}))  # another machine's run: its NLL unknown
    request = TuneRequest("digits-fixmatch", [], load_space(["train.lr=log:0.003:0.3"]), 4, out=tmp_path)
    markdown = write_report(study, request, tmp_path, "classification")
    assert "ties broken by validation NLL" in markdown
    best = markdown.split("## best trial", 1)[1]
    assert best.startswith("\n\ntrial 2, validation objective 0.9800: 3 trials tied at it (trial 0 NLL 0.4100, ")
    assert "trial 2 NLL 0.2000, trial 3 NLL unknown)" in best
    assert "trustmatch train digits-fixmatch train.lr=0.03" in best
    assert "| 0 | complete | 0.9800 (tie) | 0.4100 |" in markdown and "| 1 | complete | 0.9600 | 0.1200 |" in markdown
    assert "| 2 | complete | 0.9800 (tie) | 0.2000 |" in markdown and "| 3 | complete | 0.9800 (tie) |  |" in markdown
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["value"] for r in rows] == ["0.9800", "0.9600", "0.9800", "0.9800"]  # numbers, no marks
    assert [r["val_nll"] for r in rows] == ["0.4100", "0.1200", "0.2000", ""]


def test_test_is_not_read_while_another_worker_runs_a_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers share a study: the first to finish must not read test while the other's trial, which may
    become the best, still runs (seen with two workers on one study); the last one to finish reads it."""
    reads: list[str] = []
    monkeypatch.setattr(report_module, "test_once", lambda out, best: (reads.append(best.number), (None, "read"))[1])
    request = TuneRequest("digits-fixmatch", [], load_space(["train.lr=log:0.003:0.3"]), 2, out=tmp_path)
    study = optuna.create_study(direction="maximize")
    study.add_trial(_complete(0.03, 0.9, {"run_dir": "trial-0"}))
    running = optuna.trial.create_trial(
        params={"train.lr": 0.01},
        distributions={"train.lr": optuna.distributions.FloatDistribution(0.003, 0.3, log=True)},
        state=optuna.trial.TrialState.RUNNING,
        user_attrs={"overrides": ["train.lr=0.01"], "run_dir": "trial-1"},
    )
    study.add_trial(running)
    markdown = write_report(study, request, tmp_path, "classification")
    assert reads == [] and "not read yet: trial 1 still running in another worker" in markdown
    finished = optuna.create_study(direction="maximize")
    finished.add_trial(_complete(0.03, 0.9, {"run_dir": "trial-0"}))
    write_report(finished, request, tmp_path, "classification")
    assert reads == [0]


def test_best_trial_without_a_tie_and_segmentation_nll() -> None:
    trials = [_complete(0.01, 0.5, {}), _complete(0.02, 0.7, {})]
    trials[0].number, trials[1].number = 0, 1
    best, tied = best_trial(trials, {0: 0.1, 1: 0.9})  # the objective decides; NLL only breaks ties
    assert best is trials[1] and tied == []
    assert nll_value("segmentation", {"miou": 0.3, "pixel_nll": 0.7, "nll": 9.0}) == 0.7
    assert nll_value("classification", {"accuracy": 0.3, "nll": 0.4}) == 0.4


def test_history_axis_counts_whole_trials() -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ax = Figure().subplots()
    draw_history(ax, [(0, 0.5), (1, 0.7), (2, 0.6)], [(3, 0.2)], "metric")
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    ticks = ax.get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_test_metrics_print_as_an_aligned_table() -> None:
    result = {"accuracy": 0.951234, "ece_15": 0.0321, "nll": 0.2, "n": 359, "calibrated": {"accuracy": 0.95}}
    assert metrics_table(result) == [
        "    metric   |  value",
        "    ---------+-------",
        "    accuracy | 0.9512",
        "    ece_15   | 0.0321",
        "    nll      | 0.2000",
        "    n        |    359",
    ]


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
