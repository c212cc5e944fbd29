"""Plots are written as real PNGs, atomically, and cope with empty bins and sparse history."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

from trustmatch.evaluation.metrics import reliability_bins
from trustmatch.reporting.plots import DataMapPanel, data_map, reliability_diagram, training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # axes, bars and text, not a blank canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300


def _only_file(directory: Path) -> Path:
    """The directory holds exactly one entry: no temp file was left behind."""
    entries = list(directory.iterdir())
    assert len(entries) == 1, entries
    return entries[0]


def _empty_bins(n_bins: int) -> dict:
    return {
        "lower": [b / n_bins for b in range(n_bins)],
        "upper": [(b + 1) / n_bins for b in range(n_bins)],
        "count": [0] * n_bins,
        "confidence": [0.0] * n_bins,
        "accuracy": [0.0] * n_bins,
    }


def _history() -> list[dict]:
    def split(step: int) -> dict:
        return {"accuracy": 0.1 + step / 1000, "ece_15": 0.2 - step / 5000, "nll": 2.0 - step / 500}

    return [{"step": s, "val": split(s), "test": split(s + 50)} for s in range(0, 600, 100)]


def test_reliability_diagram_from_real_bins(tmp_path: Path) -> None:
    logits, labels = 3.0 * torch.randn(500, 10), torch.randint(0, 10, (500,))
    out = reliability_diagram(reliability_bins(logits, labels), tmp_path / "rel.png", "test set", ece=0.1234)
    assert out == tmp_path / "rel.png"
    assert _only_file(tmp_path) == out
    _assert_png(out)


@pytest.mark.parametrize("n_filled", [0, 1])
def test_reliability_diagram_with_empty_bins(tmp_path: Path, n_filled: int) -> None:
    bins = _empty_bins(15)
    if n_filled:
        bins["count"][14], bins["confidence"][14], bins["accuracy"][14] = 7, 0.98, 0.5
    out = reliability_diagram(bins, tmp_path / "rel.png", "sparse")
    _assert_png(out)
    assert _only_file(tmp_path) == out


def test_reliability_diagram_overwrites_and_creates_parent(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "rel.png"
    path.parent.mkdir()
    path.write_bytes(b"stale")
    reliability_diagram(_empty_bins(10), path, "again", ece=0.0)
    _assert_png(path)
    nested = reliability_diagram(_empty_bins(10), tmp_path / "new" / "dir" / "rel.png", "nested")
    _assert_png(nested)


def test_training_curves(tmp_path: Path) -> None:
    out = training_curves(_history(), tmp_path / "curves.png")
    assert _only_file(tmp_path) == out
    _assert_png(out)


def test_training_curves_single_entry_and_missing_split(tmp_path: Path) -> None:
    entry = _history()[0]
    del entry["test"]
    _assert_png(training_curves([entry], tmp_path / "curves.png"))


def test_training_curves_rejects_empty_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="history"):
        training_curves([], tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []


def _panel(n: int, flagged: bool | None) -> DataMapPanel:
    x, y = (torch.randn(n) * 2).tolist(), torch.rand(n).tolist()
    flags = None if flagged is None else (torch.rand(n) < 0.1).tolist()
    return DataMapPanel(f"{n} samples", x, y, "AUM", "confidence", flags, "prediction disagrees with the label")


def test_data_map_flagged_unflagged_and_empty_panels(tmp_path: Path) -> None:
    panels = [_panel(5_000, flagged=True), _panel(300, flagged=None), _panel(0, flagged=True)]
    out = data_map(panels, tmp_path / "datamap.png")
    assert _only_file(tmp_path) == out
    _assert_png(out)


def test_data_map_single_empty_panel(tmp_path: Path) -> None:
    _assert_png(data_map([_panel(0, flagged=None)], tmp_path / "datamap.png"))


def test_data_map_rejects_mismatched_lengths_and_no_panels(tmp_path: Path) -> None:
    panel = _panel(10, flagged=True)
    with pytest.raises(ValueError, match="differ in length"):
        data_map([DataMapPanel("bad", panel.x, panel.y[:-1], "x", "y")], tmp_path / "a.png")
    with pytest.raises(ValueError, match="differ in length"):
        data_map([DataMapPanel("bad", panel.x, panel.y, "x", "y", panel.flagged[:-1])], tmp_path / "b.png")
    with pytest.raises(ValueError, match="at least one panel"):
        data_map([], tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_render_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenCanvas:
        def __init__(self, figure: object) -> None:
            pass

        def print_png(self, handle) -> None:
            handle.write(PNG_SIGNATURE)  # a partial file, then the renderer dies
            raise RuntimeError("renderer died")

    path = tmp_path / "rel.png"
    path.write_bytes(b"previous")
    monkeypatch.setattr("trustmatch.reporting.plots.FigureCanvasAgg", BrokenCanvas)
    with pytest.raises(RuntimeError, match="renderer died"):
        reliability_diagram(_empty_bins(5), path, "broken")
    assert _only_file(tmp_path) == path
    assert path.read_bytes() == b"previous"  # the old plot survives intact


def test_plotting_leaves_global_matplotlib_state_alone(tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    reliability_diagram(_empty_bins(5), tmp_path / "rel.png", "state")
    training_curves(_history(), tmp_path / "curves.png")
    data_map([_panel(10, flagged=True)], tmp_path / "datamap.png")
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
