"""Shared test set-up. Every test runs by default (CI runs them all); the end-to-end runs marked
``slow`` can be left out for a quick pass with ``pytest -m "not slow"``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)
