"""Segmentation datasets on disk: Pascal VOC 2012 (+SBD), Cityscapes and COCO with UniMatch split files,
and the user's own ``images/`` + ``masks/`` folders.

Split files follow UniMatch (``splits/<dataset>/<split>/labeled.txt``): one sample per line,
``image_path mask_path`` relative to ``data.root``, e.g. ``JPEGImages/2007_000032.jpg
SegmentationClass/2007_000032.png``, ``leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png
gtFine/train/jena/jena_000078_000019_gtFine_labelTrainIds.png`` or ``train2017/000000283213.jpg
masks/000000283213.png``. Unlabeled lines may hold the image path alone; a mask path there is
ignored (UniMatch lists masks for unlabeled images, which SSL must never read). The published
protocol evaluates on ``val.txt`` (the split folder's parent), so it is the test split and there is
no validation split to select on. Only existence is checked up front; each mask is checked when it
is first read. In a user's folders every labeled image is decoded and every mask checked before
training (they are small); unlabeled images, the many, are opened (header) and decoded when read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.data.folders import DECODE_ERRORS, EXTENSIONS, existing_folder, image_files, unlabeled_files
from trustmatch.data.imageio import convert_image, decode_reason
from trustmatch.data.seg_sets import (
    CITYSCAPES_PALETTE,
    IGNORE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEGMENTATION_DATASETS,
    FileSegSet,
    SegmentationData,
    read_mask,
    voc_palette,
)

PASCAL_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
# Cityscapes labelIds of the 19 evaluated classes, in train-id order (cityscapesScripts' labels.py).
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
RAW_CITYSCAPES_SUFFIX = "_labelIds.png"  # raw ids; UniMatch's lines name the ``_labelTrainIds.png`` files
COCO_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]  # fmt: skip
CHECK_THREADS = 4  # PIL releases the GIL while decoding
T = TypeVar("T")


def cityscapes_lut() -> np.ndarray:
    """uint8 [256]: Cityscapes labelIds -> the 19 train ids, 255 for every other id."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[CITYSCAPES_LABEL_IDS] = np.arange(len(CITYSCAPES_LABEL_IDS), dtype=np.uint8)
    return lut


@SEGMENTATION_DATASETS.register("pascal")
def load_pascal(cfg: DataConfig, seed: int) -> SegmentationData:
    """VOC 2012 (``JPEGImages/``, ``SegmentationClass/`` palette PNGs or ``SegmentationClassAug/`` gray ids)."""
    return _standard(cfg, "pascal", PASCAL_CLASSES, voc_palette(len(PASCAL_CLASSES)), "JPEGImages")


@SEGMENTATION_DATASETS.register("cityscapes")
def load_cityscapes(cfg: DataConfig, seed: int) -> SegmentationData:
    """Cityscapes (``leftImg8bit/``, ``gtFine/``): ``*_labelTrainIds.png`` as UniMatch, or raw ``*_labelIds.png``."""
    return _standard(cfg, "cityscapes", CITYSCAPES_CLASSES, list(CITYSCAPES_PALETTE), "leftImg8bit")


@SEGMENTATION_DATASETS.register("coco")
def load_coco(cfg: DataConfig, seed: int) -> SegmentationData:
    """COCO as UniMatch: ``train2017/``, ``val2017/``, ``masks/<id>.png`` with 0 background and 1-80 the things."""
    return _standard(cfg, "coco", COCO_CLASSES, voc_palette(len(COCO_CLASSES)), "masks")


def _standard(
    cfg: DataConfig, name: str, classes: list[str], palette: list[tuple[int, int, int]], marker: str
) -> SegmentationData:
    if not cfg.root:
        raise UserError(f"dataset {name!r} needs data.root=<the {name} folder holding {marker}/>")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root}: no such folder; point it at the {name} folder holding {marker}/")
    split_dir = _split_dir(cfg, root, name)
    labeled = _read_split(split_dir / "labeled.txt", root, need_masks=True)
    unlabeled_file = split_dir / "unlabeled.txt"
    unlabeled = _read_split(unlabeled_file, root, need_masks=False) if unlabeled_file.is_file() else None
    test = _read_split(split_dir.parent / "val.txt", root, need_masks=True)

    def files(pairs: list[tuple[Path, Path | None]], source: Path) -> FileSegSet:
        lut = _cityscapes_lut_for(pairs, source) if name == "cityscapes" else None
        return FileSegSet(pairs, len(classes), lut, f"{name} ({source})")

    return SegmentationData(
        labeled=files(labeled, split_dir / "labeled.txt"),
        unlabeled=files(unlabeled, unlabeled_file) if unlabeled else None,
        val=None,  # the published protocol reports val.txt: it is the test split, never selected on
        test=files(test, split_dir.parent / "val.txt"),
        classes=list(classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        palette=palette,
        info={"source": str(root), "split": str(split_dir)},
    )


def _split_dir(cfg: DataConfig, root: Path, name: str) -> Path:
    split_dir, split = cfg.split_dir, cfg.split
    if split_dir:
        folder = Path(split_dir).expanduser()
        key = f"data.split_dir={split_dir}"
    elif split:
        folder = root / "splits" / str(split)
        key = f"data.split={split}"
    else:
        raise UserError(
            f"dataset {name!r} needs data.split=<name, e.g. 92 or 1_16> (files in {root / 'splits' / '<name>'}) "
            "or data.split_dir=<folder with labeled.txt and unlabeled.txt>"
        )
    if not (folder / "labeled.txt").is_file():
        raise UserError(
            f"{key}: no split file {folder / 'labeled.txt'}; copy UniMatch's splits/{name}/<split>/ there "
            "or set data.split_dir"
        )
    if not (folder.parent / "val.txt").is_file():
        raise UserError(f"{key}: no evaluation list {folder.parent / 'val.txt'}; copy UniMatch's splits/{name}/val.txt")
    return folder


def _read_split(path: Path, root: Path, need_masks: bool) -> list[tuple[Path, Path | None]]:
    """``(image, mask)`` pairs of a split file, each named file checked to exist (masks only where needed)."""
    pairs: list[tuple[Path, Path | None]] = []
    text = _read_text(path, "split file", "a text file of 'image_path mask_path' lines")
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (need_masks and len(fields) < 2):
            expected = "'image_path mask_path'" if need_masks else "'image_path [mask_path]'"
            raise UserError(f"split file {path} line {number}: expected {expected} relative to data.root, got {line!r}")
        image = root / fields[0]
        mask = root / fields[1] if need_masks else None
        for file in (image, mask):
            if file is not None and not file.is_file():
                raise UserError(
                    f"split file {path} line {number} names {file}, which does not exist: "
                    "check data.root or remove the line"
                )
        pairs.append((image, mask))
    if not pairs:
        expected = "'image_path mask_path'" if need_masks else "'image_path' (unlabeled: no mask needed)"
        raise UserError(f"split file {path} lists no samples: add {expected} lines relative to data.root")
    return pairs


def _read_text(path: Path, what: str, expected: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise UserError(f"cannot read {what} {path} ({reason}): it must be {expected}") from None


def _cityscapes_lut_for(pairs: list[tuple[Path, Path | None]], source: Path) -> np.ndarray | None:
    """The labelIds -> train ids lut when the split names raw ``*_labelIds.png`` masks; None for train ids."""
    raw = {mask.name.endswith(RAW_CITYSCAPES_SUFFIX) for _, mask in pairs if mask is not None}
    if len(raw) > 1:
        raise UserError(
            f"split file {source} mixes *_gtFine_labelIds.png and other masks: name one kind "
            "(UniMatch's lists use *_gtFine_labelTrainIds.png)"
        )
    return cityscapes_lut() if raw == {True} else None


@SEGMENTATION_DATASETS.register("folder")
def load_segmentation_folder(cfg: DataConfig, seed: int) -> SegmentationData:
    """``data.root`` with ``images/``, ``masks/`` (same relative stems, PNG class ids) and ``classes.txt``;
    optional ``data.unlabeled_dir`` (images only), ``data.val_dir`` and ``data.test_dir`` (images/ + masks/).

    Every labeled mask is decoded and checked here: a user's folder is small and a mistake found
    before training costs seconds, one found an hour in costs the run.
    """
    if not cfg.root:
        raise UserError("segmentation dataset 'folder' needs data.root=<folder with images/, masks/ and classes.txt>")
    root = existing_folder(cfg.root, "data.root")
    classes_file = root / "classes.txt"
    classes = _classes(classes_file)
    labeled = _labeled_folder(root, "data.root", len(classes), classes_file)
    unlabeled = None
    if cfg.unlabeled_dir:
        files = unlabeled_files(existing_folder(cfg.unlabeled_dir, "data.unlabeled_dir"))
        _check_all(opened_size, files)  # the header only: decoding every unlabeled image at each start would not scale
        unlabeled = FileSegSet([(f, None) for f in files], len(classes))

    def labeled_folder(path: str | None, key: str) -> FileSegSet | None:
        return _labeled_folder(existing_folder(path, key), key, len(classes), classes_file) if path else None

    return SegmentationData(
        labeled=labeled,
        unlabeled=unlabeled,
        val=labeled_folder(cfg.val_dir, "data.val_dir"),
        test=labeled_folder(cfg.test_dir, "data.test_dir"),
        classes=classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        palette=voc_palette(len(classes)),
        info={"source": str(root)},
    )


def _classes(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"no {path}: write one class name per line (line 1 is class id 0, e.g. background)")
    names = [
        line.strip() for line in _read_text(path, "class list", "a text file of one class name per line").splitlines()
    ]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise UserError(f"{path} is empty: write one class name per line (line 1 is class id 0)")
    if "" in names:
        raise UserError(f"{path} line {names.index('') + 1} is empty: one class name per line, no gaps")
    if len(names) > IGNORE:
        raise UserError(f"{path} lists {len(names)} classes: at most {IGNORE} (id 255 means ignore)")
    return names


def _labeled_folder(folder: Path, key: str, num_classes: int, classes_file: Path) -> FileSegSet:
    """``folder/images`` paired with ``folder/masks`` by relative stem; every mask read and checked."""
    images_dir, masks_dir = folder / "images", folder / "masks"
    for sub in (images_dir, masks_dir):
        if not sub.is_dir():
            raise UserError(f"{key}={folder} has no {sub.name}/ folder: put images in images/ and id masks in masks/")
    images = _by_stem(image_files(images_dir), images_dir)
    found = image_files(masks_dir)
    masks = _by_stem([m for m in found if m.suffix.lower() == ".png"], masks_dir)
    lossy = _by_stem([m for m in found if m.suffix.lower() != ".png"], masks_dir)
    if not images:
        raise UserError(f"{images_dir} holds no images ({EXTENSIONS}): add images")
    for stem, image in images.items():
        if stem in lossy and stem not in masks:  # JPEG compression would invent class ids at every edge
            raise UserError(f"mask {lossy[stem]} is not a PNG: save class-id masks as PNG ({masks_dir / stem}.png)")
        if stem not in masks:
            raise UserError(
                f"image {image} has no mask: add {masks_dir / stem}.png or move the image to the unlabeled folder"
            )
    for stem, mask in masks.items():
        if stem not in images:
            raise UserError(f"mask {mask} has no image: add {images_dir / stem}.<ext> or remove the mask")
    pairs = [(images[stem], masks[stem]) for stem in sorted(images)]
    source = str(classes_file)

    def check(pair: tuple[Path, Path]) -> None:
        image, mask = pair
        read_mask(mask, checked_size(image), num_classes, classes_source=source, image=image)

    _check_all(check, pairs)
    return FileSegSet(pairs, num_classes, classes_source=source)


def checked_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image decoded in full (JPEG at 1/8 scale: every byte is still read), so a
    truncated or corrupt file in a user's folder is named before training, not by a batch an hour in."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.draft("RGB", (1, 1))
            convert_image(image, "RGB")
    except DECODE_ERRORS as e:
        raise UserError(f"cannot decode image {path} ({decode_reason(e)}): remove or replace it") from None
    return height, width


def opened_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the header: a file that is no image is named at load; a truncated unlabeled
    image (a large, many-file set) is named by the batch that first reads it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except DECODE_ERRORS as e:
        raise UserError(f"cannot decode image {path} ({decode_reason(e)}): remove or replace it") from None
    return height, width


def _check_all(check: Callable[[T], object], items: list[T]) -> None:
    """``check`` every item in a few threads; the first failure stops the rest."""
    pool = ThreadPoolExecutor(max_workers=min(CHECK_THREADS, os.cpu_count() or 1))
    try:
        for _ in pool.map(check, items):
            pass
    finally:
        pool.shutdown(cancel_futures=True)


def _by_stem(files: list[Path], base: Path) -> dict[str, Path]:
    """Files keyed by their path under ``base`` without the extension; two files with one stem are refused."""
    found: dict[str, Path] = {}
    for file in files:
        stem = file.relative_to(base).with_suffix("").as_posix()
        if stem in found:
            raise UserError(f"{found[stem]} and {file} share the name {stem!r}: keep one")
        found[stem] = file
    return found
