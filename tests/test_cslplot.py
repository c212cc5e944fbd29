"""The CSL selection plot: snapshots at the right steps, capped and reproducible, kept through a checkpoint,
drawn as a PNG whose legend counts the wrong pseudo-labels right."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trustmatch.methods import csl_select, fixed_threshold
from trustmatch.methods.csl_recorder import SelectionRecorder, snapshot_steps
from trustmatch.methods.csl_selection import CSLSelection
from trustmatch.reporting.plots import (
    SelectionSnapshot,
    _clip_line,
    _split_lines,
    csl_selection_scatter,
    selection_counts,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _probs(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=generator)).softmax(dim=1)


def _assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_snapshot_steps() -> None:
    assert snapshot_steps(2000) == [200, 1000, 1999]
    assert snapshot_steps(1) == [0]
    assert snapshot_steps(2) == [0, 1]


def test_recorder_keeps_the_snapshot_steps_and_only_those() -> None:
    recorder = SelectionRecorder()
    for step in range(50):
        recorder.observe(step, 50, csl_select(_probs(2, 3, 8, 8, seed=step)))
    recorder.observe(24, 50, csl_select(_probs(2, 3, 8, 8, seed=99)))  # a step already kept stays as it was
    assert [s.step for s in recorder.snapshots] == snapshot_steps(50) == [5, 24, 49]
    assert recorder.snapshots[1].label == "step 25 of 50, image 0"
    first = csl_select(_probs(2, 3, 8, 8, seed=24))
    np.testing.assert_array_equal(recorder.snapshots[1].confidence, first.confidence[0].flatten().numpy())


def test_subsampling_caps_points_reproducibly() -> None:
    selection = csl_select(_probs(2, 4, 64, 64))  # 4096 pixels in image 0
    a, b, small = SelectionRecorder(), SelectionRecorder(), SelectionRecorder(max_points=100)
    for recorder in (a, b, small):
        recorder.observe(0, 1, selection)
    assert len(a.snapshots[0].confidence) == 3000 and len(small.snapshots[0].weight) == 100
    np.testing.assert_array_equal(a.snapshots[0].dispersion, b.snapshots[0].dispersion)
    assert set(a.snapshots[0].confidence.tolist()) <= set(selection.confidence[0].flatten().tolist())


def test_state_dict_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    recorder = SelectionRecorder()
    probs = _probs(3, 5, 16, 16)
    truth = probs.argmax(dim=1)
    truth[:, :4] = 255
    for step in snapshot_steps(10):
        recorder.observe(step, 10, csl_select(probs), truth)
    buffer = io.BytesIO()
    torch.save({"recorder": recorder.state_dict()}, buffer)
    buffer.seek(0)
    restored = SelectionRecorder()
    restored.load_state_dict(torch.load(buffer, weights_only=True)["recorder"])
    assert len(restored.snapshots) == len(recorder.snapshots) == 3
    for old, new in zip(recorder.snapshots, restored.snapshots):
        assert (old.step, old.label, old.reliable_cluster) == (new.step, new.label, new.reliable_cluster)
        for name in ("confidence", "dispersion", "weight", "reliable", "correct", "directions", "singular", "mean"):
            np.testing.assert_array_equal(getattr(old, name), getattr(new, name))
    assert restored.snapshots[0].reliable.dtype == bool and restored.snapshots[0].correct.dtype == np.int8
    assert restored.write(tmp_path / "csl.png", "restored") == tmp_path / "csl.png"


def test_segmentation_selection_is_drawn_and_counted(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    probs = _probs(4, 5, 16, 16, seed=1)
    valid = torch.rand(4, 16, 16, generator=generator) > 0.2
    truth = torch.randint(0, 5, (4, 16, 16), generator=generator)
    truth = torch.where(torch.rand(4, 16, 16, generator=generator) < 0.5, probs.argmax(dim=1), truth)
    truth[0, :2] = 255  # unknown truth: counted in neither right nor wrong
    selection = csl_select(probs, valid)
    recorder = SelectionRecorder()
    recorder.observe(0, 1, selection, truth, valid)
    (snapshot,) = recorder.snapshots
    v, labels, t, reliable = valid[0], selection.labels[0], truth[0], selection.reliable[0]
    assert len(snapshot.confidence) == int(v.sum())  # 256 pixels: no subsampling
    known = v & (t != 255)
    wrong = known & (labels != t)
    counts = selection_counts(snapshot)
    assert counts["reliable"] == {
        "points": int((v & reliable).sum()),
        "known": int((known & reliable).sum()),
        "wrong": int((wrong & reliable).sum()),
    }
    assert counts["down-weighted"] == {
        "points": int((v & ~reliable).sum()),
        "known": int((known & ~reliable).sum()),
        "wrong": int((wrong & ~reliable).sum()),
    }
    assert 0 < counts["reliable"]["wrong"] and 0 < counts["down-weighted"]["points"]
    np.testing.assert_allclose(snapshot.mean, selection.boundary.mean[0].numpy())
    path = recorder.write(tmp_path / "csl_selection.png", "CSL selection")
    assert path == tmp_path / "csl_selection.png"
    _assert_png(path)


def test_classification_selection_is_the_whole_batch(tmp_path: Path) -> None:
    probs = _probs(5000, 10)
    truth = probs.argmax(dim=1)
    truth[:100] = (truth[:100] + 1) % 10
    truth[100:200] = -1
    selection = csl_select(probs)
    recorder = SelectionRecorder()
    recorder.observe(0, 1, selection, truth)
    (snapshot,) = recorder.snapshots
    assert snapshot.label == "step 1 of 1, batch" and len(snapshot.confidence) == 3000
    assert set(np.unique(snapshot.correct).tolist()) == {-1, 0, 1}
    _assert_png(recorder.write(tmp_path / "csl.png", "classification"))


def test_other_selections_are_ignored(tmp_path: Path) -> None:
    recorder = SelectionRecorder()
    probs = _probs(2, 3, 8, 8)
    recorder.observe(0, 1, fixed_threshold(probs, 0.9))
    recorder.observe(0, 1, CSLSelection(probs.argmax(dim=1), torch.ones(2, 8, 8)))  # no confidence
    assert recorder.snapshots == [] and recorder.state_dict() == {"snapshots": []}
    assert recorder.write(tmp_path / "csl.png", "none") is None
    assert not (tmp_path / "csl.png").exists()


def test_an_image_without_valid_pixels_is_drawn_empty(tmp_path: Path) -> None:
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[0] = False
    recorder = SelectionRecorder()
    recorder.observe(0, 1, csl_select(_probs(2, 3, 8, 8), valid), valid=valid)
    assert len(recorder.snapshots[0].confidence) == 0 and recorder.snapshots[0].correct is None
    _assert_png(recorder.write(tmp_path / "csl.png", "empty"))


def _snapshot(n: int = 4, **changes) -> SelectionSnapshot:
    fields = dict(
        step=0,
        confidence=np.linspace(0.5, 1.0, n),
        dispersion=np.linspace(0.02, 0.0, n),
        weight=np.ones(n),
        reliable=np.ones(n, dtype=bool),
        correct=np.ones(n, dtype=bool),
        directions=np.eye(2),
        singular=np.array([2.0, 1.0]),
        mean=np.array([[0.9, 0.001], [0.6, 0.01]]),
        reliable_cluster=0,
        label="test",
    )
    return SelectionSnapshot(**{**fields, **changes})


def test_mismatched_lengths_and_shapes_raise(tmp_path: Path) -> None:
    for bad in (_snapshot(weight=np.ones(3)), _snapshot(correct=np.ones(5, dtype=bool)), _snapshot(mean=np.zeros(2))):
        with pytest.raises(ValueError):
            csl_selection_scatter([bad], tmp_path / "bad.png", "bad")
        with pytest.raises(ValueError):
            selection_counts(bad)
    with pytest.raises(ValueError):
        csl_selection_scatter([], tmp_path / "none.png", "none")
    assert list(tmp_path.iterdir()) == []


def test_bool_correct_counts_and_draws(tmp_path: Path) -> None:
    snapshot = _snapshot(reliable=np.array([True, True, False, False]), correct=np.array([True, False, False, False]))
    assert selection_counts(snapshot) == {
        "reliable": {"points": 2, "known": 2, "wrong": 1},
        "down-weighted": {"points": 2, "known": 2, "wrong": 2},
    }
    _assert_png(csl_selection_scatter([snapshot, _snapshot(correct=None)], tmp_path / "two.png", "two panels"))


def test_split_lines_are_where_the_clusters_meet() -> None:
    angle = 0.3
    u = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    s = np.array([3.0, 0.5])
    lines = _split_lines(_snapshot(directions=u, singular=s))
    assert len(lines) == 2
    for direction in lines:
        ends = _clip_line(direction, (-1.0, 1.0), (-1.0, 1.0))
        assert ends is not None and np.abs(ends).max() == pytest.approx(1.0)
        for x in ends:
            assert abs(x @ u[0]) / s[0] == pytest.approx(abs(x @ u[1]) / s[1])
    assert _clip_line(np.array([1.0, 1.0]), (0.5, 1.0), (-1.0, -0.5)) is None  # the line misses the box
    assert _split_lines(_snapshot(singular=np.array([2.0, 0.0]))) == []  # points on one line: no split
