"""Interruptions and faults: SIGTERM / SIGINT save at the current step and resume bit-exactly, SIGKILL
during a checkpoint write leaves the previous one loadable, non-finite losses stop or are skipped,
damaged checkpoints are one line, and logs are whole lines when output is not a terminal."""

import copy
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import TINY, TORCHRUN_TRAIN, assert_same_state
from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.core.errors import UserError
from trustmatch.run.checkpoint import load_checkpoint, save_checkpoint
from trustmatch.run.progress import Progress
from trustmatch.run.trainer import Trainer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
# long enough to be signalled mid-run, no evaluation before the end: a save at the signal's step
LONG = ["train.steps=300", "train.eval_every=1000", "train.log_every=2", "train.batch_size=8", "train.uratio=2"]


def _signal_mid_run(tmp_path: Path, signum: int, config: str = "digits-softmatch") -> tuple[Path, int]:
    """Start a real training process, signal it once it prints progress; its exit code and run dir."""
    run = tmp_path / "signalled"
    cmd = [sys.executable, "-m", "trustmatch", "train", config, "--out", str(run), *LONG]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # not a terminal: one line per log interval, no bar
        if ": step " in line:
            proc.send_signal(signum)
            if signum == signal.SIGTERM:  # schedulers may signal twice (the job and each process)
                proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=120)
    assert "\r" not in out + err
    return run, proc.wait()


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_bit_exact(tmp_path: Path) -> None:
    run, code = _signal_mid_run(tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    stopped_at = load_checkpoint(run / "last.pt")["step"]
    assert 0 < stopped_at < 300  # saved at the signal's step, not at an evaluation (there was none)
    # the same environment for all three (bf16 results on the CPU depend on the thread count)
    train = [sys.executable, "-m", "trustmatch", "train", "--quiet"]
    subprocess.run([*train, "--resume", str(run)], env=ENV, check=True, capture_output=True, timeout=300)
    straight = tmp_path / "straight"
    subprocess.run([*train, "digits-softmatch", "--out", str(straight), *LONG], env=ENV, check=True, timeout=300)
    assert_same_state(load_checkpoint(straight / "last.pt"), load_checkpoint(run / "last.pt"))
    saved = [json.loads((d / "metrics.json").read_text()) for d in (straight, run)]
    assert_same_state(*saved)


@pytest.mark.slow
def test_sigint_saves_the_current_step(tmp_path: Path) -> None:
    """Ctrl-C takes SIGTERM's path (one handler): it saves the step it stopped at and exits 130; the
    resume after a signal is the SIGTERM test's."""
    run, code = _signal_mid_run(tmp_path, signal.SIGINT)
    assert code == 128 + signal.SIGINT
    state = load_checkpoint(run / "last.pt")
    assert 0 < state["step"] < 300 and not (run / "metrics.json").exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_and_resumes_bit_exactly(tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its 2 gloo workers; they agree on the step, save it, and a resume
    under torchrun equals the uninterrupted 2-process run."""
    steps = ["train.steps=200", *LONG[1:]]
    torchrun = TORCHRUN_TRAIN
    run, straight = tmp_path / "signalled", tmp_path / "straight"
    proc = subprocess.Popen(
        [*torchrun, "digits-softmatch", "--out", str(run), *steps],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if ": step " in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert err.count("trustmatch: stopped at step") == 1  # one report, from rank 0
    stopped_at = load_checkpoint(run / "last.pt")["step"]
    assert 0 < stopped_at < 200
    subprocess.run([*torchrun, "--quiet", "--resume", str(run)], env=ENV, check=True, capture_output=True, timeout=300)
    subprocess.run(
        [*torchrun, "--quiet", "digits-softmatch", "--out", str(straight), *steps],
        env=ENV,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert_same_state(load_checkpoint(straight / "last.pt"), load_checkpoint(run / "last.pt"))


KILL_WRITER = """
import os, signal, sys, torch
from pathlib import Path
from trustmatch.core import fileio
from trustmatch.run.checkpoint import save_checkpoint

path, where = Path(sys.argv[1]), sys.argv[2]
save_checkpoint({"version": 1, "w": torch.full((1_000_000,), 1.0)}, path)
if where == "mid-write":  # killed by the kernel after the first megabyte of the second version
    written = 0
    write = fileio._Recording.write

    def dying_write(self, data):
        global written
        written += len(data)
        if written > 1 << 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, data)

    fileio._Recording.write = dying_write
else:  # killed with every byte written, before the rename
    fileio.os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
save_checkpoint({"version": 2, "w": torch.full((1_000_000,), 2.0)}, path)
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: Path, where: str) -> None:
    """A real process is SIGKILLed while it writes a new version of a checkpoint: the old version
    loads, whole, and only a temp file is left beside it."""
    script, path = tmp_path / "writer.py", tmp_path / "last.pt"
    script.write_text(KILL_WRITER)
    done = subprocess.run([sys.executable, str(script), str(path), where], env=ENV, timeout=120)
    assert done.returncode == -signal.SIGKILL
    state = load_checkpoint(path)
    assert state["version"] == 1 and torch.equal(state["w"], torch.full((1_000_000,), 1.0))
    assert len(list(tmp_path.glob(".last.pt.*.tmp"))) == 1


def test_a_full_disk_inside_torch_save_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a failed write as its own RuntimeError; the ENOSPC behind it is named."""
    import errno

    from trustmatch.core import fileio

    path = tmp_path / "last.pt"
    save_checkpoint({"version": 1}, path)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio._Recording, "write", full)
    with pytest.raises(
        UserError, match=r"cannot write .*last.pt \(No space left on device\); the previous last.pt is intact"
    ):
        save_checkpoint({"version": 2, "w": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["version"] == 1 and not list(tmp_path.glob(".*.tmp"))


def test_checkpoints_carry_crcs_whatever_torch_is_told(tmp_path: Path) -> None:
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # a process-wide torch setting a user may have changed
    try:
        save_checkpoint({"w": torch.arange(10.0)}, tmp_path / "last.pt")
        assert torch.equal(load_checkpoint(tmp_path / "last.pt")["w"], torch.arange(10.0))
        assert not torch.serialization.get_crc32_options()  # left as the user set it
    finally:
        torch.serialization.set_crc32_options(previous)


def test_resume_removes_temp_files_of_an_interrupted_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(load_config("digits-fixmatch", TINY), run, progress=False).fit(stop_at=3)
    stale = run / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    Trainer.resume(run, progress=False)
    assert not stale.exists() and load_checkpoint(run / "last.pt")["step"] == 3


@pytest.mark.parametrize("cut", ["truncated", "flipped", "empty", "not a dict"])
def test_damaged_last_pt_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: str) -> None:
    run = tmp_path / "run"
    Trainer(load_config("digits-fixmatch", TINY), run, progress=False).fit(stop_at=3)
    path = run / "last.pt"
    data = path.read_bytes()
    if cut == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif cut == "flipped":  # bytes in the middle of the archive overwritten
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :])
    elif cut == "empty":
        path.write_bytes(b"")
    else:
        save_checkpoint([1, 2, 3], path)  # a valid archive of the wrong shape
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "Traceback" not in err[0], err


def test_every_truncation_of_a_checkpoint_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.arange(3000.0), "run": {"history": [{"step": 1}]}}, path)
    data = path.read_bytes()
    for length in range(0, len(data), max(1, len(data) // 97)):
        path.write_bytes(data[:length])
        with pytest.raises(UserError, match="unreadable or truncated"):
            load_checkpoint(path)


def _nan_at(trainer: Trainer, step: int) -> None:
    """Make the loss of step ``step`` (1-based) NaN, as an overflow would."""
    task_step = trainer.task.step_with_regularizers

    def poisoned(model, batch, at, total):
        out = task_step(model, batch, at, total)
        if at + 1 == step:
            out.loss = out.loss * float("nan")
        return out

    trainer.task.step_with_regularizers = poisoned


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(load_config("digits-softmatch", [*TINY, "train.save_every=2"]), run, progress=False)
    _nan_at(trainer, 5)
    with pytest.raises(UserError) as raised:
        trainer.fit()
    message = str(raised.value)
    assert "not finite at step 5" in message and f"{run / 'last.pt'} (step 4)" in message and "\n" not in message
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["parts"]["model"].values())


def test_huge_learning_rate_stops_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real divergence (no injected NaN): one line, exit 2, and the run can be inspected."""
    run = tmp_path / "run"
    args = ["train", "digits-fixmatch", "--out", str(run), "--quiet", *TINY, "train.lr=1e30", "train.steps=30"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite at step" in err[0] and "train.nonfinite=skip" in err[0]


def _restorable(trainer: Trainer) -> dict:
    """Everything a skipped step must leave as it was (the streams and the schedule move on)."""
    moving = ("scheduler", "lb_stream", "ulb_stream")
    state = {n: copy.deepcopy(p.state_dict()) for n, p in trainer.parts.items() if n not in moving}
    state["optimizer"] = state["optimizer"]["state"]  # its momentum; the lr follows the schedule
    state["rank"] = {n: copy.deepcopy(r.rank_state()) for n, r in trainer.task.regularizers.items()}
    return state


@pytest.mark.parametrize(
    "config, extra",
    [
        ("digits-softmatch", []),
        ("digits-csl", []),  # its selection recorder
        ("digits-softmatch", ["calibratemix.mode=efficient", "calibratemix.warmup=0"]),  # trackers, pending mixes
    ],
    ids=["softmatch", "csl", "calibratemix-efficient"],
)
def test_skipped_nonfinite_steps_change_nothing_and_are_counted(tmp_path: Path, config: str, extra: list[str]) -> None:
    """With train.nonfinite=skip a NaN step leaves weights, BatchNorm statistics, optimizer,
    selector, trackers and recorder as they were; the schedule and the data move on; metrics.json
    counts it."""
    cfg = load_config(config, [*TINY, "train.nonfinite=skip", *extra])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    _nan_at(trainer, 2)
    trainer.fit(stop_at=1)
    before, position = _restorable(trainer), trainer.task.streams["ulb_stream"].position
    trainer.fit(stop_at=2)
    assert trainer.step == 2 and trainer.skipped == 1
    assert_same_state(before, _restorable(trainer))
    assert trainer.task.streams["ulb_stream"].position > position and trainer.scheduler.last_epoch == 2
    metrics = trainer.fit()
    assert metrics["skipped_steps"] == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_steps"] == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["run"]["skipped"] == 1


def test_skip_mode_stops_a_model_that_diverged_anyway(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e30: the first update is finite but huge, every later loss overflows and is skipped, and
    the evaluation of the diverged EMA model is one line, not a traceback."""
    run = tmp_path / "run"
    args = ["train", "digits-fixmatch", "--out", str(run), "--quiet", *TINY, "train.lr=1e30", "train.nonfinite=skip"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outputs are not finite at step 3" in err[0], err


@pytest.mark.slow
def test_fit_after_a_signal_trains_again(tmp_path: Path) -> None:
    trainer = Trainer(load_config("digits-fixmatch", TINY), tmp_path / "run", progress=False)
    trainer.signals.requested = signal.SIGTERM  # as if signalled before the first step
    trainer.fit()
    assert trainer.step == 0 or trainer.stop_signal is None
    trainer.fit()
    assert trainer.step == 6 and trainer.stop_signal is None


@pytest.mark.slow
def test_skip_mode_without_faults_equals_the_default(tmp_path: Path) -> None:
    """The snapshots skip mode takes change nothing when every loss is finite."""
    runs = {}
    for mode in ("stop", "skip"):
        Trainer(
            load_config("digits-flexmatch", [*TINY, f"train.nonfinite={mode}"]), tmp_path / mode, progress=False
        ).fit()
        runs[mode] = load_checkpoint(tmp_path / mode / "last.pt")
        runs[mode]["config"]["train"].pop("nonfinite")
    assert_same_state(runs["stop"], runs["skip"])


def test_save_every_writes_last_pt_between_evaluations(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(
        load_config("digits-fixmatch", [*TINY, "train.save_every=2", "train.eval_every=5"]), run, progress=False
    )
    steps = []
    save = trainer._save_last

    def record() -> None:
        save()
        steps.append(load_checkpoint(run / "last.pt")["step"])

    trainer._save_last = record
    trainer.fit()
    assert steps == [2, 4, 5, 6]  # every 2 steps, at the evaluation at 5, and at the end
    mid = Trainer.resume(run, progress=False)
    assert mid.step == 6


def test_a_mid_run_save_has_no_temperature_of_another_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(load_config("digits-fixmatch", [*TINY, "train.save_every=4"]), run, progress=False)
    trainer.fit(stop_at=4)  # evaluation at 3 fitted T; the save at 4 is of a later model
    assert "temperature" not in load_checkpoint(run / "last.pt")


def test_progress_is_whole_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    progress = Progress(10, 0, "fixmatch on digits", enabled=True, stream=stream)
    assert progress.lines
    for _ in range(4):
        progress.update()
    progress.log({"loss_sup": 0.5, "mask": 0.25})
    progress.close()
    out = capsys.readouterr().out
    assert stream.getvalue() == ""  # no bar drawn
    assert out.count("\n") == 1 and "\r" not in out
    assert "fixmatch on digits: step 4/10 loss_sup 0.5 mask 0.25 |" in out and "left" in out


def test_progress_keeps_the_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(10, 0, "run", enabled=True, stream=stream)
    progress.update()
    progress.log({"loss_sup": 0.5})
    progress.close()
    assert not progress.lines and "\r" in stream.getvalue() and "loss_sup=0.5" in stream.getvalue()


def test_train_logs_one_line_per_interval_in_a_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "digits-fixmatch", "--out", str(tmp_path / "run"), *TINY]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if ": step " in line]
    assert [line.split(": step ")[1].split()[0] for line in lines] == ["2/6", "4/6", "6/6"]


@pytest.mark.slow
def test_a_main_process_error_under_torchrun_is_one_line_from_every_process(tmp_path: Path) -> None:
    """The run-directory check runs on rank 0 and is shared: both processes exit 2, one line printed."""
    run = tmp_path / "run"
    Trainer(load_config("digits-fixmatch", TINY), run, progress=False).fit(stop_at=3)
    torchrun = TORCHRUN_TRAIN
    done = subprocess.run(
        [*torchrun, "digits-fixmatch", "--out", str(run), "--quiet", *TINY],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert done.stderr.count("trustmatch: error:") == 1 and "already holds a run" in done.stderr
    assert "trustmatch/" not in done.stderr.replace(str(tmp_path), "")  # no worker traceback (torchrun prints its own)


def test_skip_mode_stops_after_too_many_skips_in_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trustmatch.run.nonfinite as nonfinite_module

    monkeypatch.setattr(nonfinite_module, "MAX_CONSECUTIVE_SKIPS", 3)
    trainer = Trainer(load_config("digits-fixmatch", [*TINY, "train.nonfinite=skip"]), tmp_path / "run", progress=False)
    step = trainer.task.step_with_regularizers

    def always_nan(model, batch, at, total):
        out = step(model, batch, at, total)
        out.loss = out.loss * float("nan")
        return out

    trainer.task.step_with_regularizers = always_nan
    expected = r"the loss is not finite at 3 steps in a row, up to step 3 \(.*\); no checkpoint was saved yet: lower"
    with pytest.raises(UserError, match=expected + r" train.lr and start again$"):
        trainer.fit()
    assert trainer.skipped == 3
