"""``trustmatch report RUN... --html``: one self-contained page.

Quick tests read the page of hand-written run directories (metrics.json of real random logits, a training
log, the PNGs a run writes) with ``html.parser``: every section is there, every image is a data URI that
decodes as a PNG, nothing points outside the file, the numbers are metrics.json's. Slow ones train tiny real
runs (the checkpoint pass: per-class values, thumbnails, overlays) and render the page in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from dataclasses import astuple
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.evaluation.metrics import ClassificationMeter, SegmentationMeter
from trustmatch.reporting.task_display import DISPLAYS
from trustmatch.run.checkpoint_findings import FILE as FINDINGS
from trustmatch.run.checkpoint_findings import checkpoint_findings, saved_findings
from trustmatch.run.trainer import Trainer
from trustmatch.tasks import TASKS

SECTIONS = [
    "runs",
    "metrics",
    "reliability",
    "risk-coverage",
    "pseudo-labels",
    "per-class",
    "data-map",
    "overlays",
    "csl-selection",
]
DATA_URI = "data:image/png;base64,"
MAX_BYTES = 5_000_000


class Page(HTMLParser):
    """The page's sections (id -> text and images) and every attribute that could load something."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, list]] = {}
        self.tags: list[str] = []
        self.links: list[str] = []  # every src and href
        self.cells: list[str] = []
        self._section: str | None = None
        self._cell = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag == "section":
            self._section = found["id"]
            self.sections[self._section] = {"text": [], "images": []}
        elif tag == "img" and self._section:
            self.sections[self._section]["images"].append(found["src"])
        self._cell = tag in ("td", "th")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None
        self._cell = False

    def handle_data(self, data: str) -> None:
        if self._section:
            self.sections[self._section]["text"].append(data)
        if self._cell:
            self.cells.append(data)

    def text(self, section: str) -> str:
        return " ".join(self.sections[section]["text"])


def _png(rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _risk_coverage(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """The curve by hand: the error rate of the k most confident, k = 1..n."""
    confidence, prediction = logits.softmax(dim=1).max(dim=1)
    wrong = (prediction != labels)[confidence.argsort(descending=True)].double()
    k = torch.arange(1, len(labels) + 1)
    return {"coverage": (k / len(labels)).tolist(), "risk": (wrong.cumsum(0) / k).tolist()}


def _classification_run(root: Path, name: str, selective: bool, temperature: float | None = 2.0) -> Path:
    """A finished classification run as `trustmatch train` leaves it, without checkpoints; ``selective``: with
    the risk-coverage keys of runs trained since trustmatch measures selective risk."""
    gen = torch.Generator().manual_seed(len(name))
    logits, labels = 4.0 * torch.randn(300, 10, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    logits[:150].scatter_(1, labels[:150, None], 6.0)

    def scored(z: torch.Tensor) -> tuple[dict, dict]:
        meter = ClassificationMeter(10)
        meter.update(z, labels)
        metrics = meter.compute()
        if selective:
            metrics.update(aurc=0.2345, eaurc=0.1234, accuracy_at_coverage_50=0.9, accuracy_at_coverage_80=0.7)
            metrics["accuracy_at_coverage_90"] = 0.6
        return metrics, {"15": meter.bins(15), "10": meter.bins(10)}

    final, bins = scored(logits)
    calibrated, calibrated_bins = scored(logits / temperature) if temperature else (None, None)
    history = [{"step": s, "val": {"accuracy": 0.1 * s, "ece_15": 0.05}, "test": final} for s in (2, 4)]
    metrics = {
        "task": "classification", "method": "fixmatch", "dataset": "digits", "seed": 0, "steps": 4,
        "wall_time_s": 3.0, "final": final, "final_bins": bins, "temperature": temperature,
        "final_calibrated": calibrated, "final_calibrated_bins": calibrated_bins, "best": None,
        "best_note": "no validation split", "history": history, "split": {"labeled": 40, "test": 300},
    }  # fmt: skip
    if selective:
        metrics["final_risk_coverage"] = _risk_coverage(logits, labels)
        metrics["final_calibrated_risk_coverage"] = _risk_coverage(logits / temperature, labels)
    path = root / name
    path.mkdir()
    (path / "config.yaml").write_text("task: classification\n")
    (path / "metrics.json").write_text(json.dumps(metrics))
    log = [
        {"step": s, "loss_sup": 1 / s, "loss_unsup": 0.5 / s, "mask": s / 10, "pl_acc": 0.5 + s / 20} for s in (2, 4)
    ]
    text = "".join(json.dumps(entry) + "\n" for entry in log)
    (path / "train_log.jsonl").write_text(text + '{"step": 6, "loss_s')  # a line cut short by a kill
    return path


def _segmentation_run(root: Path) -> Path:
    """A CSL segmentation run's metrics.json (pixel metrics of random logits), log and csl_selection.png."""
    gen = torch.Generator().manual_seed(5)
    logits, masks = 3.0 * torch.randn(2, 3, 8, 8, generator=gen), torch.randint(0, 3, (2, 8, 8), generator=gen)
    meter = SegmentationMeter(3)
    meter.update(logits, masks)
    final = {**meter.compute(), "per_class_iou": dict(zip(["background", "a", "b"], meter.per_class_iou()))}
    metrics = {
        "task": "segmentation", "method": "csl", "dataset": "digitscenes", "seed": 1, "steps": 4,
        "final": final, "final_bins": {"15": meter.bins()}, "temperature": None, "final_calibrated": None,
        "temperature_note": "no validation split", "best": None, "history": [],
    }  # fmt: skip
    path = root / "seg"
    path.mkdir()
    (path / "config.yaml").write_text("task: segmentation\n")
    (path / "metrics.json").write_text(json.dumps(metrics))
    log = [
        {"step": s, "mask": 0.5, "pl_acc_bg": 0.9, "pl_acc_fg": 0.2 * s, "weight_fg": 0.1, "loss_tmp": 0.3}
        for s in (2, 4)
    ]
    (path / "train_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in log))
    (path / "csl_selection.png").write_bytes(_png((30, 30, 200)))
    return path


def _decoded(src: str) -> Image.Image:
    assert src.startswith(DATA_URI), src[:40]
    data = base64.b64decode(src.removeprefix(DATA_URI), validate=True)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def _percent(x: float) -> str:
    return f"{100 * x:.2f} %"


def test_page_of_hand_written_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A classification run with risk-coverage keys beside a segmentation run from before them, without a
    temperature: each section shows what each has, or says why not."""
    new = _classification_run(tmp_path, "new", selective=True)
    seg = _segmentation_run(tmp_path)
    out = tmp_path / "out"
    assert main(["report", str(new), str(seg), "--html", "--out", str(out)]) == 0
    page_path = out / "report.html"
    assert f"wrote {page_path}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # no temp file left
    html = page_path.read_text()
    assert len(html.encode()) < MAX_BYTES
    page = Page(html)

    assert list(page.sections) == SECTIONS
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "http://" not in html and "https://" not in html
    for link in page.links:  # only anchors within the page and embedded images
        assert link.startswith("#") or link.startswith(DATA_URI), link[:60]
    images = [src for section in page.sections.values() for src in section["images"]]
    assert images and all(_decoded(src).width > 30 for src in images)

    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in (new, seg)}
    new_final, new_scaled = metrics["new"]["final"], metrics["new"]["final_calibrated"]
    for value in (new_final["accuracy"], new_final["ece_15"], new_scaled["ece_15"], metrics["seg"]["final"]["miou"]):
        assert _percent(value) in page.cells  # the metrics table holds metrics.json's numbers
    assert f"{metrics['seg']['final']['pixel_nll']:.4f}" in page.cells
    assert "0.2345" in page.cells and "AURC" in page.cells  # 4 decimals, as the markdown report

    assert "not recorded by this run" in page.text("risk-coverage")  # the segmentation run's
    assert len(page.sections["risk-coverage"]["images"]) == 1  # the new run's curves
    assert len(page.sections["reliability"]["images"]) == 2
    assert "no temperature-scaled diagram: no validation split" in page.text("reliability")
    assert page.text("per-class").count("no last.pt") == 2
    assert "a classification run" in page.text("overlays")
    assert page.text("data-map").count("only CalibrateMix runs") == 2
    csl = page.sections["csl-selection"]["images"]
    assert len(csl) == 1 and _decoded(csl[0]).getpixel((0, 0)) == (30, 30, 200)  # the run's own PNG
    assert "pseudo-label accuracy not logged" not in page.text("pseudo-labels")  # pl_acc(_fg) in both logs
    assert len(page.sections["pseudo-labels"]["images"]) == 2 + 1  # the logs of both, one history
    assert "no evaluation history" in page.text("pseudo-labels")


def test_labels_and_one_line_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trustmatch.run.report_sections.png_bytes", lambda fig: _png())  # figures: tested above
    run = _classification_run(tmp_path, "dirname", selective=False)
    out = tmp_path / "out"
    assert main(["report", str(run), "--html", "--out", str(out), "--labels", "<b>ours</b>"]) == 0
    page = Page((out / "report.html").read_text())
    assert "<b>ours</b>" in page.cells and "b" not in page.tags  # the label, escaped: text, not markup
    assert "dirname" not in page.cells
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    metrics = json.loads((unfinished / "metrics.json").read_text())
    (unfinished / "metrics.json").write_text(json.dumps({**metrics, "final": None}))
    unknown = tmp_path / "unknown"
    shutil.copytree(run, unknown)
    (unknown / "metrics.json").write_text(json.dumps({**metrics, "task": "detection"}))
    cases = [
        ([str(run), str(unfinished)], "unfinished"),
        ([str(unknown)], "a run of task 'detection', which this trustmatch does not know"),
        ([str(run), str(tmp_path / "missing")], "not a trustmatch run directory"),
        ([str(run), "--labels", "a", "b"], "--labels gave 2 names for 1 run directories"),
    ]
    for args, expected in cases:
        fresh = tmp_path / "fresh"
        assert main(["report", *args, "--html", "--out", str(fresh)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not fresh.exists()
    (tmp_path / "file").write_text("x")
    assert main(["report", str(run), "--html", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


TINY = ["train.steps=6", "train.eval_every=3", "train.log_every=2", "train.batch_size=8", "train.uratio=2"]
SMALL_SCENES = ["data.scenes=40", "data.labeled_images=8", "data.val_images=6", "train.batch_size=4"]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny CalibrateMix digits run (its data map) and a tiny CSL digitscenes run (overlays, selection)."""
    root = tmp_path_factory.mktemp("runs")
    digits = load_config("digits-calibratemix", [*TINY, "calibratemix.warmup=0.3"])
    Trainer(digits, root / "digits", progress=False).fit()
    scenes = load_config("digitscenes-csl", [*TINY, *SMALL_SCENES, "train.eval_batch_size=64"])
    Trainer(scenes, root / "scenes", progress=False).fit()
    return root / "digits", root / "scenes"


@pytest.fixture(scope="module")
def real_page(real_runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", *map(str, real_runs), "--html", "--out", str(out)]) == 0
    return out / "report.html"


@pytest.mark.slow
def test_page_of_real_runs(real_runs: tuple[Path, Path], real_page: Path) -> None:
    """The findings the runs wrote: per-class values agree with metrics.json; thumbnails, overlays, CSL scatter."""
    html = real_page.read_text()
    assert len(html.encode()) < MAX_BYTES
    page = Page(html)
    digits, scenes = (json.loads((run / "metrics.json").read_text()) for run in real_runs)
    # per class: the scenes' IoU are metrics.json's; the digits' recalls weighted by support give the accuracy
    for name, iou in scenes["final"]["per_class_iou"].items():
        assert iou is None or _percent(iou) in page.cells, name
    start = page.cells.index("class")
    rows = [page.cells[i : i + 7] for i in range(start + 7, start + 7 * 11, 7)]  # the digits run's table
    support = np.array([int(r[1].replace(",", "")) for r in rows])
    recall = np.array([float(r[2].removesuffix(" %")) / 100 for r in rows])
    assert support.sum() == digits["final"]["n"]
    assert (support * recall).sum() / support.sum() == pytest.approx(digits["final"]["accuracy"], abs=1e-3)
    assert len(page.sections["per-class"]["images"]) == 2
    assert len(page.sections["data-map"]["images"]) == 3  # the scatter, hardest labeled, hardest unlabeled
    assert len(page.sections["overlays"]["images"]) == 1
    assert len(page.sections["csl-selection"]["images"]) == 1
    assert all(_decoded(src) for section in page.sections.values() for src in section["images"])


@pytest.mark.slow
@pytest.mark.all_test_scenes  # as the module's runs were trained: their fixture starts before the 60-scene patch
def test_findings_the_run_wrote_equal_a_pass_of_last_pt(real_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """``findings.pt`` (written at the end of training, from the task and model in memory) holds what a
    fresh pass of ``last.pt`` finds; a file of another step or a cut one is not used."""
    for run in real_runs:
        step = json.loads((run / "metrics.json").read_text())["steps"]
        saved, fresh = saved_findings(run, step), checkpoint_findings(run)
        assert saved is not None and saved.checkpoint == fresh.checkpoint == f"last.pt (step {step})"
        assert (saved.split, saved.classes, saved.temperature) == (fresh.split, fresh.classes, fresh.temperature)
        assert saved.per_class == fresh.per_class and saved.per_class_scaled == fresh.per_class_scaled
        assert saved.thumbnails.keys() == fresh.thumbnails.keys()
        for split, thumbs in fresh.thumbnails.items():
            assert torch.equal(saved.thumbnails[split].images, thumbs.images)
            assert saved.thumbnails[split].captions == thumbs.captions
        assert (saved.overlays is None) == (fresh.overlays is None)
        if fresh.overlays is not None:
            for name in ("images", "predictions", "masks"):
                assert all(map(torch.equal, getattr(saved.overlays, name), getattr(fresh.overlays, name))), name
            for kept, computed in zip(saved.overlays.confidences, fresh.overlays.confidences, strict=True):
                torch.testing.assert_close(kept, computed, rtol=0, atol=1e-3)  # stored as float16
            assert saved.overlays.names == fresh.overlays.names and saved.overlays.palette == fresh.overlays.palette
        assert saved_findings(run, step - 1) is None  # a resumed run went on after they were written
        copy = tmp_path / run.name
        copy.mkdir()
        (copy / FINDINGS).write_bytes((run / FINDINGS).read_bytes()[:100])
        assert saved_findings(copy, step) is None
        state = torch.load(run / FINDINGS, weights_only=True)
        torch.save({**state, "format": state["format"] + 1}, copy / FINDINGS)  # another trustmatch's layout
        assert saved_findings(copy, step) is None


def test_a_failed_findings_pass_costs_the_report_its_speed_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass comes after metrics.json: when it fails the run is still finished, and the page passes last.pt."""

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("trustmatch.run.trainer.collect_findings", fail)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"findings.pt not written \(OSError: disk full\)"):
        Trainer(load_config("digits-fixmatch", TINY), run, progress=False).fit()
    assert json.loads((run / "metrics.json").read_text())["final"] is not None and not (run / FINDINGS).exists()
    passes = []
    monkeypatch.setattr("trustmatch.run.report_material.checkpoint_findings", lambda path: passes.append(path))
    assert main(["report", str(run), "--html", "--out", str(tmp_path / "out")]) == 0
    assert passes == [run]


def test_every_task_has_its_display() -> None:
    """The page draws a task from ``reporting.task_display``; the task classes take their attributes from it."""
    assert set(DISPLAYS) == set(TASKS.names())
    for name, display in DISPLAYS.items():
        task = TASKS.get(name)
        assert (task.calibration_metric, task.curves, task.diagram_unit) == astuple(display)


def test_the_page_imports_neither_the_tasks_nor_torchvision() -> None:
    """Half of a cold report's time was imports (torchvision, the dataset loaders): a run's page reads files."""
    code = (
        "import sys, trustmatch.run.html_report; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'sklearn', 'timm'}), "
        "sorted(m for m in sys.modules if m.startswith(('trustmatch.tasks', 'trustmatch.data'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["[]", "[]"], result.stdout


def _chromium() -> str | None:
    return next(
        (path for name in ("chromium", "chromium-browser", "google-chrome", "chrome") if (path := shutil.which(name))),
        None,
    )


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium or Chrome binary on PATH")
def test_page_renders_in_headless_chromium(real_page: Path, tmp_path: Path) -> None:
    """A real browser shows the page offline: the screenshot is not blank (it has text, tables and figures)."""
    shot = tmp_path / "shot.png"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2400",
        f"--screenshot={shot}", real_page.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20  # a blank (or all-grey error) page has none
    assert (pixels < 128).mean() > 0.02  # dark text, bars and images cover a real part of it
