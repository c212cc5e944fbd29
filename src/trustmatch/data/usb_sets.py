"""The datasets of USB's ``usb_cv`` benchmark that torchvision's CIFAR / STL-10 readers do not cover, read from
their published on-disk formats and split as USB splits them.

* ``eurosat``: torchvision's layout (``<root>/eurosat/2750/<class>/*.jpg``, what ``torchvision.datasets.EuroSAT``
  downloads; ``<root>/2750`` or the class folders themselves are found too). USB's split: within each class, in
  sorted file order, the first 80 % form the training pool and the last 20 % the test set.
* ``tissuemnist``: MedMNIST's published ``tissuemnist.npz`` (``train_images`` / ``train_labels`` /
  ``test_images`` / ``test_labels``, 28x28 grayscale, 8 classes) in ``data.root``; the training split is the
  pool and the test split the test set (USB leaves ``val_images`` unused), converted to RGB as USB does.

Both normalise with USB's constants, mean = std = 0.5 per channel (the pretrained ViTs saw them).
Semi-Aves has no loader here: its labeled, unlabeled and test images are class folders (``data.name=folder``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.data import folders
from trustmatch.data.image_sets import DATASETS, SourceData
from trustmatch.data.torchvision_sets import _image_set, _root, _store

USB_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
EUROSAT_POOL = 0.8  # USB's TRAIN_SPLIT_PERCENT + VALIDATION_SPLIT_PERCENT, per class
EUROSAT_SIZE = 64  # the published images' side (the side used when data.image_size is unset)
TISSUEMNIST_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _eurosat_classes_root(root: Path) -> Path:
    for candidate in (root / "eurosat" / "2750", root / "2750", root):
        if candidate.is_dir() and any(e.is_dir() and not e.name.startswith(".") for e in candidate.iterdir()):
            return candidate
    raise UserError(
        f"eurosat: no class folders in {root} (looked for eurosat/2750/<class>/, 2750/<class>/ and <class>/); "
        f"pass data.root=<folder holding eurosat/2750/, torchvision's layout>"
    )


@DATASETS.register("eurosat")
def load_eurosat(cfg: DataConfig) -> SourceData:
    """EuroSAT RGB (10 classes, 27,000 images of 64 px) with USB's per-class 80/20 pool/test split."""
    root = _eurosat_classes_root(folders.existing_folder(str(_root(cfg, "eurosat")), "data.root"))
    classes = folders._classes(root)
    samples = folders._labeled_files(root, classes)
    pool, test = [], []
    for index in range(len(classes)):
        members = [s for s in samples if s[1] == index]  # sorted file order, as torchvision's ImageFolder
        cut = int(EUROSAT_POOL * len(members))
        pool += members[:cut]
        test += members[cut:]
    size = cfg.image_size or EUROSAT_SIZE
    store = folders._Store(cfg, size) if folders.use_disk(cfg, len(samples) * 3 * size * size) else None
    filt = cfg.interpolation
    return SourceData(
        train=folders._labeled_set(pool, size, store, "labeled", root, filt)[0],
        test=folders._labeled_set(test, size, store, "test", root, filt)[0],
        classes=classes,
        mean=USB_STATS[0],
        std=USB_STATS[1],
        hflip=True,
        info={"source": str(root)},
    )


@DATASETS.register("tissuemnist")
def load_tissuemnist(cfg: DataConfig) -> SourceData:
    """MedMNIST's TissueMNIST from ``tissuemnist.npz``: train as the pool, test as the test set, gray -> RGB."""
    root = _root(cfg, "tissuemnist")
    path = root / "tissuemnist.npz" if root.is_dir() or not root.suffix else root
    if not path.is_file():
        raise UserError(
            f"tissuemnist: {path} not found; pass data.root=<folder holding MedMNIST's tissuemnist.npz> "
            f"(https://zenodo.org/records/10519652/files/tissuemnist.npz)"
        )
    try:
        with np.load(path) as npz:
            missing = [k for k in TISSUEMNIST_KEYS if k not in npz.files]
            if missing:
                raise UserError(f"tissuemnist: {path} has no {missing[0]!r} array: is it MedMNIST's tissuemnist.npz?")
            arrays = {k: npz[k] for k in TISSUEMNIST_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"tissuemnist: cannot read {path} ({reason}); replace it with an intact copy") from None
    raw = {split: _rgb(arrays[f"{split}_images"], path) for split in ("train", "test")}
    store = _store(cfg, "tissuemnist", root, [path], raw["train"], raw["test"])
    return SourceData(
        train=_image_set(raw["train"], arrays["train_labels"], cfg.image_size, store, "train", cfg.interpolation),
        test=_image_set(raw["test"], arrays["test_labels"], cfg.image_size, store, "test", cfg.interpolation),
        classes=[str(c) for c in range(int(arrays["train_labels"].max()) + 1)],
        mean=USB_STATS[0],
        std=USB_STATS[1],
        hflip=True,
        info={"source": str(path)},
    )


def _rgb(images: np.ndarray, path: Path) -> torch.Tensor:
    """uint8 [N, 28, 28] grayscale -> [N, 3, 28, 28] (USB reads MedMNIST with ``as_rgb=True``)."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise UserError(f"tissuemnist: {path} holds {images.dtype} images of shape {images.shape}, not uint8 [N, H, W]")
    return torch.from_numpy(images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
