"""The semi-supervised split: labeled, validation and unlabeled subsets of a training pool.

The test split is never used for any choice; the ``best`` checkpoint is chosen on ``val``,
which is held out of the labeled pool (unlike USB, which selects on the test set).
On the disk cache every subset is an index into the mapped file (``ImageSet.subset``): no copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trustmatch.core.errors import UserError
from trustmatch.data.image_sets import ImageSet, SourceData, cat_images

TEST_SPLIT_SEED = 20240601  # fixed: every run and seed of a dataset is scored on the same test set


@dataclass
class SSLData:
    labeled: ImageSet
    unlabeled: ImageSet  # labels kept where known, for diagnostics only (never in a loss)
    val: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        return (
            f"{len(self.labeled)} labeled, {len(self.unlabeled)} unlabeled, {len(self.val)} validation, "
            f"{len(self.test)} test images; {self.num_classes} classes; "
            f"{self.labeled.images.shape[1]}x{self.labeled.images.shape[2]}x{self.labeled.images.shape[3]}"
        )


def stratified_pick(labels: torch.Tensor, count: Callable[[int], int], generator: torch.Generator) -> torch.Tensor:
    """Indices of ``count(class size)`` random samples of each class (grouped by class, then random)."""
    picked = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[: count(len(members))]])
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


def _complement(n: int, taken: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[taken] = False
    return torch.nonzero(keep).flatten()


def _carve_test(train: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet]:
    g = torch.Generator().manual_seed(TEST_SPLIT_SEED)
    test = stratified_pick(train.labels, lambda n: max(1, round(fraction * n)), g).sort().values
    return train.subset(_complement(len(train), test)), train.subset(test)


def _check_class_sizes(labels: torch.Tensor, classes: list[str], need: int, labels_per_class: int) -> None:
    counts = torch.bincount(labels, minlength=len(classes))
    for c, count in enumerate(counts.tolist()):
        if count < need:
            raise UserError(
                f"class {classes[c]!r} has {count} training images but data.labels_per_class={labels_per_class} "
                f"plus data.val_per_class need {need}: lower data.labels_per_class or data.val_per_class"
            )


def make_ssl_split(
    source: SourceData,
    labels_per_class: int,
    val_per_class: int,
    test_fraction: float,
    seed: int,
    include_labeled_in_unlabeled: bool = False,
) -> SSLData:
    """Pick labeled and validation samples per class with ``seed``; the rest is unlabeled.

    ``labels_per_class=0`` labels every image left after the validation pick: a dataset whose labeled set is
    given whole, its unlabeled images apart (Semi-Aves' class folders and ``data.unlabeled_dir``)."""
    train, test = source.train, source.test
    if test is None:
        train, test = _carve_test(train, test_fraction)
    _check_class_sizes(train.labels, source.classes, max(labels_per_class, 1) + val_per_class, labels_per_class)
    g = torch.Generator().manual_seed(seed)
    val_idx = stratified_pick(train.labels, lambda n: val_per_class, g)
    rest = _complement(len(train), val_idx)
    lab_idx = rest[stratified_pick(train.labels[rest], lambda n: labels_per_class or n, g)]
    unl_idx = rest if include_labeled_in_unlabeled else _complement(len(train), torch.cat([val_idx, lab_idx]))
    unlabeled = train.subset(unl_idx)
    if source.extra_unlabeled is not None:
        extra = source.extra_unlabeled
        paths = (unlabeled.paths or [""] * len(unlabeled)) + (extra.paths or [""] * len(extra))
        unlabeled = ImageSet(
            cat_images(unlabeled.images, extra.images),
            torch.cat([unlabeled.labels, extra.labels]),
            paths if (unlabeled.paths or extra.paths) else None,
        )
    if len(unlabeled) == 0:
        raise UserError("no unlabeled images are left after the labeled and validation picks: add unlabeled data")
    return SSLData(
        labeled=train.subset(lab_idx),
        unlabeled=unlabeled,
        val=train.subset(val_idx),
        test=test,
        classes=source.classes,
        mean=source.mean,
        std=source.std,
        hflip=source.hflip,
    )
