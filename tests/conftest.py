"""Shared test set-up. Every test runs by default (CI runs them all); the end-to-end runs marked
``slow`` can be left out for a quick pass with ``pytest -m "not slow"``."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_shared_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's TRUSTMATCH_STORAGE never sends a test's study to their shared server."""
    monkeypatch.delenv("TRUSTMATCH_STORAGE", raising=False)


SMALL_TEST_SCENES = 60


@pytest.fixture(autouse=True)
def _fewer_digitscenes_test_scenes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs evaluate on 60 of digitscenes' 300 fixed test scenes: rendering and evaluating
    the 300 took a quarter of each short segmentation run's time, and no test here measures quality.
    Tests that check the split itself are marked ``all_test_scenes``; subprocess runs see all 300."""
    if request.node.get_closest_marker("all_test_scenes") is None:
        monkeypatch.setattr("trustmatch.data.digitscenes.TEST_SCENES", SMALL_TEST_SCENES)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the small CNN on a user's class folders (two validation images), for predict and evaluate."""
    from test_bad_inputs import pets, train_folder
    from trustmatch.cli import main

    root = tmp_path_factory.mktemp("classifier")
    assert main(train_folder(pets(root / "pets"), root / "run")) == 0
    return root / "run"
