"""The methods trustmatch trains, and the ``method.*`` keys each one reads.

One table, so that config validation, the shipped configs and the benchmarks agree on the names,
and so that a key meant for another method is rejected instead of silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    description: str
    keys: tuple[str, ...]  # the method.* keys this method reads, besides `name`
    defaults: tuple[tuple[str, object], ...] = ()  # this method's own defaults where they differ from the key's


METHODS: dict[str, MethodSpec] = {
    "supervised": MethodSpec("Supervised baseline (labeled images only)", ()),
    "fixmatch": MethodSpec("FixMatch (confidence threshold 0.95)", ("lambda_u", "tau")),
    "flexmatch": MethodSpec("FlexMatch (curriculum class thresholds)", ("lambda_u", "tau", "threshold_warmup")),
    "freematch": MethodSpec("FreeMatch (self-adaptive thresholds + fairness)", ("lambda_u", "ema_m", "saf_weight")),
    "softmatch": MethodSpec(
        "SoftMatch (truncated-Gaussian weights)", ("lambda_u", "ema_m", "n_sigma", "dist_align", "pseudo_label_from")
    ),
    "uda": MethodSpec(
        "UDA (sharpened soft pseudo-labels above 0.8)", ("lambda_u", "tau", "temperature"), (("tau", 0.8),)
    ),
}
