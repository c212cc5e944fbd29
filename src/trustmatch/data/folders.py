"""A user's own images: ``root/<class>/*`` labeled, plus optional unlabeled and test folders.

Classes are the sorted subfolder names, as in torchvision's ``ImageFolder``; files are found
recursively and kept by extension (torchvision's ``IMG_EXTENSIONS``). Hidden files and folders
(``.ipynb_checkpoints``, macOS ``._*`` companions) are skipped, since they are never real images.
Every image is decoded once, converted to RGB and squashed to ``image_size`` square (the whole
image is kept; the training crops do the rest), in a few threads because folders can be large,
a chunk of files at a time: into memory, or with ``data.cache=disk`` (or ``auto`` for a set larger
than memory) straight into the decoded-image cache on disk (``cache.py``), one file per folder
(labeled, test, unlabeled) keyed by its files' paths, sizes and mtimes, the size, the channel mode,
Pillow's version and :data:`DECODER_VERSION`; a later run with the same files maps it and decodes
nothing. The channel statistics come from exact per-channel histograms (stored in the cache's
header), so both paths give the same mean and std whatever the chunking.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.data.cache import MappedImages, cache_name, decoded_dir, open_cache, source_key, use_disk
from trustmatch.data.image_sets import DATASETS, ImageSet, SourceData
from trustmatch.data.imageio import convert_image, decode_reason

DEFAULT_IMAGE_SIZE = 32
DECODE_THREADS = 4  # PIL releases the GIL while decoding, so threads overlap file reads and decodes
DECODE_CHUNK = 1024  # files decoded per round: bounds the decoded images held outside the output array
STATS_ELEMENTS = 1 << 24  # pixel values per histogram chunk (16 MB of uint8: bounds the scratch memory)
DECODER_VERSION = 2  # bump when decode_image's pixels change (16-bit / transparency conversion: 2)
MODE = "RGB"  # folders are always decoded to 3 channels
# what PIL raises on a corrupt, truncated or oversized file: each reader turns them into one UserError line
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
EXTENSIONS = " ".join(IMG_EXTENSIONS)
#: ``data.interpolation`` -> PIL's filter (a timm model's pretrained config may ask for bicubic)
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


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
    count = len(train_files) + len(test_files or []) + len(unlabeled or [])
    store = _Store(cfg, size) if use_disk(cfg, count * 3 * size * size) else None
    filt = cfg.interpolation
    train, histogram = _labeled_set(train_files, size, store, "labeled", root, filt)
    mean, std = stats_from_histogram(histogram)
    return SourceData(
        train=train,
        test=_labeled_set(test_files, size, store, "test", Path(cfg.test_dir or ""), filt)[0]
        if test_files is not None
        else None,
        classes=classes,
        mean=mean,
        std=std,
        hflip=True,
        extra_unlabeled=(
            _image_set(unlabeled, [-1] * len(unlabeled), size, store, "unlabeled", Path(cfg.unlabeled_dir or ""), filt)[
                0
            ]
            if unlabeled
            else None
        ),
        info={"source": str(root), "cache": "disk" if store else "memory"},
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


def decode_image(path: Path, size: int, mode: str = "RGB", interpolation: str | None = None) -> np.ndarray:
    """One image as uint8 [C, size, size] (mode "RGB" or "L"; 16-bit scaled, transparency over white:
    ``imageio.convert_image``; resized with ``interpolation``, None: bilinear); training and ``predict``
    share it."""
    try:
        with Image.open(path) as image:
            image.draft(mode, (size, size))  # JPEG: decode at a reduced scale when the image is large
            pixels = convert_image(image, mode).resize((size, size), FILTERS[interpolation or "bilinear"])
    except DECODE_ERRORS as e:
        raise UserError(f"cannot decode image {path} ({decode_reason(e)}): remove or replace it") from None
    array = np.asarray(pixels)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_into(
    out: np.ndarray,
    paths: list[Path],
    size: int,
    on_chunk: Callable[[int, int], None] | None = None,
    interpolation: str | None = None,
) -> None:
    """Decode ``paths`` into ``out`` [N, 3, size, size] (an array in memory or a memory map), a chunk at a time.

    ``on_chunk(start, stop)`` runs after each chunk is written. At most :data:`DECODE_CHUNK` decoded
    images are held besides ``out``, so decoding into a memory map needs no memory for the set.
    """
    pool = ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1))
    try:
        for start in range(0, len(paths), DECODE_CHUNK):
            chunk = paths[start : start + DECODE_CHUNK]
            for i, image in enumerate(pool.map(lambda p: decode_image(p, size, MODE, interpolation), chunk), start):
                out[i] = image
            if on_chunk is not None:
                on_chunk(start, start + len(chunk))
    finally:
        pool.shutdown(cancel_futures=True)  # on a bad file, stop without decoding the rest


def decode_batch(paths: list[Path], size: int, mode: str = "RGB", interpolation: str | None = None) -> np.ndarray:
    """uint8 [N, C, size, size] of a few files (``predict``'s batches), decoded in threads."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(pool.map(lambda p: decode_image(p, size, mode, interpolation), paths)):
            out[i] = image
    return out


class _Store:
    """Where and how a folder's images go on disk (``data.cache=disk``)."""

    def __init__(self, cfg: DataConfig, size: int) -> None:
        self.folder, self.size, self.interpolation = decoded_dir(cfg), size, cfg.interpolation

    def images(self, paths: list[Path], role: str, source: Path) -> tuple[MappedImages, Histogram]:
        """The decoded-image cache of ``paths`` (built here when missing or stale) and its histogram."""
        size = self.size
        # bilinear keeps the key it had before the filter was a choice (caches built then stay valid)
        filters = () if self.interpolation in (None, "bilinear") else (self.interpolation,)
        key = source_key(paths, "folder", size, MODE, PIL.__version__, DECODER_VERSION, *filters)
        name = cache_name("folder", role, f"{size}px", str(source.expanduser().resolve()))

        def fill(out: np.ndarray) -> dict[str, Any]:
            histogram = np.zeros((3, 256), dtype=np.int64)
            decode_into(out, paths, size, lambda a, b: _add_histogram(histogram, out[a:b]), self.interpolation)
            return {"histogram": histogram.tolist()}

        array, info = open_cache(self.folder, name, key, (len(paths), 3, size, size), fill, str(source))
        return MappedImages((array,)), info["histogram"]


def _image_set(
    paths: list[Path],
    labels: list[int],
    size: int,
    store: _Store | None = None,
    role: str = "",
    source: Path = Path(),
    interpolation: str | None = None,
) -> tuple[ImageSet, Histogram]:
    """The set in memory (store None) or mapped from the disk cache, and its channel histogram."""
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    names = [str(p) for p in paths]
    if store is not None:
        images, histogram = store.images(paths, role, source)
        return ImageSet(images, label_tensor, names), histogram
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    decode_into(out, paths, size, interpolation=interpolation)
    images = torch.from_numpy(out)
    return ImageSet(images, label_tensor, names), channel_histogram(images)


def _labeled_set(
    samples: list[tuple[Path, int]],
    size: int,
    store: _Store | None = None,
    role: str = "",
    source: Path = Path(),
    interpolation: str | None = None,
) -> tuple[ImageSet, Histogram]:
    paths, labels = [p for p, _ in samples], [label for _, label in samples]
    return _image_set(paths, labels, size, store, role, source, interpolation)


Histogram = list[list[int]]  # per channel, the count of each uint8 value


def _add_histogram(histogram: np.ndarray, images: np.ndarray) -> None:
    rows = max(1, STATS_ELEMENTS // max(1, math.prod(images.shape[1:])))
    for start in range(0, len(images), rows):
        chunk = images[start : start + rows]
        for c in range(chunk.shape[1]):
            histogram[c] += np.bincount(chunk[:, c].ravel(), minlength=256)


def channel_histogram(images: torch.Tensor | MappedImages) -> Histogram:
    """Per-channel counts of every uint8 value of ``images``, read in chunks to bound memory."""
    histogram = np.zeros((images.shape[1], 256), dtype=np.int64)
    rows = max(1, STATS_ELEMENTS // max(1, math.prod(images.shape[1:])))
    for start in range(0, len(images), rows):
        _add_histogram(histogram, images[start : start + rows].numpy())
    return histogram.tolist()


def stats_from_histogram(histogram: Histogram) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units from exact integer sums (one rounding each, no cancellation)."""
    means, stds = [], []
    for counts in histogram:
        n = sum(counts)
        total = sum(v * c for v, c in enumerate(counts))
        squares = sum(v * v * c for v, c in enumerate(counts))
        means.append(total / (255 * n))
        variance = (squares * n - total * total) / (255 * 255 * n * n)  # exact integers, then one division
        stds.append(max(math.sqrt(variance), 1 / 255))  # a flat channel: no divide by 0
    return tuple(means), tuple(stds)
