"""FixMatch's weak and strong views of a whole uint8 batch, built on the training device.

A step augments 448 unlabeled images twice; per-image PIL work in worker processes would dominate
it on a small CPU, so every view here is a handful of vectorised tensor calls on the batch.
Unlike ``torchvision.transforms.v2.RandAugment`` on a batch (one op for all images), every image
gets its own ops and magnitudes, as in FixMatch.

All randomness comes from a caller-owned CPU ``torch.Generator`` (small parameter tensors are
drawn on the CPU, then moved to the images' device), so the same generator state and input give
the same views: runs are reproducible and resumable.

Strong ops (FixMatch's RandAugment with random magnitudes; FixMatch paper appendix, table of
RandAugment transformations, and USB ``semilearn/datasets/augmentation/randaugment.py``
``augment_list``). Each image draws ``n_ops`` ops uniformly with replacement (FixMatch: 2, USB's
strong transform: 3). Magnitude rule: by default each op's magnitude is uniform over its range, per
image (FixMatch's RandAugment variant, USB); with a fixed strength M in [0, 1] every op sits at
``weakest + M * (strongest - weakest)`` of its range, with a random sign for the signed geometric
ops (classic RandAugment's single magnitude). Ranges, weakest end first where it matters:

=============  =====================  ==============================================================
op             magnitude range        meaning
=============  =====================  ==============================================================
AutoContrast   -                      stretch each channel to [0, 1]
Brightness     0.95 -> 0.05           blend with black by this factor
Color          0.95 -> 0.05           blend with the grayscale image (identity for 1 channel)
Contrast       0.95 -> 0.05           blend with the mean gray level
Equalize       -                      histogram equalisation per channel (PIL's scheme)
Identity       -                      unchanged
Posterize      8 -> 4 (bits 8..4)     keep the top ``floor(m)`` bits of each uint8 value
Rotate         0 -> +-30 degrees      counter-clockwise about the centre
Sharpness      0.95 -> 0.05           blend with PIL's 3x3 smoothing (borders kept)
ShearX         0 -> +-0.3             x_in = x_out + m * y_out (about the top-left corner, as PIL)
ShearY         0 -> +-0.3             y_in = y_out + m * x_out
Solarize       256 -> 0               invert uint8 values >= m
TranslateX     0 -> +-0.3             x_in = x_out + m * width
TranslateY     0 -> +-0.3             y_in = y_out + m * height
=============  =====================  ==============================================================

Geometric ops sample with nearest neighbour (PIL's default) and fill with gray 0.5 (FixMatch's
``fill=(128, 128, 128)``). Then Cutout: one square of side ``U(0, cutout] * min(H, W)`` at a
uniform random centre, clipped to the image, filled with gray 0.5 (a constant fill like
FixMatch/USB; we choose plain mid-gray rather than USB's dataset-specific colour).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torch import Tensor

GRAY = 0.5  # fill for geometric ops and Cutout, in [0, 1]


class Op(NamedTuple):
    name: str
    low: float
    high: float
    weakest: float  # the end of the range closest to the identity (a fixed magnitude counts from it)


OPS: tuple[Op, ...] = (
    Op("AutoContrast", 0.0, 1.0, 0.0),
    Op("Brightness", 0.05, 0.95, 0.95),
    Op("Color", 0.05, 0.95, 0.95),
    Op("Contrast", 0.05, 0.95, 0.95),
    Op("Equalize", 0.0, 1.0, 0.0),
    Op("Identity", 0.0, 1.0, 0.0),
    Op("Posterize", 4.0, 8.0, 8.0),
    Op("Rotate", -30.0, 30.0, 0.0),
    Op("Sharpness", 0.05, 0.95, 0.95),
    Op("ShearX", -0.3, 0.3, 0.0),
    Op("ShearY", -0.3, 0.3, 0.0),
    Op("Solarize", 0.0, 256.0, 256.0),
    Op("TranslateX", -0.3, 0.3, 0.0),
    Op("TranslateY", -0.3, 0.3, 0.0),
)
OP_INDEX = {op.name: i for i, op in enumerate(OPS)}
AFFINE = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
_AFFINE_IDS = torch.tensor([OP_INDEX[name] for name in AFFINE])
_LOW = torch.tensor([op.low for op in OPS])
_SPAN = torch.tensor([op.high - op.low for op in OPS])
_WEAKEST = torch.tensor([op.weakest for op in OPS])
_STRONGEST = torch.tensor([op.low if op.weakest == op.high else op.high for op in OPS])
_SIGNED = torch.tensor([op.low == -op.high for op in OPS])


def _per_sample(m: Tensor) -> Tensor:
    """[n] -> [n, 1, 1, 1], to broadcast one value per image."""
    return m.view(-1, 1, 1, 1)


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: ``factor * x + (1 - factor) * degenerate``, clamped, one factor per image."""
    f = _per_sample(factor)
    return (x * f + degenerate * (1.0 - f)).clamp_(0.0, 1.0)


def _gray(x: Tensor) -> Tensor:
    return tvf.rgb_to_grayscale(x) if x.shape[1] == 3 else x


def adjust_brightness(x: Tensor, m: Tensor) -> Tensor:
    """One brightness factor per image (shared with the segmentation strong view)."""
    return (x * _per_sample(m)).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, m: Tensor) -> Tensor:
    """PIL's Color / torchvision's saturation: blend with the grayscale image, one factor per image."""
    return _blend(x, _gray(x), m) if x.shape[1] == 3 else x


def adjust_contrast(x: Tensor, m: Tensor) -> Tensor:
    """Blend with the mean grey level, one factor per image."""
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), m)


def _sharpness(x: Tensor, m: Tensor) -> Tensor:
    """Blend with PIL's smoothing kernel (1s around a centre 5, /13); border pixels stay as they are.

    The kernel is a 3x3 box sum plus 4x the centre; shifted adds beat a grouped conv2d on CPU.
    """
    if min(x.shape[-2:]) <= 2:
        return x
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (box + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0
    return _blend(x, degenerate, m)


def _posterize(x: Tensor, m: Tensor) -> Tensor:
    """uint8 ``value & ~(2**(8 - bits) - 1)``, done in float so each image has its own bit count."""
    step = _per_sample(torch.exp2(8.0 - m.floor()))
    return torch.floor(torch.round(x * 255.0) / step).mul_(step / 255.0)


def _solarize(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(x >= _per_sample(m) / 255.0, 1.0 - x, x)


def _equalize(x: Tensor, m: Tensor) -> Tensor:
    return tvf.equalize(x)


def _autocontrast(x: Tensor, m: Tensor) -> Tensor:
    """Stretch each channel to [0, 1]; flat channels stay. (``tvf.autocontrast`` masks in place, a CUDA sync.)"""
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, 1.0, 1.0 / (high - low))
    return ((x - torch.where(flat, 0.0, low)) * scale).clamp_(0.0, 1.0)


PIXEL_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "AutoContrast": _autocontrast,
    "Brightness": adjust_brightness,
    "Color": adjust_saturation,
    "Contrast": adjust_contrast,
    "Equalize": _equalize,
    "Posterize": _posterize,
    "Sharpness": _sharpness,
    "Solarize": _solarize,
}


def affine_thetas(op_ids: Tensor, magnitudes: Tensor, height: int, width: int) -> Tensor:
    """Per-image 2x3 ``affine_grid`` matrices (output -> input, normalised coordinates).

    Built in pixel units about the image centre, then rescaled by the half-sides; images whose op
    is not affine get the identity.
    """
    n = len(op_ids)
    m = magnitudes.double()
    a = torch.zeros(n, 2, 3, dtype=torch.float64)
    a[:, 0, 0] = a[:, 1, 1] = 1.0
    rot = op_ids == OP_INDEX["Rotate"]
    rad = torch.deg2rad(m[rot])
    a[rot, 0, 0] = a[rot, 1, 1] = torch.cos(rad)
    a[rot, 0, 1] = -torch.sin(rad)
    a[rot, 1, 0] = torch.sin(rad)
    sx = op_ids == OP_INDEX["ShearX"]  # about the top-left corner: shift of m * h / 2 at the centre
    a[sx, 0, 1] = m[sx]
    a[sx, 0, 2] = m[sx] * height / 2.0
    sy = op_ids == OP_INDEX["ShearY"]
    a[sy, 1, 0] = m[sy]
    a[sy, 1, 2] = m[sy] * width / 2.0
    tx = op_ids == OP_INDEX["TranslateX"]
    a[tx, 0, 2] = m[tx] * width
    ty = op_ids == OP_INDEX["TranslateY"]
    a[ty, 1, 2] = m[ty] * height
    scale_in = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64).view(1, 2, 1)
    scale_out = torch.tensor([width / 2.0, height / 2.0, 1.0], dtype=torch.float64).view(1, 1, 3)
    return (a * scale_in * scale_out).float()


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Move CPU tensors (parameters, gathered images, labels, indices) to ``device``; on CUDA via pinned memory,
    so no stream sync."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """One nearest-neighbour ``grid_sample`` for the whole batch; outside pixels become gray."""
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    out = nnf.grid_sample(x - GRAY, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.add_(GRAY)


def apply_op(images: Tensor, op: str, magnitudes: Tensor) -> Tensor:
    """Apply one named op to float images in [0, 1] with one magnitude per image (see the table)."""
    magnitudes = magnitudes.float()
    if op == "Identity":
        return images
    if op in AFFINE:
        ids = torch.full((len(images),), OP_INDEX[op])
        theta = affine_thetas(ids, magnitudes.cpu(), *images.shape[-2:])
        return warp(images, theta.to(images.device))
    return PIXEL_OPS[op](images, magnitudes.to(images.device))


def apply_ops(x: Tensor, op_ids: Tensor, magnitudes: Tensor) -> Tensor:
    """Apply op ``op_ids[i]`` with ``magnitudes[i]`` to image i (CPU ids/magnitudes; x updated in place).

    Each pixel op runs once on the subset of images that drew it; all affine ops share one warp.
    Subsets are found on the CPU and sent in one transfer, so the device never waits on the host.
    """
    affine = torch.isin(op_ids, _AFFINE_IDS)
    groups = {"affine": affine.nonzero().squeeze(1)}
    groups.update({name: (op_ids == OP_INDEX[name]).nonzero().squeeze(1) for name in PIXEL_OPS})
    groups = {name: idx for name, idx in groups.items() if len(idx)}
    if not groups:
        return x
    order = torch.cat(list(groups.values()))
    sizes = [len(idx) for idx in groups.values()]
    device_idx = to_device(order, x.device).split(sizes)
    device_mags = to_device(magnitudes[order], x.device).split(sizes)
    for name, idx, mags in zip(groups, device_idx, device_mags):
        subset = x.index_select(0, idx)
        if name == "affine":
            theta = affine_thetas(op_ids[affine], magnitudes[affine], *x.shape[-2:])
            x.index_copy_(0, idx, warp(subset, to_device(theta, x.device)))
        else:
            x.index_copy_(0, idx, PIXEL_OPS[name](subset, mags))
    return x


def sample_ops(n: int, n_ops: int, generator: torch.Generator, magnitude: float | None = None) -> tuple[Tensor, Tensor]:
    """Op ids [n, n_ops] uniform over OPS and their magnitudes (on the CPU): uniform in each op's
    range, or at the fixed strength ``magnitude`` in [0, 1] with a random sign for signed ops."""
    op_ids = torch.randint(len(OPS), (n, n_ops), generator=generator)
    u = torch.rand(n, n_ops, generator=generator)
    if magnitude is None:
        return op_ids, _LOW[op_ids] + _SPAN[op_ids] * u
    sign = torch.where(_SIGNED[op_ids] & (u < 0.5), -1.0, 1.0)
    return op_ids, _WEAKEST[op_ids] + magnitude * (_STRONGEST[op_ids] - _WEAKEST[op_ids]) * sign


def cutout(x: Tensor, params: Tensor, size: float) -> Tensor:
    """Gray square per image; ``params`` [n, 3] uniform in [0, 1): centre x, centre y, side."""
    h, w = x.shape[-2:]
    p = to_device(params, x.device)
    half = ((1.0 - p[:, 2]) * size * min(h, w) / 2.0).view(-1, 1, 1)  # side in (0, size * min(h, w)]
    cols = torch.arange(w, device=x.device) + 0.5
    rows = torch.arange(h, device=x.device) + 0.5
    in_x = (cols.view(1, 1, w) - (p[:, 0] * w).view(-1, 1, 1)).abs() < half
    in_y = (rows.view(1, h, 1) - (p[:, 1] * h).view(-1, 1, 1)).abs() < half
    return x.masked_fill_((in_x & in_y).unsqueeze(1), GRAY)


def _to_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0)


def _reflect(index: Tensor, size: int) -> Tensor:
    """Map indices in [-size + 1, 2 * size - 2] into [0, size) like reflect padding (edge not repeated)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


class Normalise:
    """``(x - mean) / std`` per channel, in place, on any device (the constants cached per device);
    shared by the classification and the segmentation views."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if x.device not in self._stats:
            stats = torch.tensor([self.mean, self.std]).view(2, 1, -1, 1, 1)
            self._stats[x.device] = tuple(stats.to(x.device))
        mean, std = self._stats[x.device]
        return x.sub_(mean).div_(std)


class Views:
    """FixMatch's views of uint8 [N, C, H, W] batches as normalised float32 on the same device."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        hflip: bool,
        translate: float = 0.125,
        n_ops: int = 2,
        cutout: float = 0.5,
        magnitude: float | None = None,
    ) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {mean}, {std}")
        if not 0.0 <= translate < 1.0 or n_ops < 0 or not 0.0 <= cutout <= 1.0:
            raise ValueError(
                f"need 0 <= translate < 1, n_ops >= 0, 0 <= cutout <= 1; got {translate}, {n_ops}, {cutout}"
            )
        if magnitude is not None and not 0.0 <= magnitude <= 1.0:
            raise ValueError(f"magnitude must be None (random) or in [0, 1], got {magnitude}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.hflip, self.translate, self.n_ops, self.cutout = hflip, translate, n_ops, cutout
        self.magnitude = magnitude
        self._normalise = Normalise(self.mean, self.std)

    def plain(self, images: Tensor) -> Tensor:
        """Evaluation view: float in [0, 1], then ``(x - mean) / std``."""
        self._check(images)
        return self._normalise(_to_float(images))

    def weak(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Random horizontal flip (if allowed), then a random integer shift with reflect padding."""
        self._check(images)
        return self._normalise(_to_float(self._flip_shift(images, generator)))

    def strong(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Weak view, then ``n_ops`` RandAugment ops per image (magnitude rule above), then Cutout."""
        self._check(images)
        x = _to_float(self._flip_shift(images, generator))
        n = len(x)
        op_ids, magnitudes = sample_ops(n, self.n_ops, generator, self.magnitude)
        cut = torch.rand(n, 3, generator=generator)
        for slot in range(self.n_ops):
            x = apply_ops(x, op_ids[:, slot], magnitudes[:, slot])
        return self._normalise(cutout(x, cut, self.cutout))

    def _flip_shift(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """FixMatch's pad-``translate``-reflect-and-crop as one gather of per-image row/column indices."""
        n, c, h, w = images.shape
        pad_y, pad_x = int(self.translate * h), int(self.translate * w)
        dy = torch.randint(-pad_y, pad_y + 1, (n, 1), generator=generator)
        dx = torch.randint(-pad_x, pad_x + 1, (n, 1), generator=generator)
        rows = _reflect(dy + torch.arange(h), h)
        cols = _reflect(dx + torch.arange(w), w)
        if self.hflip:
            flip = torch.rand(n, 1, generator=generator) < 0.5
            cols = torch.where(flip, w - 1 - cols, cols)
        rows, cols = to_device(torch.cat([rows, cols], 1), images.device).split([h, w], 1)
        index = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(n, 1, h * w).expand(n, c, h * w)
        return images.flatten(2).gather(2, index).view(n, c, h, w)

    def _check(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"expected uint8 [N, {len(self.mean)}, H, W] images, got {images.dtype} {tuple(images.shape)}"
            )
