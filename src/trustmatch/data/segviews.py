"""UniMatch's training views for segmentation: joint image/mask crops, strong colour views, CutMix boxes.

The geometric part (rescale, pad, crop, flip) must move image and mask together and differs in size
per image, so it runs per sample on the CPU (optionally in decode threads) with transforms v2 on
``tv_tensors.Image`` / ``tv_tensors.Mask``. The photometric part runs on the whole batch of
equal-size crops on the training device, like the classification ``Views``.

All randomness comes from a caller-owned CPU ``torch.Generator``, drawn in the calling thread in a
fixed amount per sample, so the same generator state gives the same views wherever they are applied
(threads or not) and runs resume bit-exactly.

Choices against UniMatch (``dataset/transform.py``, ``dataset/semi.py``):

- the long side is ``round(scale * long side)`` with ``scale ~ U(scale range)``, not an integer
  ``randint`` between the rounded ends (the same distribution up to one pixel);
- masks use ``NEAREST_EXACT`` (pixel-centre nearest, as PIL's ``NEAREST`` that UniMatch uses);
  torch's legacy ``NEAREST`` shifts labels by up to one source pixel against the bilinear image;
- the strong view works in float without rounding to uint8 between ops; ColorJitter applies its
  four ops in a random order *per image* (torchvision draws one order per call, i.e. per image in
  UniMatch, so this is the same distribution);
- the blur is a Gaussian truncated at ``ceil(3 * 2.0) = 6`` pixels with reflect padding (torchvision's
  ``gaussian_blur``), where PIL's ``GaussianBlur(radius=sigma)`` approximates the same Gaussian with
  three box blurs and extends edge pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from trustmatch.core.errors import UserError
from trustmatch.core.labels import IGNORE
from trustmatch.data.seg_sets import SegmentationSet
from trustmatch.data.views import Normalise, adjust_brightness, adjust_contrast, adjust_saturation, to_device

JITTER = (0.5, 0.5, 0.5, 0.25)  # ColorJitter brightness, contrast, saturation, hue (UniMatch)
MILD_JITTER = (0.2, 0.2, 0.2, 0.2)  # CSL's Trusted Mask Perturbation view
P_JITTER, P_GRAY, P_BLUR, P_CUTMIX, P_MILD = 0.8, 0.2, 0.5, 0.5, 0.5
SIGMA = (0.1, 2.0)
BLUR_RADIUS = math.ceil(3 * SIGMA[1])  # kernel taps: 2 * 6 + 1
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_RATIO = (0.3, 1 / 0.3)


class StrongParams(NamedTuple):
    """Per-image parameters of the strong view (CPU tensors, first dimension = batch)."""

    jitter: Tensor  # bool: colour jitter applied
    factors: Tensor  # [n, 4] brightness, contrast, saturation factors in [0.5, 1.5], hue shift in [-0.25, 0.25]
    order: Tensor  # [n, 4] a permutation of the _JITTER_FNS indices: the order the jitter ops run in
    gray: Tensor  # bool: converted to grayscale (3 equal channels)
    blur: Tensor  # bool: blurred
    sigma: Tensor  # blur sigma in SIGMA


class Crops(NamedTuple):
    images: Tensor  # uint8 [B, 3, c, c]
    masks: Tensor  # uint8 [B, c, c]: class ids, or 0 on image / 255 on padding for unlabeled images
    truth: Tensor | None  # uint8 [B, c, c]: known true masks of unlabeled images (diagnostics only)


def strong_params(
    n: int, generator: torch.Generator, jitter: tuple[float, ...] = JITTER, p_gray: float = P_GRAY
) -> StrongParams:
    """Draw a batch's photometric parameters: always ``n * 12`` uniforms, so the stream stays aligned.
    ``jitter`` / ``p_gray``: UniMatch's strong view by default, CSL's mild view with MILD_JITTER and 0."""
    r = torch.rand(n, 12, generator=generator)
    span = torch.tensor(jitter)
    low = torch.tensor([1.0, 1.0, 1.0, 0.0]) - span
    return StrongParams(
        jitter=r[:, 0] < P_JITTER,
        factors=low + 2 * span * r[:, 1:5],
        order=r[:, 5:9].argsort(dim=1),
        gray=r[:, 9] < p_gray,
        blur=r[:, 10] < P_BLUR,
        sigma=SIGMA[0] + (SIGMA[1] - SIGMA[0]) * r[:, 11],
    )


def resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """UniMatch's resize: the long side becomes ``round(scale * long)``, the short side keeps the aspect."""
    long = max(1, int(scale * max(height, width) + 0.5))
    if height > width:
        return long, max(1, int(width * long / height + 0.5))
    return max(1, int(height * long / width + 0.5)), long


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of each image by ``shift`` (turns). V and chroma are kept, so only the hue is
    computed; the way back is ``v - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6``."""
    r, g, b = x.unbind(1)
    v, low = x.amax(dim=1), x.amin(dim=1)
    chroma = v - low
    safe = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(
        v == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = hue / 6.0 + shift.view(-1, 1, 1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (v.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Apply the four jitter ops to float images in [0, 1], image i in the order ``order[i]`` (CPU tensors).

    Each (slot, op) pair runs once on the images that put that op in that slot, so every image goes
    through each op exactly once; indices and factors reach the device in one transfer. ``x`` is updated in place.
    """
    groups = [(slot, op, (order[:, slot] == op).nonzero().squeeze(1)) for slot in range(4) for op in range(4)]
    groups = [(slot, op, idx) for slot, op, idx in groups if len(idx)]
    if not groups:
        return x
    idx_all = torch.cat([idx for _, _, idx in groups])
    fac_all = torch.cat([factors[idx, op] for _, op, idx in groups])
    sizes = [len(idx) for _, _, idx in groups]
    on_device = to_device(torch.stack([idx_all.float(), fac_all]), x.device).split(sizes, dim=1)
    for (_, op, _), part in zip(groups, on_device):
        idx = part[0].long()
        x.index_copy_(0, idx, _JITTER_FNS[op](x.index_select(0, idx), part[1]))
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = BLUR_RADIUS) -> Tensor:
    """Blur image i of float ``x`` [B, C, H, W] with sigma ``sigma[i]`` (CPU): a separable kernel of
    ``2 * radius + 1`` taps per image, reflect padding, one grouped conv per direction for the batch."""
    b, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernel = to_device(kernel / kernel.sum(dim=1, keepdim=True), x.device).repeat_interleave(c, dim=0)
    padded = nnf.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    rows = nnf.conv2d(padded, kernel.view(b * c, 1, 1, -1), groups=b * c)
    return nnf.conv2d(rows, kernel.view(b * c, 1, -1, 1), groups=b * c).view(b, c, h, w)


def _subset(x: Tensor, keep: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Replace the images where the CPU bool ``keep`` is set by ``fn(those images, their CPU indices)``."""
    idx = keep.nonzero().squeeze(1)
    if len(idx):
        device_idx = to_device(idx, x.device)
        x.index_copy_(0, device_idx, fn(x.index_select(0, device_idx), idx))
    return x


def _photometric(x: Tensor, p: StrongParams) -> Tensor:
    """Jitter, grayscale and blur float images in [0, 1] as ``p`` says (one row of ``p`` per image)."""
    x = _subset(x, p.jitter, lambda sub, idx: color_jitter(sub, p.factors[idx], p.order[idx]))
    x = _subset(x, p.gray, lambda sub, idx: tvf.rgb_to_grayscale(sub, num_output_channels=3))
    return _subset(x, p.blur, lambda sub, idx: gaussian_blur(sub, p.sigma[idx]))


class SegViews:
    """UniMatch's views of image/mask pairs: ``crops`` (joint geometry) feed ``plain`` / ``strong``."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crop_size: int,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values (RGB) and std > 0, got {mean}, {std}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be a range 0 < low <= high, got {scale}")
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
            raise UserError(f"data.crop_size must be a positive integer (e.g. 321), got {crop_size!r}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_size, self.scale, self.hflip = crop_size, (float(scale[0]), float(scale[1])), hflip
        self._normalise = Normalise(self.mean, self.std)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_workers = 0

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """Per-sample geometry [n, 4] (scale, u, v, flip), independent of image sizes: draw here, apply anywhere."""
        r = torch.rand(n, 4, generator=generator)
        low, high = self.scale
        scale = low + (high - low) * r[:, 0]
        flip = (r[:, 3] < 0.5).float() if self.hflip else torch.zeros(n)
        return torch.stack([scale, r[:, 1], r[:, 2], flip], dim=1)

    def geometric(self, image: Tensor, mask: Tensor | None, params: Tensor) -> tuple[Tensor, Tensor]:
        """Rescale (bilinear + antialias / pixel-centre nearest), pad right/bottom to the crop (image 0,
        mask 255), crop at ``floor(u * (H' - c + 1)), floor(v * (W' - c + 1))``, flip. Without a mask the
        returned mask is 0 on image pixels and 255 on padding (UniMatch's ignore mask for unlabeled images)."""
        img, masks = self._geometric(image, None if mask is None else mask[None], params)
        return img, masks[0]

    def _geometric(self, image: Tensor, masks: Tensor | None, params: Tensor) -> tuple[Tensor, Tensor]:
        """``geometric`` for several masks [M, H, W] of one image at once (the image resized once);
        None: one all-zero mask."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
        h, w = image.shape[1:]
        if masks is not None and tuple(masks.shape[1:]) != (h, w):
            raise ValueError(f"mask {tuple(masks.shape[1:])} does not match image {(h, w)}")
        scale, u, v, flip = params.tolist()
        size = list(resized_size(h, w, scale))
        img = tvf.resize(tv_tensors.Image(image), size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if masks is None:
            lab = tv_tensors.Mask(torch.zeros([1, *size], dtype=torch.uint8))
        else:
            # resize_image, not resize: torchvision 0.26 (seen on a GPU machine) resizes a Mask with NEAREST
            # whatever is asked, half a pixel off the image; the image kernel honours NEAREST_EXACT everywhere
            lab = tv_tensors.Mask(tvf.resize_image(masks, size, interpolation=InterpolationMode.NEAREST_EXACT))
        c = self.crop_size
        pad_h, pad_w = max(c - size[0], 0), max(c - size[1], 0)
        if pad_h or pad_w:
            img = tvf.pad(img, [0, 0, pad_w, pad_h], fill=0)
            lab = tvf.pad(lab, [0, 0, pad_w, pad_h], fill=IGNORE)
        top, left = int(u * (size[0] + pad_h - c + 1)), int(v * (size[1] + pad_w - c + 1))
        img, lab = tvf.crop(img, top, left, c, c), tvf.crop(lab, top, left, c, c)
        if flip >= 0.5:
            img, lab = tvf.horizontal_flip(img), tvf.horizontal_flip(lab)
        return img.as_subclass(Tensor).contiguous(), lab.as_subclass(Tensor).contiguous()

    def crops(self, dataset: SegmentationSet, indices: Tensor, generator: torch.Generator, workers: int = 0) -> Crops:
        """Load and crop ``dataset[indices]``: uint8 [B, 3, c, c] images, [B, c, c] masks and, where the
        set knows an unlabeled image's true mask, those crops too (diagnostics), on the CPU (pinned when
        CUDA is available). Parameters are drawn here, so ``workers`` never changes the result."""
        ids = torch.as_tensor(indices).tolist()
        params = self.draw(len(ids), generator)

        def one(i: int, p: Tensor) -> tuple[Tensor, ...]:
            image, mask = dataset.load(i)
            truth = dataset.truth(i)
            if truth is None:
                return self.geometric(image, mask, p)
            padding = torch.zeros_like(truth) if mask is None else mask  # 0 on the image, 255 once padded
            img, masks = self._geometric(image, torch.stack([padding, truth]), p)  # one resize of the image
            return img, masks[0], masks[1]

        if workers > 0:
            parts = list(self._executor(workers).map(one, ids, params))
        else:
            parts = [one(i, p) for i, p in zip(ids, params)]
        c, pin = self.crop_size, torch.cuda.is_available()
        images = torch.empty((len(ids), 3, c, c), dtype=torch.uint8, pin_memory=pin)
        masks = torch.empty((len(ids), c, c), dtype=torch.uint8, pin_memory=pin)
        torch.stack([p[0] for p in parts], out=images)
        torch.stack([p[1] for p in parts], out=masks)
        truth = torch.stack([p[2] for p in parts]) if parts and all(len(p) == 3 for p in parts) else None
        return Crops(images, masks, truth)

    def load(
        self, dataset: SegmentationSet, indices: list[int], workers: int = 0
    ) -> list[tuple[Tensor, Tensor | None]]:
        """``dataset.load`` of each index, in order; in the pool's threads when ``workers`` > 0, so that
        evaluation decodes large files while the device works on the previous ones."""
        if workers > 0:
            return list(self._executor(workers).map(dataset.load, indices))
        return [dataset.load(i) for i in indices]

    def plain(self, images: Tensor) -> Tensor:
        """Float in [0, 1], then ``(x - mean) / std``, on the images' device."""
        self._check(images)
        return self._normalise(images.float().div_(255.0))

    def strong(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """UniMatch's strong view per image: ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8 (ops in a random
        order per image), grayscale with p 0.2, Gaussian blur sigma U(0.1, 2) with p 0.5; then normalised."""
        self._check(images)
        return self._normalise(_photometric(images.float().div_(255.0), strong_params(len(images), generator)))

    def trusted_mask_view(
        self, images: Tensor, generator: torch.Generator, cell: int, cover: float
    ) -> tuple[Tensor, Tensor]:
        """CSL's Trusted Mask Perturbation view and its cover mask (bool [B, c, c]).

        Per image, with p 1/2: the mild view (ColorJitter(0.2, 0.2, 0.2, 0.2) p 0.8, blur p 0.5, no
        grayscale) and a cover grid of ``round(c / cell)``^2 cells, each on with p ``cover``, resized
        nearest to the crop; otherwise the strong view and an empty cover. No CutMix: the view's target
        is the weak view's own pseudo-label. The step hides the covered pixels that CSL trusts."""
        self._check(images)
        n, c = len(images), self.crop_size
        grid = max(1, round(c / cell))
        mild = torch.rand(n, generator=generator) < P_MILD
        cells = (torch.rand(n, 1, grid, grid, generator=generator) < cover) & mild.view(-1, 1, 1, 1)
        x = images.float().div_(255.0)
        soft = strong_params(int(mild.sum()), generator, MILD_JITTER, 0.0)
        hard = strong_params(n - len(soft.jitter), generator)
        x = _subset(x, mild, lambda sub, idx: _photometric(sub, soft))
        x = _subset(x, ~mild, lambda sub, idx: _photometric(sub, hard))
        covered = nnf.interpolate(to_device(cells.float(), x.device), size=(c, c), mode="nearest-exact")
        return self._normalise(x), covered.squeeze(1) > 0.5

    def cutmix_boxes(self, n: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
        """UniMatch's ``obtain_cutmix_box`` per image as bool [n, c, c]: with p 0.5 a box of area
        ``U(0.02, 0.4) * c * c``, aspect ``h / w = ratio ~ U(0.3, 1 / 0.3)`` (``w = int(sqrt(area / ratio))``,
        ``h = int(sqrt(area * ratio))``) at a uniform top-left, redrawing ratio and corner together until the
        box fits (UniMatch's loop; 16 candidates per image per round), else empty."""
        c = self.crop_size
        box = torch.rand(n, 2, generator=generator)
        area = (CUTMIX_AREA[0] + (CUTMIX_AREA[1] - CUTMIX_AREA[0]) * box[:, 1]) * c * c
        geometry = torch.zeros(n, 4, dtype=torch.long)  # y, x, h, w
        pending = (box[:, 0] < P_CUTMIX).nonzero().squeeze(1)
        while len(pending):
            ratio = CUTMIX_RATIO[0] + (CUTMIX_RATIO[1] - CUTMIX_RATIO[0]) * torch.rand(
                len(pending), 16, generator=generator, dtype=torch.float64
            )
            corner = torch.randint(0, c, (len(pending), 16, 2), generator=generator)
            a = area[pending].double().view(-1, 1)
            h, w = torch.sqrt(a * ratio).long(), torch.sqrt(a / ratio).long()
            fits = (corner[..., 0] + h <= c) & (corner[..., 1] + w <= c)
            done = fits.any(dim=1)
            first = fits.int().argmax(dim=1)[done].view(-1, 1)  # the first candidate that fits
            rows = pending[done]
            geometry[rows, :2] = corner[done].gather(1, first.unsqueeze(2).expand(-1, 1, 2)).squeeze(1)
            geometry[rows, 2] = h[done].gather(1, first).squeeze(1)
            geometry[rows, 3] = w[done].gather(1, first).squeeze(1)
            pending = pending[~done]
        y, x, h, w = to_device(geometry, torch.device(device)).view(n, 4, 1, 1).unbind(1)
        span = torch.arange(c, device=device)
        in_rows = (span.view(1, c, 1) >= y) & (span.view(1, c, 1) < y + h)
        in_cols = (span.view(1, 1, c) >= x) & (span.view(1, 1, c) < x + w)
        return in_rows & in_cols

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        """One pool kept for the object's life (threads are reused across batches); resized on demand."""
        if self._pool is None or self._pool_workers != workers:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._pool_workers = ThreadPoolExecutor(workers, thread_name_prefix="segviews"), workers
        return self._pool

    def _check(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
