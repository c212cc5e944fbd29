"""Learning-rate schedules by name: the factor of the initial learning rate at step k of K.

A low-layer table (pure arithmetic), so that config validation and the optimizer factory read the
same names.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from trustmatch.core.registry import Registry

Schedule = Callable[[int, int, float], float]  # (step, total steps, poly power) -> factor
SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")


@SCHEDULES.register("cosine")
def cosine_factor(step: int, total: int, power: float = 0.9) -> float:
    """FixMatch's schedule: lr = lr0 * cos(7 pi k / (16 K))."""
    return math.cos(7.0 * math.pi * step / (16.0 * total))


@SCHEDULES.register("poly")
def poly_factor(step: int, total: int, power: float = 0.9) -> float:
    """UniMatch's schedule: lr = lr0 * (1 - k / K) ^ power."""
    return max(0.0, 1.0 - step / total) ** power


def warmup_factor(schedule: Schedule, step: int, total: int, power: float, warmup: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then ``schedule`` over the remaining ``total - warmup``
    (USB's ``get_cosine_schedule_with_warmup``: k / W, then cos(7 pi (k - W) / (16 (K - W))))."""
    if step < warmup:
        return step / warmup
    return schedule(step - warmup, max(1, total - warmup), power)
