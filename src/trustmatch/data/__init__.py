"""Datasets: embedded digits, torchvision-format benchmarks, USB's EuroSAT and TissueMNIST, the user's folders;
the SSL split; the decoded-image cache on disk for sets larger than memory (``cache.py``, ``data.cache``).
Segmentation: embedded digitscenes, Pascal VOC, Cityscapes, COCO and the user's folders."""

from __future__ import annotations

from trustmatch.config import DataConfig
from trustmatch.data import digits, digitscenes, folders, segfiles, torchvision_sets, usb_sets  # noqa: F401  (loaders)
from trustmatch.data.cache import MappedImages
from trustmatch.data.image_sets import DATASETS, ImageSet, SourceData
from trustmatch.data.split import SSLData, make_ssl_split

__all__ = ["DATASETS", "ImageSet", "MappedImages", "SourceData", "SSLData", "load_ssl_data"]


def load_ssl_data(cfg: DataConfig, seed: int) -> SSLData:
    """Load the configured dataset and split it into labeled / unlabeled / validation / test."""
    source = DATASETS.get(cfg.name)(cfg)
    return make_ssl_split(
        source,
        cfg.labels_per_class,
        cfg.val_per_class,
        cfg.test_fraction,
        seed,
        cfg.include_labeled_in_unlabeled,
    )
