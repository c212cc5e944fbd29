"""Checkpoints: atomic writes keep the old file on failure; loads refuse pickled code."""

import collections
from pathlib import Path

import pytest
import torch

from trustmatch.core.errors import UserError
from trustmatch.run.checkpoint import load_checkpoint, save_checkpoint


def test_roundtrip(tmp_path: Path) -> None:
    state = {"step": 3, "w": torch.arange(4.0), "rng": torch.get_rng_state(), "history": [{"a": 0.5}]}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"]) and loaded["history"] == [{"a": 0.5}]


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_checkpoint_carrying_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": collections.Counter(a=1), "call": print}, path)  # arbitrary globals
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)


def test_truncated_and_missing_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_weights_that_do_not_fit_the_model_are_one_line(tmp_path: Path) -> None:
    from trustmatch.run.checkpoint import load_weights

    with pytest.raises(UserError, match="does not fit the model"):
        load_weights(torch.nn.Linear(3, 2), {"weight": torch.zeros(5, 5)}, tmp_path / "best.pt")


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    import os

    from trustmatch.core.fileio import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")  # not mkstemp's 0600
    assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == os.stat(plain).st_mode & 0o777
