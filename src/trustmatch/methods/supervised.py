"""The supervised baseline: labeled images only, in both tasks."""

from __future__ import annotations

from trustmatch.methods.method import METHODS, Method


@METHODS.register(
    "supervised", description="Supervised baseline (labeled images only)", tasks=("classification", "segmentation")
)
class Supervised(Method):
    pass
