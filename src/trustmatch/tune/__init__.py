"""Choosing settings on validation: search spaces, the Optuna study whose trials are ordinary runs, and
its report (``trustmatch tune``)."""

from trustmatch.tune.command import tune
from trustmatch.tune.space import Param, Space, load_space, parse_spec, shipped_spaces, space_text
from trustmatch.tune.study import OBJECTIVES, TuneRequest

__all__ = [
    "OBJECTIVES",
    "Param",
    "Space",
    "TuneRequest",
    "load_space",
    "parse_spec",
    "shipped_spaces",
    "space_text",
    "tune",
]
