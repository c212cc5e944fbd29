"""``trustmatch report`` compares finished runs from their metrics.json, and refuses anything else in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_report import _assert_png
from trustmatch.cli import main
from trustmatch.evaluation.metrics import ClassificationMeter

NOTE = "no validation split (data.val_per_class=0): temperature scaling cannot be fitted (never on test)"


def _evaluate(logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict]:
    meter = ClassificationMeter(10, "cpu")
    meter.update(logits, labels)
    return meter.compute(), {"15": meter.bins(15), "10": meter.bins(10)}


def _run_dir(root: Path, name: str, temperature: float | None, **changes: object) -> Path:
    """A run directory as ``trustmatch train`` leaves it, with metrics of real random logits."""
    logits, labels = 4.0 * torch.randn(400, 10), torch.randint(0, 10, (400,))
    logits[:200].scatter_(1, labels[:200, None], 6.0)  # half right, all overconfident
    final, bins = _evaluate(logits, labels)
    calibrated, calibrated_bins = _evaluate(logits / temperature, labels) if temperature else (None, None)
    metrics = {
        "task": "classification",
        "method": "fixmatch",
        "dataset": "cifar10",
        "seed": 0,
        "steps": 100,
        "wall_time_s": 12.5,
        "final": final,
        "final_bins": bins,
        "temperature": temperature,
        "final_calibrated": calibrated,
        "final_calibrated_bins": calibrated_bins,
        **({} if temperature else {"temperature_note": NOTE}),
        **changes,
    }
    path = root / name
    path.mkdir()
    (path / "config.yaml").write_text("task: classification\n")
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def test_report_compares_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scaled = _run_dir(tmp_path, "fixmatch-seed0", temperature=2.5)
    raw = _run_dir(tmp_path, "calibratemix-seed1", temperature=None)
    out = tmp_path / "out"
    assert main(["report", str(scaled), str(raw), "--out", str(out)]) == 0

    markdown = (out / "report.md").read_text()
    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in (scaled, raw)}
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    for name, m in metrics.items():
        cells = rows[name].split(" | ")
        assert cells[4] == _percent(m["final"]["ece_15"]) and cells[5] == _percent(m["final"]["ece_10"])
    ts_rows = [label for label in rows if "+ TS" in label]
    assert ts_rows == ["fixmatch-seed0 + TS (T=2.50)"]
    calibrated_ece = _percent(metrics["fixmatch-seed0"]["final_calibrated"]["ece_15"])
    assert rows[ts_rows[0]].split(" | ")[4] == calibrated_ece
    assert calibrated_ece != _percent(metrics["fixmatch-seed0"]["final"]["ece_15"])  # a different row, not a copy
    notes = [line for line in markdown.splitlines() if line.startswith("Note:")]
    assert notes == [f"Note: calibratemix-seed1 has no temperature-scaled row: {NOTE}"]

    _assert_png(out / "report.png")
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "report.png"]  # no temp file left
    printed = capsys.readouterr().out
    assert markdown in printed and str(out / "report.md") in printed and str(out / "report.png") in printed


def test_labels_replace_directory_names(tmp_path: Path) -> None:
    runs = [str(_run_dir(tmp_path, n, temperature=1.5)) for n in ("a", "b")]
    out = tmp_path / "nested" / "out"
    assert main(["report", *runs, "--out", str(out), "--labels", "baseline", "ours|v2"]) == 0
    markdown = (out / "report.md").read_text()
    assert "| baseline | fixmatch |" in markdown and "| ours\\|v2 + TS (T=1.50) |" in markdown
    assert "| a |" not in markdown and "Note:" not in markdown


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


def test_folder_without_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, empty = _run_dir(tmp_path, "good", temperature=None), tmp_path / "not-a-run"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["report", str(good), str(empty), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert str(empty) in err and "metrics.json" in err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"final": None}, "unfinished"),
        ({"final_bins": None}, "older trustmatch"),
        ({"task": "segmentation"}, "segmentation run"),
    ],
)
def test_runs_the_report_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, expected: str
) -> None:
    run = _run_dir(tmp_path, "run", temperature=None, **changes)
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = _one_error_line(capsys)
    assert expected in err and str(run) in err


def test_labels_count_must_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(_run_dir(tmp_path, n, temperature=None)) for n in ("a", "b")]
    assert main(["report", *runs, "--out", str(tmp_path / "out"), "--labels", "only-one"]) == 2
    assert "--labels gave 1 names for 2 run directories" in _one_error_line(capsys)


def test_out_must_not_be_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    out.write_text("x")
    assert main(["report", str(_run_dir(tmp_path, "a", temperature=None)), "--out", str(out)]) == 2
    assert "is a file" in _one_error_line(capsys)
