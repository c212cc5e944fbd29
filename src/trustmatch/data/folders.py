"""A user's own images: ``root/<class>/*`` labeled, plus optional unlabeled and test folders.

Classes are the sorted subfolder names, as in torchvision's ``ImageFolder``; files are found
recursively and kept by extension (torchvision's ``IMG_EXTENSIONS``). Hidden files and folders
(``.ipynb_checkpoints``, macOS ``._*`` companions) are skipped, since they are never real images.
Every image is decoded once, converted to RGB and squashed to ``image_size`` square (the whole
image is kept; the training crops do the rest), in a few threads because folders can be large.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from trustmatch.config import DataConfig
from trustmatch.data.base import DATASETS, ImageSet, SourceData
from trustmatch.errors import UserError

DEFAULT_IMAGE_SIZE = 32
DECODE_THREADS = 4  # PIL releases the GIL while decoding, so threads overlap file reads and decodes
STATS_CHUNK = 4096
# what PIL raises on a corrupt, truncated or oversized file: each reader turns them into one UserError line
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
EXTENSIONS = " ".join(IMG_EXTENSIONS)


@DATASETS.register("folder")
def load_folder(cfg: DataConfig) -> SourceData:
    """Labeled ``data.root``, optional ``data.unlabeled_dir`` and ``data.test_dir``; stats from the labeled images.

    Every folder is listed and checked before any image is decoded, so a layout mistake is
    reported at once. Without a test folder ``test`` is None and the split carves one out.
    """
    if not cfg.root:
        raise UserError("dataset 'folder' needs data.root=<folder with one subfolder of images per class>")
    root = existing_folder(cfg.root, "data.root")
    classes = _classes(root)
    train_files = _labeled_files(root, classes)
    test_files = _test_files(existing_folder(cfg.test_dir, "data.test_dir"), classes) if cfg.test_dir else None
    unlabeled = unlabeled_files(existing_folder(cfg.unlabeled_dir, "data.unlabeled_dir")) if cfg.unlabeled_dir else None

    size = cfg.image_size or DEFAULT_IMAGE_SIZE
    train = _labeled_set(train_files, size)
    mean, std = _channel_stats(train.images)
    return SourceData(
        train=train,
        test=_labeled_set(test_files, size) if test_files is not None else None,
        classes=classes,
        mean=mean,
        std=std,
        hflip=True,
        extra_unlabeled=_image_set(unlabeled, [-1] * len(unlabeled), size) if unlabeled else None,
        info={"source": str(root)},
    )


def existing_folder(path: str, key: str) -> Path:
    """``path`` as a folder, or one line naming ``key`` (shared with the segmentation folders)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"{key}={path}: no such folder; check the path")
    if not folder.is_dir():
        raise UserError(f"{key}={path} is a file, not a folder of images")
    return folder


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _classes(root: Path) -> list[str]:
    classes = _subfolders(root)
    if not classes:
        raise UserError(f"no class folders in {root}: put each class's images in its own subfolder, {root}/<class>/")
    return classes


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively and in a stable sorted order; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and has_file_allowed_extension(f, IMG_EXTENSIONS)
        ]
    return found


def _labeled_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    samples = []
    for index, name in enumerate(classes):
        files = image_files(root / name)
        if not files:
            raise UserError(
                f"class folder {root / name} holds no images ({EXTENSIONS}): add images or remove the folder"
            )
        samples += [(f, index) for f in files]
    return samples


def _test_files(test_root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    test_classes = _classes(test_root)
    if test_classes != classes:
        extra = sorted(set(test_classes) - set(classes))
        missing = sorted(set(classes) - set(test_classes))
        details = "; ".join(
            f"{label}: {', '.join(names)}"
            for label, names in (("not in data.root", extra), ("missing from it", missing))
            if names
        )
        raise UserError(f"data.test_dir={test_root} must have the same class folders as data.root ({details})")
    return _labeled_files(test_root, classes)


def unlabeled_files(folder: Path) -> list[Path]:
    """Every image under ``data.unlabeled_dir`` (classification and segmentation), or one line if none."""
    files = image_files(folder)
    if not files:
        raise UserError(f"data.unlabeled_dir={folder} holds no images ({EXTENSIONS}); add images or unset it")
    return files


def decode_image(path: Path, size: int, mode: str = "RGB") -> np.ndarray:
    """One image as uint8 [C, size, size] (mode "RGB" or "L"); training and ``predict`` share it."""
    try:
        with Image.open(path) as image:
            image.draft(mode, (size, size))  # JPEG: decode at a reduced scale when the image is large
            pixels = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    except DECODE_ERRORS as e:
        raise UserError(f"cannot decode image {path} ({e}): remove or replace it") from None
    array = np.asarray(pixels)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode_all(paths: list[Path], size: int) -> torch.Tensor:
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    pool = ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1))
    try:
        for i, image in enumerate(pool.map(lambda p: decode_image(p, size), paths)):
            images[i] = image
    finally:
        pool.shutdown(cancel_futures=True)  # on a bad file, stop without decoding the rest
    return torch.from_numpy(images)


def _image_set(paths: list[Path], labels: list[int], size: int) -> ImageSet:
    return ImageSet(_decode_all(paths, size), torch.tensor(labels, dtype=torch.int64), [str(p) for p in paths])


def _labeled_set(samples: list[tuple[Path, int]], size: int) -> ImageSet:
    return _image_set([p for p, _ in samples], [label for _, label in samples], size)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, accumulated in chunks to bound memory."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(STATS_CHUNK):
        x = chunk.to(torch.float64).div_(255.0)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)  # a flat channel: no divide by 0
    return tuple(mean.tolist()), tuple(std.tolist())
