"""``predict --precision`` / ``evaluate --precision`` through the real CLI on tiny runs: the accepted column,
abstained masks (255), certified.json, and the exported labeled folder read back by the project's own loaders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_bad_inputs import BLUE, RED, save, seg_folders, train_seg
from trustmatch.cli import main
from trustmatch.config.schema import DataConfig
from trustmatch.core.labels import IGNORE
from trustmatch.data.folders import load_folder
from trustmatch.data.segfiles import load_segmentation_folder
from trustmatch.inference.predict_classes import write_predictions
from trustmatch.inference.predict_masks import write_masks
from trustmatch.run.loaded_run import checkpoint_path, load_run_model

# two validation images certify little: a low target at a lenient delta is what they can hold
LENIENT = ["--precision", "0.1", "--delta", "0.5"]
SEG_LENIENT = ["--precision", "0.05", "--delta", "0.9"]  # random masks: the tiny network's pixels are 2/3 wrong


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segmentation run with 16 validation images: the betting bound needs more than a handful."""
    root = tmp_path_factory.mktemp("segmenter")
    seg = seg_folders(root / "seg")
    rng = np.random.default_rng(1)
    for i in range(2, 16):
        save(seg / "val" / "images" / f"s{i}.png", RED if i % 2 else BLUE, size=(24, 20))
        Image.fromarray(rng.integers(0, 3, (20, 24)).astype(np.uint8)).save(seg / "val" / "masks" / f"s{i}.png")
    assert main(train_seg(seg, root / "run")) == 0
    return root / "run"


def _photos(folder: Path, size: tuple[int, int] = (12, 10)) -> Path:
    for i in range(3):
        save(folder / f"r{i}.png", RED, size)
        save(folder / f"b{i}.png", BLUE, size)
    return folder


def test_classification_certified_export_round_trip(tmp_path: Path, classifier: Path) -> None:
    photos, out, export = _photos(tmp_path / "photos"), tmp_path / "p.csv", tmp_path / "next"
    assert (
        main(["predict", str(classifier), str(photos), "--out", str(out), *LENIENT, "--export-labeled", str(export)])
        == 0
    )
    record = json.loads((tmp_path / "p.certified.json").read_text())
    rows = list(csv.DictReader(out.open()))
    accepted = [r for r in rows if r["accepted"] == "1"]
    assert all((float(r["raw_confidence"]) > record["threshold"]) == (r["accepted"] == "1") for r in rows)
    assert record["accepted"] == len(accepted) and record["predicted"] == 6 and record["bound"] == "binomial"
    assert record["certified_precision"] >= 0.1 and 0 < record["validation_coverage"] <= 1

    loaded = load_folder(DataConfig(name="folder", root=str(export), image_size=16))  # the project's own loader
    names = {Path(p).name: loaded.classes[label] for p, label in zip(loaded.train.paths, loaded.train.labels.tolist())}
    assert names == {Path(r["path"]).name: r["class"] for r in accepted}

    assert main(["evaluate", str(classifier), "--split", "val", *LENIENT]) == 0
    result = json.loads((classifier / "evaluation-last-val.json").read_text())["certified"]
    assert result["threshold"] == record["threshold"] and result["val"]["units"] == 2
    assert result["val"]["certified"]["coverage"] == pytest.approx(result["validation_coverage"])


def test_certificate_names_its_checkpoint_and_what_makes_it_approximate(tmp_path: Path, classifier: Path) -> None:
    """With --precision, auto is last.pt (validation chose best.pt); best.pt and a temperature fitted on the
    certifying split are allowed but said to make the guarantee approximate."""
    photos = _photos(tmp_path / "photos")

    def record(name: str, *options: str) -> dict[str, str]:
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(classifier), str(photos), "--out", str(out), *LENIENT, *options]) == 0
        return json.loads((tmp_path / f"{name}.certified.json").read_text())

    exact = record("raw", "--raw")
    assert exact["checkpoint"] == str(classifier / "last.pt") and exact["guarantee"] == "as stated under the assumption"
    assert "class mix" in exact["assumption"] and "expected (population) precision" in exact["assumption"]
    scaled = record("scaled")  # the threshold is on the raw score: the temperature reorders nothing it certifies
    assert scaled["checkpoint"] == str(classifier / "last.pt") and scaled["guarantee"] == exact["guarantee"]
    assert scaled["threshold"] == exact["threshold"] and scaled["confidence"].startswith("raw (predictions at")
    best = record("best", "--raw", "--checkpoint", "best")
    assert best["checkpoint"] == str(classifier / "best.pt") and best["guarantee"].startswith("approximate: best.pt")


def test_classification_abstains_below_the_threshold(tmp_path: Path, classifier: Path) -> None:
    run = load_run_model(checkpoint_path(classifier))
    photos, out = _photos(tmp_path / "photos"), tmp_path / "p.csv"
    write_predictions(run.model, run.meta, [photos], out, run.precision)  # no temperature: raw confidences
    confidences = sorted(float(r["confidence"]) for r in csv.DictReader(out.open()))
    middle = (confidences[2] + confidences[3]) / 2
    n, kept = write_predictions(run.model, run.meta, [photos], out, run.precision, temperature=2.0, threshold=middle)
    rows = list(csv.DictReader(out.open()))
    flags = {float(r["raw_confidence"]) > middle: r["accepted"] for r in rows}  # the threshold is on the raw score
    assert all(float(r["raw_confidence"]) > float(r["confidence"]) for r in rows)  # T = 2 softens what is written
    assert (n, kept) == (6, 3) and flags == {True: "1", False: "0"}


@pytest.mark.slow
def test_segmentation_certified_export_round_trip(tmp_path: Path, segmenter: Path) -> None:
    photos, out, export = _photos(tmp_path / "photos", (24, 20)), tmp_path / "masks", tmp_path / "next"
    assert (
        main(["predict", str(segmenter), str(photos), "--out", str(out), *SEG_LENIENT, "--export-labeled", str(export)])
        == 0
    )
    record = json.loads((out / "certified.json").read_text())
    assert record["bound"] == "betting" and record["predicted"] == 6 and record["unit"].startswith("image")
    kept = sorted(p.name for p in (export / "masks").iterdir())
    assert len(kept) == record["accepted"] > 0

    cfg = DataConfig(name="folder", root=str(export))
    labeled = load_segmentation_folder(cfg, 0).labeled  # the project's own loader, every mask checked
    for i in range(len(labeled)):
        _, mask = labeled.load(i)
        written = np.array(Image.open(out / f"{labeled.name(i)}.png"))
        assert mask is not None and np.array_equal(mask.numpy(), written)


@pytest.mark.slow
def test_segmentation_certifies_the_raw_image_score(tmp_path: Path, segmenter: Path) -> None:
    """An image's score is its mean raw pixel confidence, which no temperature fitted on validation changes:
    the units certified and the images predict accepts are the same at any T (one T changes no mask)."""
    run = load_run_model(checkpoint_path(segmenter, "last"))
    task = run.task(run.cfg, run.precision)
    raw, raw_losses = task.selective_units(run.model, "val")
    scaled, scaled_losses = task.selective_units(run.model, "val", 3.0)
    assert torch.equal(raw, scaled) and torch.equal(raw_losses, scaled_losses)
    photos = _photos(tmp_path / "photos", (24, 20))
    for i, threshold in enumerate([0.0, float(raw.median()), float(raw.max())]):
        unscaled = write_masks(run.model, run.meta, [photos], tmp_path / f"r{i}", run.precision, threshold=threshold)
        at_t = write_masks(run.model, run.meta, [photos], tmp_path / f"t{i}", run.precision, 3.0, threshold=threshold)
        assert unscaled == at_t


@pytest.mark.slow
def test_segmentation_abstained_images_are_ignore(tmp_path: Path, segmenter: Path) -> None:
    run = load_run_model(checkpoint_path(segmenter))
    photos = _photos(tmp_path / "photos", (24, 20))
    n, kept = write_masks(run.model, run.meta, [photos], tmp_path / "all", run.precision, threshold=1.0)
    assert (n, kept) == (6, 0)
    assert all((np.array(Image.open(p)) == IGNORE).all() for p in (tmp_path / "all").iterdir())
    assert write_masks(run.model, run.meta, [photos], tmp_path / "none", run.precision, threshold=0.0) == (6, 6)
