"""The shipped configs, generated from one table: dataset settings x methods x label counts.

Each config is a nested mapping of config keys, the shape of a YAML file, so a user YAML can start
from one with ``base: <name>``. A new dataset is one entry in FAMILIES; a new method is one entry
in ``trustmatch.methods.METHODS`` and joins every family that trains all methods (or all SSL ones).
Every family also gets ``<dataset>-calibratemix-<labels>``: CalibrateMix on SoftMatch, as released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustmatch.methods import METHODS

ALL = tuple(METHODS)
SSL = tuple(m for m in METHODS if m != "supervised")  # the published tables compare SSL methods only


@dataclass(frozen=True)
class Family:
    name: str  # config name, with {method} and {labels}
    title: str  # the dataset as descriptions name it
    classes: int
    labels: tuple[int, ...]  # total labeled images: one config per count
    methods: tuple[str, ...]
    settings: dict[str, Any]  # method.* keys here reach only the methods that read them
    note: str  # the end of each description


def _cpu(dataset: str, steps: int, eval_every: int, **data: Any) -> dict[str, Any]:
    """A small CNN and a step budget that trains in minutes on 2 CPU cores."""
    return {
        "data": {"name": dataset, "strong_ops": 2, **data},  # FixMatch's 2 RandAugment ops per strong view
        # USB's BatchNorm momentum 0.001 is for 2^20 steps: running statistics would lag a short run.
        "model": {"name": "cnn", "bn_momentum": 0.1},
        # FreeMatch/SoftMatch statistics: with 0.999 the EMA horizon 1/(1-m) is 1,000 steps, most of
        # the run, so they would mostly reflect their initial values; 0.99 gives 100 steps (5-7 % of
        # the budget): short against the run, long against batch noise.
        "method": {"ema_m": 0.99},
        # The model EMA: the same reasoning.
        "train": {"steps": steps, "batch_size": 32, "uratio": 7, "ema": 0.99, "eval_every": eval_every},
    }


def _usb(dataset: str, model: str, weight_decay: float = 5e-4) -> dict[str, Any]:
    """USB's published setting: batch 64 + 7x64 unlabeled, SGD 0.03 nesterov, 2^20 steps, EMA 0.999."""
    return {
        "data": {
            "name": dataset,
            "val_per_class": 0,  # "40 labels" means 40 labeled images and nothing more: no validation split
            "include_labeled_in_unlabeled": True,
            "strong_ops": 3,  # USB's strong view: 3 RandAugment ops at random magnitudes, then Cutout
        },
        "model": {"name": model},
        "train": {
            "steps": 2**20,
            "batch_size": 64,
            "uratio": 7,
            "lr": 0.03,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": weight_decay,
            "ema": 0.999,
            "eval_every": 5000,
            "log_every": 100,
        },
    }


_USB_NOTE = "(published USB setting)"
FAMILIES = (  # name, dataset as described, classes, label counts, methods, settings, end of the description
    Family(
        "digits-{method}", "scikit-learn's digits", 10, (40,), ALL,
        _cpu("digits", 1500, 250, val_per_class=5, image_size=16), "CNN at 16 px, 1,500 steps (CPU-sized)",
    ),
    Family(
        "fashionmnist-{method}-{labels}", "Fashion-MNIST", 10, (40, 250), ALL,
        _cpu("fashionmnist", 2000, 500, val_per_class=10), "CNN, 2,000 steps (CPU-sized)",
    ),
    Family(
        "cifar10-{method}-{labels}", "CIFAR-10", 10, (40, 250, 4000), SSL,
        _usb("cifar10", "wrn_28_2"), f"WRN-28-2 {_USB_NOTE}",
    ),
    Family(
        "cifar100-{method}-{labels}", "CIFAR-100", 100, (400, 2500, 10000), SSL,
        _usb("cifar100", "wrn_28_8", weight_decay=1e-3), f"WRN-28-8, wd 1e-3 {_USB_NOTE}",
    ),
    Family(
        "svhn-{method}-{labels}", "SVHN", 10, (40, 250, 1000), SSL,
        _usb("svhn", "wrn_28_2"), f"WRN-28-2 {_USB_NOTE}",
    ),
    Family(
        "stl10-{method}-{labels}", "STL-10", 10, (40, 250, 1000), SSL,
        _usb("stl10", "wrn_37_2"), f"+100k unlabeled, WRN-37-2 at 96 px {_USB_NOTE}",
    ),
)  # fmt: skip


def _config(family: Family, method: str, labels: int) -> dict[str, Any]:
    settings, spec = family.settings, METHODS[method]
    return {
        "description": f"{spec.description} on {family.title} with {labels} labels, {family.note}",
        **settings,
        "data": {**settings["data"], "labels_per_class": labels // family.classes},
        "method": {"name": method, **{k: v for k, v in settings.get("method", {}).items() if k in spec.keys}},
    }


def _calibratemix(family: Family, labels: int) -> dict[str, Any]:
    """CalibrateMix as released: on SoftMatch, with the second forward pass."""
    config = _config(family, CALIBRATEMIX_BASE, labels)
    config["description"] = f"CalibrateMix on {config['description']}"
    return {**config, "calibratemix": {"mode": "faithful"}}


CALIBRATEMIX_BASE = "softmatch"  # the only variant the authors released
PRESETS: dict[str, dict[str, Any]] = {
    family.name.format(method=method, labels=labels): _config(family, method, labels)
    for family in FAMILIES
    for method in family.methods
    for labels in family.labels
}
PRESETS.update(
    {
        family.name.format(method="calibratemix", labels=labels): _calibratemix(family, labels)
        for family in FAMILIES
        for labels in family.labels
    }
)
