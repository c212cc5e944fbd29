"""Segmentation data: image/mask sets, the loaded splits, the dataset registry and class palettes.

A set hands out one uint8 RGB image ``[3, H, W]`` and its uint8 mask ``[H, W]`` (class ids, 255 =
ignore) at a time: real datasets have images of different sizes that only become a batch after the
random crop, so nothing is stacked here. ``TensorSegSet`` holds in-memory scenes (digitscenes),
``FileSegSet`` decodes files on ``load`` and checks each mask as it reads it, so a bad mask in a
10,000-line split file is named when it is first used instead of after minutes of up-front decoding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.core.labels import IGNORE
from trustmatch.core.registry import Registry
from trustmatch.data.folders import DECODE_ERRORS
from trustmatch.data.imageio import convert_image, decode_reason

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The 19 Cityscapes train ids' colours, as in cityscapesScripts' labels.py (road ... bicycle).
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip


def voc_palette(n: int) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map: the bits of the class id spread over the high bits of R, G and B."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


class SegmentationSet(ABC):
    """One split: ``load(i)`` gives uint8 ``[3, H, W]`` RGB and a uint8 ``[H, W]`` mask (None when unlabeled)."""

    has_masks: bool
    fixed_size: tuple[int, int] | None  # (H, W) when every image has it, so batches can be stacked

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    @abstractmethod
    def name(self, i: int) -> str:
        """A file stem or scene id, for prediction files and overlays."""

    def truth(self, i: int) -> torch.Tensor | None:
        """The true mask of an unlabeled image where it is known (generated scenes): for diagnostics
        (pseudo-label accuracy, the CSL selection plot), never for a loss. None by default."""
        return None


class TensorSegSet(SegmentationSet):
    """Images uint8 ``[N, 3, H, W]`` and masks uint8 ``[N, H, W]`` (or None) already in memory."""

    def __init__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        names: Sequence[str],
        truth: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if masks is not None and (masks.dtype != torch.uint8 or masks.shape != images.shape[:1] + images.shape[2:]):
            raise ValueError(f"masks must be uint8 {[images.shape[0], *images.shape[2:]]}, got {tuple(masks.shape)}")
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        if truth is not None and (masks is not None or truth.shape != images.shape[:1] + images.shape[2:]):
            raise ValueError("truth masks are for an unlabeled set, one [H, W] mask per image")
        self.images, self.masks, self.names, self.truths = images, masks, list(names), truth
        self.has_masks = masks is not None
        self.fixed_size = (images.shape[2], images.shape[3])

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.images[i], self.masks[i] if self.masks is not None else None

    def name(self, i: int) -> str:
        return self.names[i]

    def truth(self, i: int) -> torch.Tensor | None:
        return self.truths[i] if self.truths is not None else None


def read_image(path: Path) -> np.ndarray:
    """uint8 ``[H, W, 3]``: grayscale, palette, RGBA and 16-bit images converted to RGB as in
    classification (``imageio.convert_image``: 16-bit scaled, transparency over white)."""
    try:
        with Image.open(path) as image:
            return np.asarray(convert_image(image, "RGB"))
    except DECODE_ERRORS as e:
        raise UserError(f"cannot decode image {path} ({decode_reason(e)}): remove or replace it") from None


def read_mask(
    path: Path,
    size: tuple[int, int],
    num_classes: int,
    lut: np.ndarray | None = None,
    classes_source: str = "the dataset's classes",
    image: Path | None = None,
) -> np.ndarray:
    """uint8 ``[H, W]`` class ids from a palette or grayscale PNG, checked against its image's ``(H, W)``.

    Palette PNGs (VOC ``SegmentationClass``) give their indices, not their colours, which are the ids.
    ``lut`` maps raw ids to train ids (Cityscapes ``labelIds``) before the check.
    """
    try:
        with Image.open(path) as m:
            mode = m.mode
            ids = np.array(m)  # a writable copy: torch warns on read-only arrays
    except DECODE_ERRORS as e:
        raise UserError(f"cannot decode mask {path} ({decode_reason(e)}): remove or replace it") from None
    if ids.ndim != 2:
        raise UserError(
            f"mask {path} is a {mode} colour image: save class ids as a grayscale or palette PNG (255 = ignore)"
        )
    if ids.shape != size:
        of = f" {image}" if image is not None else ""
        raise UserError(
            f"mask {path} is {ids.shape[1]}x{ids.shape[0]} but the image{of} is {size[1]}x{size[0]} (WxH): "
            "masks must have their image's size"
        )
    if ids.dtype != np.uint8:  # 16-bit (I;16), 32-bit (I), float (F) or bilevel masks: ids 0..255 are kept
        wide = ids.astype(np.float64)
        bad = wide[(wide < 0) | (wide > IGNORE) | (wide != np.floor(wide))]
        if bad.size:
            raise UserError(
                f"mask {path} ({mode}) holds id {bad[0]:g}: class ids must be whole numbers 0..254 (255 = ignore); "
                "map the others to 255 or to a class"
            )
        ids = ids.astype(np.uint8)
    if lut is not None:
        ids = lut[ids]
    bad = np.unique(ids[(ids >= num_classes) & (ids != IGNORE)])
    if bad.size:
        raise UserError(
            f"mask {path} holds class id {int(bad[0])} but {classes_source} has {num_classes} classes "
            f"(ids 0..{num_classes - 1}, 255 = ignore): fix the mask or the class list"
        )
    return ids


class FileSegSet(SegmentationSet):
    """``(image path, mask path | None)`` pairs decoded with PIL on ``load``; each mask checked as it is read."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        num_classes: int,
        lut: np.ndarray | None = None,
        classes_source: str = "the dataset's classes",
    ) -> None:
        has = {mask is not None for _, mask in pairs}
        if len(has) > 1:
            raise ValueError("either every pair has a mask or none has")
        if lut is not None and (lut.dtype != np.uint8 or lut.shape != (256,)):
            raise ValueError(f"lut must be uint8 [256], got {lut.dtype} {lut.shape}")
        self.pairs = list(pairs)
        self.num_classes, self.lut, self.classes_source = num_classes, lut, classes_source
        self.has_masks = has == {True}
        self.fixed_size = None

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        image_path, mask_path = self.pairs[i]
        image = read_image(image_path)
        mask = None
        if mask_path is not None:
            ids = read_mask(mask_path, image.shape[:2], self.num_classes, self.lut, self.classes_source, image_path)
            mask = torch.from_numpy(ids)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), mask

    def name(self, i: int) -> str:
        return self.pairs[i][0].stem


@dataclass
class SegmentationData:
    """Every split of one segmentation dataset, with what the model and the plots need to know about it."""

    labeled: SegmentationSet
    unlabeled: SegmentationSet | None
    val: SegmentationSet | None
    test: SegmentationSet | None
    classes: list[str]
    mean: tuple[float, ...]  # 0-1 scale
    std: tuple[float, ...]
    palette: list[tuple[int, int, int]]  # one RGB colour per class
    info: dict[str, str] = field(default_factory=dict)
    hflip: bool = True  # a mirrored scene is still a valid scene (not for digits, text, signs)

    def summary(self) -> str:
        counts = [
            f"{len(s) if s is not None else 0} {label}"
            for label, s in (("labeled", self.labeled), ("unlabeled", self.unlabeled), ("val", self.val))
        ]
        test = f"{len(self.test) if self.test is not None else 0} test images"
        return f"{', '.join(counts)}, {test}, {len(self.classes)} classes"


SegmentationLoader = Callable[[DataConfig, int], SegmentationData]
SEGMENTATION_DATASETS: Registry[SegmentationLoader] = Registry("segmentation dataset")


def load_segmentation_data(cfg: DataConfig, seed: int) -> SegmentationData:
    """Load the configured segmentation dataset; ``seed`` draws the labeled scenes where a dataset draws any."""
    return SEGMENTATION_DATASETS.get(cfg.name)(cfg, seed)
