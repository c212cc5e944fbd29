"""Validation that is also the report split (``train.evaluate_test=false``, every tune trial) is predicted
once per evaluation, in both tasks, and reports exactly what a separate ``evaluate("val", T)`` pass does."""

from pathlib import Path

import pytest
import torch
from torch import nn

from trustmatch.config import load_config
from trustmatch.core.precision import Precision
from trustmatch.evaluation.kept_batches import KeptBatches
from trustmatch.run.trainer import Trainer
from trustmatch.tasks.semantic_segmentation import SegmentationTask

DIGITS = ["train.steps=4", "train.eval_every=2", "train.log_every=2", "train.batch_size=8", "train.uratio=2"]
DIGITS += ["train.eval_batch_size=16"]  # 50 validation digits: 4 batches
SCENES = ["data.scenes=24", "data.labeled_images=6", "data.val_images=5", "train.batch_size=2", "train.steps=2"]
SCENES += ["train.eval_every=1", "train.log_every=1", "train.eval_batch_size=2"]  # 5 scenes: batches of 2, 2, 1
CASES = {"classification": ("digits-fixmatch", DIGITS), "segmentation": ("digitscenes-unimatch", SCENES)}


def count_images(model: nn.Module) -> list[int]:
    """A one-element counter of the images ``model`` is given, over all its forwards."""
    seen = [0]
    model.register_forward_hook(lambda module, inputs, output: seen.__setitem__(0, seen[0] + len(inputs[0])))
    return seen


@pytest.fixture(autouse=True)
def _few_test_scenes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trustmatch.data.digitscenes.TEST_SCENES", 7)


@pytest.mark.parametrize(
    "task,evaluate_test", [("classification", False), ("segmentation", False), ("classification", True)]
)
def test_each_evaluation_predicts_validation_once(tmp_path: Path, task: str, evaluate_test: bool) -> None:
    preset, overrides = CASES[task]
    cfg = load_config(preset, [*overrides, f"train.evaluate_test={str(evaluate_test).lower()}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    seen, per_evaluation = count_images(trainer.ema.module), []

    def take(step: int, val: dict[str, float]) -> None:
        per_evaluation.append(seen[0])
        seen[0] = 0

    trainer.evaluation_hooks.append(take)
    trainer.fit()
    sizes = trainer.task.split_sizes()
    once = sizes["val"] + (sizes["test"] if evaluate_test else 0)  # 50 (+ 359) digits, 5 (+ 7) scenes
    assert per_evaluation == [once] * (cfg.train.steps // cfg.train.eval_every)
    last, temperature = trainer.record.history[-1], trainer.record.temperature
    assert temperature is not None
    again = trainer.evaluate(trainer.report_split, temperature)  # a pass of its own, as before
    assert last["test"] == again.metrics and last["test_calibrated"] == again.calibrated
    assert "temperature_pixels" not in last["test"]  # validation's sample size stays validation's


@pytest.mark.parametrize("mode", ["scalar", "per_class", "off"])
@pytest.mark.parametrize("budget", [None, 2 * 11 * 64 * 64 + 1])  # None: all 5 scenes kept; else the first 2
def test_segmentation_report_equals_a_separate_pass(monkeypatch: pytest.MonkeyPatch, mode: str, budget: int) -> None:
    """Scenes beyond the kept batches' budget are predicted again, in the same batches: equal numbers."""
    if budget is not None:
        monkeypatch.setattr("trustmatch.evaluation.kept_batches.BUDGET", budget)
    cfg = load_config("digitscenes-unimatch", [*SCENES, f"eval.pixel_temperature={mode}"])
    task = SegmentationTask(cfg, Precision.resolve(torch.device("cpu"), False, False))
    torch.manual_seed(0)
    model = task.build_model().eval()
    seen = count_images(model)
    val, temperature, report = task.validate_as_report(model)
    once = seen[0]
    assert (temperature is None) == (mode == "off")
    assert once == (5 if budget is None or mode == "off" else 5 + 3)  # the kept 2 scenes are not predicted again
    assert (val, temperature) == task.validate(model)
    separate = task.evaluate(model, "val", temperature)
    assert report.metrics == separate.metrics and report.detail == separate.detail
    assert report.calibrated == separate.calibrated and report.calibrated_detail == separate.calibrated_detail
    assert ("temperature_pixels" in val) == (mode != "off") and "temperature_pixels" not in report.metrics


def test_kept_batches_stay_a_prefix_within_the_budget() -> None:
    keep = KeptBatches(budget=100)
    masks = torch.zeros(1, 2, 2)
    for size in (40, 50, 20, 5):  # 40 + 50 fit; 20 would make 110; 5 would fit but follows a batch left out
        keep.add(torch.zeros(1, size, 1, 1), masks)
    assert [b[0].shape[1] for b in keep.batches] == [40, 50] and keep.images == 2 and keep.full
