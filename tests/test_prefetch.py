"""``train.prefetch``: the batches built ahead in a thread are the sequential ones (values and order), a run
stopped with a batch built ahead resumes to exactly the run without the producer, and the thread never
outlives ``fit`` (end, signal, error; an error in the producer surfaces with its traceback)."""

import json
import os
import signal
import threading
import traceback
from pathlib import Path

import pytest
import torch

from test_segmentation_train import SMALL, _folder_args, _folders
from test_train import TINY, assert_same_state, check_torchrun_resume
from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.core.errors import UserError
from trustmatch.run.checkpoint import load_checkpoint
from trustmatch.run.prefetch import THREAD_NAME, prefetch_enabled, tensors
from trustmatch.run.trainer import Trainer

CONFIGS = {
    "classification": ("digits-softmatch", [*TINY, "train.threads=1"]),
    "segmentation": ("digitscenes-unimatch", [*SMALL, "train.threads=1", "train.device=cpu"]),
}


def _trainer(task: str, out: Path, prefetch: str) -> Trainer:
    name, overrides = CONFIGS[task]
    return Trainer(load_config(name, [*overrides, f"train.prefetch={prefetch}"]), out, progress=False)


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("task", "device"),
    [
        ("classification", "cpu"),
        ("segmentation", "cpu"),
        ("files", "cpu"),
        pytest.param("classification", "cuda", marks=[pytest.mark.cuda, CUDA]),
        pytest.param("segmentation", "cuda", marks=[pytest.mark.cuda, CUDA]),
    ],
)
def test_prefetched_batches_are_the_sequential_ones(tmp_path: Path, task: str, device: str) -> None:
    """Four batches through the producer (three built in its thread; on CUDA on its side stream; for files, read
    and decoded in the data workers it hands them to) against four built in turn from the same state: the same
    tensors in the same order, and the same state after them once the producer closes."""
    if task == "files":  # JPEG / PNG folders decoded and cropped in 2 worker threads, from the producer's
        _folders(tmp_path)
        name, overrides = "digitscenes-unimatch", [*_folder_args(tmp_path), "data.workers=2", "train.threads=1"]
    else:
        name, overrides = CONFIGS[task]
    cfg = load_config(name, [*overrides, "train.prefetch=on", f"train.device={device}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    source = trainer.batches
    assert (source._stream is not None) == (device == "cuda")
    start = source.state()
    sequential = [trainer.task.next_batch(trainer.aug_rng) for _ in range(4)]
    after = source.state()
    source.load(start)
    prefetched = [source.next(more=True) for _ in range(4)]
    assert len(_producers()) == 1
    source.close()  # the fifth batch, built ahead, is dropped and its draws rewound
    assert not _producers()
    for a, b in zip(sequential, prefetched):
        ta, tb = list(tensors(a)), list(tensors(b))
        assert len(ta) == len(tb) > 3
        assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))
    assert_same_state(after, source.state())


def _without_prefetch_key(state: dict) -> dict:
    state["config"]["train"].pop("prefetch")
    return state


def _stop_at_step_3(trainer: Trainer, signum: int) -> None:
    """A signal at the step-3 evaluation, once last.pt is saved: batch 4 is then already built ahead."""

    def hook(step: int, val: dict[str, float]) -> None:
        if step == 3:
            assert trainer.batches.ahead  # so the checkpoint was written rewound
            os.kill(os.getpid(), signum)

    trainer.evaluation_hooks.append(hook)


@pytest.mark.parametrize(
    ("task", "signum"),
    [
        ("classification", signal.SIGTERM),
        ("classification", signal.SIGINT),
        pytest.param("segmentation", signal.SIGTERM, marks=pytest.mark.slow),
    ],
)
def test_a_run_stopped_with_a_batch_built_ahead_resumes_exactly(tmp_path: Path, task: str, signum: int) -> None:
    """Stopped by a signal at step 3 with batch 4 built ahead and resumed, with the producer, the run equals
    an uninterrupted one without it in everything saved; no producer thread is left after either fit."""
    _trainer(task, tmp_path / "a", "off").fit()
    stopped = _trainer(task, tmp_path / "b", "on")
    _stop_at_step_3(stopped, signum)
    stopped.fit()
    assert stopped.stop_signal == signum and stopped.step == 3 and not _producers()
    resumed = Trainer.resume(tmp_path / "b", progress=False)
    resumed.fit()
    assert not _producers()
    a, b = (_without_prefetch_key(load_checkpoint(tmp_path / r / "last.pt")) for r in "ab")
    assert_same_state(a, b)
    assert_same_state(*(json.loads((tmp_path / r / "metrics.json").read_text()) for r in "ab"))


def test_an_error_in_the_producer_surfaces_in_the_trainer_with_its_traceback(tmp_path: Path) -> None:
    trainer = _trainer("classification", tmp_path / "run", "on")
    build, calls = trainer.task.next_batch, []

    def broken_next_batch(generator: torch.Generator) -> object:
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("unreadable image")
        return build(generator)

    trainer.task.next_batch = broken_next_batch  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="unreadable image") as error:
        trainer.fit()
    assert calls[0] == threading.main_thread().name and calls[2].startswith(THREAD_NAME)  # raised in the thread
    assert "broken_next_batch" in [frame.name for frame in traceback.extract_tb(error.value.__traceback__)]
    assert trainer.step == 2 and not _producers()
    assert trainer.task.streams["lb_stream"].position == 2 * 8  # rewound to before the failed batch (TINY: 8)


def test_prefetch_is_checked_and_auto_is_on_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _trainer("classification", tmp_path / "auto", "auto").batches.prefetch
    mps, cfg = torch.device("mps"), load_config("digits-fixmatch", ["train.prefetch=on"])
    with pytest.raises(UserError, match="train.prefetch=on is not verified on MPS"):
        prefetch_enabled(cfg, mps)
    assert not prefetch_enabled(load_config("digits-fixmatch"), mps)  # auto
    assert main(["train", "digits-fixmatch", "train.prefetch=yes", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.prefetch" in err and "'auto'" in err


@pytest.mark.slow
def test_torchrun_resume_with_prefetch_is_bit_exact(tmp_path: Path) -> None:
    """2 gloo processes, each with its producer: they agree, and stop-then-resume equals the straight run."""
    check_torchrun_resume(tmp_path, "digits-softmatch", [*TINY, "train.prefetch=on"])
