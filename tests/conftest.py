"""Shared test set-up. Every test runs by default (CI runs them all); the end-to-end runs marked
``slow`` can be left out for a quick pass with ``pytest -m "not slow"``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_shared_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's TRUSTMATCH_STORAGE never sends a test's study to their shared server."""
    monkeypatch.delenv("TRUSTMATCH_STORAGE", raising=False)
