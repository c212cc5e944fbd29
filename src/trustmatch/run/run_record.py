"""What a run has found so far: every evaluation, the one chosen on validation, the temperature and
the time, saved in ``last.pt`` (so a resumed run reports as if it had never stopped) and written as
metrics.json, with a note wherever a figure is missing or is not what it seems.
"""

from __future__ import annotations

from typing import Any

from trustmatch.evaluation.temperature import Temperature
from trustmatch.tasks import Evaluation, Task

NO_BEST = "no validation split: no checkpoint is chosen, `final` is the result"
NO_TEMPERATURE = (
    "no validation split (data.val_per_class=0; segmentation: data.val_images=0, no data.val_dir, or Pascal, "
    "Cityscapes and COCO, whose val.txt is the test split): temperature scaling cannot be fitted (never on test)"
)
SEPARABLE = (
    "the validation split is classified without error, so its NLL falls as T -> 0 and identifies no "
    "temperature: the model is reported raw"
)
NO_TEST = (
    "no test split (a segmentation folder without data.test_dir): `final`, `final_calibrated` and every history "
    "entry's `test` are the validation split, which also chose `best` and fitted the temperature; give a test "
    "folder for an unbiased figure"
)
HELD_OUT = (
    "train.evaluate_test=false: the test split is held out and never read; `final` and every history "
    "entry's `test` are the validation split, which also chose `best`"
)
OPTIMISTIC = "max over evaluations of test {metric}, as USB reports it: optimistic, never used for a choice"


class RunRecord:
    """History, best, time, skipped steps and temperature of one run of ``task``."""

    def __init__(self, task: Task, test_held_out: bool = False) -> None:
        self.task, self.test_held_out = task, test_held_out
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed = 0.0
        self.skipped = 0  # steps skipped for a non-finite loss or update (train.nonfinite=skip)
        self.temperature: Temperature | None = None  # fitted on validation at the last evaluation ...
        self.temperature_step = -1  # ... of the model at this step
        self.last_test: Evaluation | None = None  # of this process's last evaluation (not saved)

    def state(self) -> dict[str, Any]:
        """The checkpoint's "run" entry (the temperature goes with the checkpoint's model, not here)."""
        return {"history": self.history, "best": self.best, "elapsed": self.elapsed, "skipped": self.skipped}

    def load(self, state: dict[str, Any], step: int) -> None:
        """From a checkpoint of the model at ``step``: its "run" entry and temperature."""
        run = state["run"]
        self.history, self.best, self.elapsed = run["history"], run["best"], float(run["elapsed"])
        self.skipped = int(run.get("skipped", 0))
        self.temperature = state.get("temperature")
        self.temperature_step = step

    def add_evaluation(self, step: int, val: dict[str, float], test: Evaluation) -> bool:
        """One evaluation of the model at ``step``, scaled by ``temperature`` where the task fitted one;
        True where it is the best so far on validation (never without a validation split)."""
        entry = {"step": step, "elapsed_s": round(self.elapsed, 2), "val": val, "test": test.metrics}
        if test.calibrated is not None:
            entry.update(temperature=self.temperature, test_calibrated=test.calibrated)
        self.history.append(entry)
        self.last_test = test
        score = self.task.score
        improved = bool(val) and (self.best is None or score(val) > score(self.best["val"]))
        if improved:
            self.best = entry
        return improved

    def temperature_at(self, step: int) -> Temperature | None:
        """The temperature, where it was fitted on the model at ``step``."""
        return self.temperature if self.temperature_step == step else None

    def metrics(self, final: dict[str, float] | None, run: dict[str, Any]) -> dict[str, Any]:
        """metrics.json: ``run`` (what identifies it) first, then ``final`` (None: unfinished) and the record."""
        key = self.task.primary
        best = None
        if self.best is not None:
            best = {**self.best["test"], "step": self.best["step"], "val": self.best["val"]}
            if "temperature" in self.best:
                best.update(temperature=self.best["temperature"], calibrated=self.best["test_calibrated"])
        last, test = (self.history[-1] if self.history else {}), self.last_test
        pixels = last.get("val", {}).get("temperature_pixels")  # segmentation: the fit's sample of pixels
        calibration = {
            "temperature": last.get("temperature"),
            **({"temperature_pixels": pixels} if pixels is not None else {}),
            **({"temperature_note": self._temperature_note()} if self._temperature_missing(last) else {}),
            "final_calibrated": last.get("test_calibrated") if final is not None else None,
            "final_bins": {"15": test.detail} if final is not None and test is not None else None,
            "final_calibrated_bins": {"15": test.calibrated_detail}
            if final is not None and test is not None and test.calibrated is not None
            else None,
            "final_risk_coverage": test.risk_coverage if final is not None and test is not None else None,
            "final_calibrated_risk_coverage": test.calibrated_risk_coverage
            if final is not None and test is not None and test.calibrated is not None
            else None,
        }
        optimistic = max(self.history, key=lambda e: e["test"][key], default=None)
        return {
            **run,
            "wall_time_s": round(self.elapsed, 2),
            "skipped_steps": self.skipped,
            "final": final,
            **calibration,
            "best": best,
            **({} if self.task.has_split("val") else {"best_note": NO_BEST}),
            **self._test_note(),
            "optimistic_best_test": None
            if optimistic is None
            else {key: optimistic["test"][key], "step": optimistic["step"], "note": OPTIMISTIC.format(metric=key)},
            "history": self.history,
            "split": self.task.split_sizes(),
        }

    def _test_note(self) -> dict[str, str]:
        """Why `final` is not the test split, where it is not."""
        if self.test_held_out:
            return {"test_note": HELD_OUT}
        return {} if self.task.has_split("test") else {"test_note": NO_TEST}

    def _temperature_missing(self, last: dict[str, Any]) -> bool:
        """No temperature where one was tried (an evaluation ran), or where none can be (no val split)."""
        tried = bool(last) or not self.task.has_split("val")
        return self.task.fits_temperature and last.get("temperature") is None and tried

    def _temperature_note(self) -> str:
        return SEPARABLE if self.task.has_split("val") else NO_TEMPERATURE
