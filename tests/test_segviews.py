"""UniMatch views for segmentation: joint geometry against PIL / hand indexing, strong view, CutMix boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvf
from PIL import Image

from trustmatch.core.errors import UserError
from trustmatch.data.segviews import (
    SegViews,
    adjust_hue,
    color_jitter,
    gaussian_blur,
    strong_params,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_gen(seed))


def _mask(h: int, w: int, seed: int = 0, classes: int = 21) -> torch.Tensor:
    return torch.randint(0, classes, (h, w), dtype=torch.uint8, generator=_gen(seed + 1))


class _Set:
    """Stand-in for SegmentationSet: images of varying sizes, masks or none."""

    def __init__(self, n: int, has_masks: bool) -> None:
        self.n, self.has_masks = n, has_masks

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, w = 20 + 7 * i, 50 - 3 * i
        return _image(h, w, i), (_mask(h, w, i) if self.has_masks else None)

    def truth(self, i: int) -> torch.Tensor | None:
        """Unlabeled images whose true masks are known (generated scenes), for diagnostics."""
        return None if self.has_masks else _mask(20 + 7 * i, 50 - 3 * i, i)


def _size(h: int, w: int, scale: float) -> tuple[int, int]:
    long = int(scale * max(h, w) + 0.5)
    return (long, int(w * long / h + 0.5)) if h > w else (int(h * long / w + 0.5), long)


def _nearest(out: int, n: int) -> torch.Tensor:
    """Pixel-centre nearest source index, in float32 as torch computes it."""
    step = torch.tensor(n / out, dtype=torch.float32)
    return ((torch.arange(out, dtype=torch.float32) + 0.5) * step).floor().long().clamp(max=n - 1)


def _reference(image: torch.Tensor, mask: torch.Tensor, p: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL bilinear for the image, hand indexing for the mask, numpy pad / crop / flip."""
    scale, u, v, flip = p.tolist()
    h, w = mask.shape
    nh, nw = _size(h, w, scale)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((nw, nh), Image.BILINEAR)
    img = np.zeros((max(nh, c), max(nw, c), 3), np.uint8)
    img[:nh, :nw] = np.asarray(pil)
    lab = np.full((max(nh, c), max(nw, c)), 255, np.uint8)
    lab[:nh, :nw] = mask[_nearest(nh, h)][:, _nearest(nw, w)].numpy()
    top, left = int(u * (img.shape[0] - c + 1)), int(v * (img.shape[1] - c + 1))
    img, lab = img[top : top + c, left : left + c], lab[top : top + c, left : left + c]
    if flip:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return torch.from_numpy(img.copy()).permute(2, 0, 1), torch.from_numpy(lab.copy())


def _params(n: int, seed: int = 0) -> torch.Tensor:
    """Random params plus the extreme scales and corner offsets."""
    p = SegViews(MEAN, STD, 8).draw(n, _gen(seed))
    p[0, 0], p[1, 0], p[2, 0] = 0.5, 2.0, 1.0
    p[3, 1:3] = 0.9999
    return p


def test_draw_ranges_and_determinism() -> None:
    v = SegViews(MEAN, STD, 32, scale=(0.75, 1.5))
    p = v.draw(500, _gen(3))
    assert p.shape == (500, 4) and p.dtype == torch.float32
    assert (p[:, 0] >= 0.75).all() and (p[:, 0] <= 1.5).all()
    assert ((p[:, 1:3] >= 0) & (p[:, 1:3] < 1)).all()
    assert set(p[:, 3].tolist()) == {0.0, 1.0}
    assert torch.equal(p, v.draw(500, _gen(3)))
    assert (SegViews(MEAN, STD, 32, hflip=False).draw(100, _gen(3))[:, 3] == 0).all()


@pytest.mark.parametrize("shape", [(30, 45), (47, 23), (33, 33)])
def test_geometric_matches_pil_and_hand_indexing(shape: tuple[int, int]) -> None:
    c, (h, w) = 32, shape
    v = SegViews(MEAN, STD, c)
    image, mask = _image(h, w), _mask(h, w)
    for p in _params(24):
        out_img, out_mask = v.geometric(image, mask, p)
        ref_img, ref_mask = _reference(image, mask, p, c)
        assert out_img.shape == (3, c, c) and out_mask.shape == (c, c)
        assert out_img.dtype == out_mask.dtype == torch.uint8
        assert out_img.is_contiguous() and out_mask.is_contiguous()
        assert torch.equal(out_mask, ref_mask)
        assert (out_img.int() - ref_img.int()).abs().max() <= 2  # torch's antialiased bilinear vs PIL


def test_geometric_keeps_image_and_mask_aligned() -> None:
    """Blocks of 6x6 pixels whose colour encodes their class: away from block edges (where bilinear
    blends neighbours) every labelled pixel must show its class's colour."""
    classes = torch.randint(0, 20, (8, 10), generator=_gen(1), dtype=torch.uint8)
    mask = classes.repeat_interleave(6, 0).repeat_interleave(6, 1)  # [48, 60]
    palette = torch.stack([torch.arange(20) * 12, 250 - torch.arange(20) * 11, (torch.arange(20) * 37) % 256], 1)
    image = palette[mask.long()].permute(2, 0, 1).to(torch.uint8).contiguous()
    v = SegViews(MEAN, STD, 40)
    checked = 0
    for p in _params(40, seed=2):
        out_img, out_mask = v.geometric(image, mask, p)
        labelled = out_mask != 255
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {255}
        # pixels whose 3x3 mask neighbourhood is one class (outside the crop counts as another class): for
        # scales in [0.5, 2] the bilinear (antialiased) support of such a pixel lies inside its block
        padded = torch.nn.functional.pad(out_mask.float()[None, None], (1, 1, 1, 1), value=-1.0)
        windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)[0, 0]
        interior = (windows.amax((-1, -2)) == windows.amin((-1, -2))) & labelled
        expected = palette[out_mask.long().clamp(max=19)].permute(2, 0, 1)
        assert ((out_img.int() - expected).abs().amax(0)[interior] <= 1).all()
        checked += interior.sum().item()
        assert labelled.any()
    assert checked > 0.3 * 40 * 40 * 40


def test_padding_is_ignore_in_mask_and_black_in_image() -> None:
    c, (h, w) = 48, (30, 40)
    v = SegViews(MEAN, STD, c)
    image, mask = _image(h, w) | 1, _mask(h, w)  # no zero pixel in the image, no 255 in the mask
    nh, nw = _size(h, w, 0.5)
    for flip in (0.0, 1.0):
        out_img, out_mask = v.geometric(image, mask, torch.tensor([0.5, 0.3, 0.7, flip]))
        pad = torch.ones(c, c, dtype=torch.bool)
        pad[:nh, :nw] = False
        if flip:
            pad = pad.flip(-1)
        assert torch.equal(out_mask == 255, pad)
        assert (out_img[:, pad] == 0).all() and (out_img[:, ~pad] > 0).all()


@pytest.mark.parametrize("labeled", [True, False])
def test_flip_is_torch_flip(labeled: bool) -> None:
    v = SegViews(MEAN, STD, 32)
    image, mask = _image(41, 29), (_mask(41, 29) if labeled else None)
    for p in _params(10, seed=4):
        p0, p1 = p.clone(), p.clone()
        p0[3], p1[3] = 0.0, 1.0
        a, b = v.geometric(image, mask, p0), v.geometric(image, mask, p1)
        assert torch.equal(b[0], torch.flip(a[0], [-1])) and torch.equal(b[1], torch.flip(a[1], [-1]))


def test_unlabeled_ignore_mask_marks_exactly_the_padding() -> None:
    c, (h, w) = 36, (25, 50)
    v = SegViews(MEAN, STD, c)
    image = _image(h, w)
    for p in _params(30, seed=5):
        scale, u, vv, flip = p.tolist()
        nh, nw = _size(h, w, scale)
        top, left = int(u * (max(nh, c) - c + 1)), int(vv * (max(nw, c) - c + 1))
        rows = torch.arange(c).view(c, 1) + top
        cols = torch.arange(c).view(1, c) + left
        pad = (rows >= nh) | (cols >= nw)
        if flip:
            pad = pad.flip(-1)
        out_img, out_mask = v.geometric(image, None, p)
        assert set(out_mask.unique().tolist()) <= {0, 255}
        assert torch.equal(out_mask == 255, pad)
        assert torch.equal(out_img, v.geometric(image, torch.zeros(h, w, dtype=torch.uint8), p)[0])


@pytest.mark.parametrize("has_masks", [True, False])
def test_crops_are_deterministic_and_thread_independent(has_masks: bool) -> None:
    data, v = _Set(6, has_masks), SegViews(MEAN, STD, 24)
    indices = torch.tensor([3, 0, 5, 1, 1, 4])
    g0, g1 = _gen(7), _gen(7)
    main = v.crops(data, indices, g0)
    threaded = v.crops(data, indices, g1, workers=3)
    assert main[0].shape == (6, 3, 24, 24) and main[1].shape == (6, 24, 24)
    assert main[0].dtype == main[1].dtype == torch.uint8
    assert torch.equal(main[0], threaded[0]) and torch.equal(main[1], threaded[1])
    assert torch.equal(g0.get_state(), g1.get_state())
    params = v.draw(6, _gen(7))
    for k, (i, p) in enumerate(zip(indices.tolist(), params)):
        img, mask = v.geometric(*data.load(i), p)
        assert torch.equal(main[0][k], img) and torch.equal(main[1][k], mask)
    again = v.crops(data, indices, _gen(7), workers=2)  # the pool is resized, the result is not
    assert torch.equal(again[0], main[0]) and torch.equal(again[1], main[1])
    if has_masks:
        assert main.truth is None
    else:  # the known true masks get the image's own crop; the mask stays the padding mask
        assert torch.equal(main.truth, threaded.truth) and set(main.masks.unique().tolist()) <= {0, 255}
        for k, (i, p) in enumerate(zip(indices.tolist(), params)):
            assert torch.equal(main.truth[k], v.geometric(data.load(i)[0], data.truth(i), p)[1])


def test_plain_is_scaled_and_normalised() -> None:
    x = torch.randint(0, 256, (4, 3, 9, 9), dtype=torch.uint8, generator=_gen())
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(SegViews(MEAN, STD, 9).plain(x), ref, atol=1e-6, rtol=0)


def test_strong_is_deterministic_in_range_and_gray_where_drawn() -> None:
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=_gen())
    v = SegViews(MEAN, STD, 16)
    state = torch.get_rng_state()
    a, b, other = v.strong(x, _gen(1)), v.strong(x, _gen(1)), v.strong(x, _gen(2))
    assert torch.equal(state, torch.get_rng_state())
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, other)
    raw = a * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    gray = strong_params(64, _gen(1)).gray
    spread = (raw.amax(1) - raw.amin(1)).flatten(1).amax(1)
    assert 0 < gray.sum() < 64
    assert (spread[gray] < 1e-5).all() and (spread[~gray] > 1e-3).all()


def test_color_jitter_matches_torchvision_per_image() -> None:
    x = torch.rand(6, 3, 12, 12, generator=_gen(3))
    x[0, :, :4] = 0.5  # gray pixels: no chroma
    p = strong_params(6, _gen(4))
    out = color_jitter(x.clone(), p.factors, p.order)
    fns = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)
    for i in range(6):
        ref = x[i]
        for op in p.order[i].tolist():
            ref = fns[op](ref, p.factors[i, op].item())
        assert torch.allclose(out[i], ref, atol=1e-5, rtol=0)


def test_hue_matches_torchvision() -> None:
    x = torch.rand(9, 3, 10, 10, generator=_gen(5))
    x[:, :, 0, :3] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # pure primaries, ties of max
    x[:, :, 1, :2] = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    shifts = torch.linspace(-0.25, 0.25, 9)
    out = adjust_hue(x, shifts)
    for i in range(9):
        assert torch.allclose(out[i], tvf.adjust_hue(x[i], shifts[i].item()), atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision() -> None:
    x = torch.rand(3, 3, 20, 17, generator=_gen(6))
    sigma = torch.tensor([0.1, 1.3, 2.0])
    out = gaussian_blur(x, sigma)
    for i in range(3):
        s = sigma[i].item()
        assert torch.allclose(out[i], tvf.gaussian_blur(x[i], [13, 13], [s, s]), atol=1e-5, rtol=0)
    small = torch.rand(1, 3, 5, 7, generator=_gen(7))  # radius clipped to fit reflect padding
    ref = tvf.gaussian_blur(small[0], [9, 9], [1.5, 1.5])
    assert torch.allclose(gaussian_blur(small, torch.tensor([1.5]))[0], ref, atol=1e-5, rtol=0)


def test_cutmix_boxes() -> None:
    n, c = 2000, 100
    v = SegViews(MEAN, STD, c)
    boxes = v.cutmix_boxes(n, _gen(8), "cpu")
    assert boxes.shape == (n, c, c) and boxes.dtype == torch.bool
    assert torch.equal(boxes, v.cutmix_boxes(n, _gen(8), "cpu"))
    area = boxes.flatten(1).sum(1)
    empty = area == 0
    assert 0.46 < empty.float().mean() < 0.54
    rows, cols = boxes.any(2)[~empty], boxes.any(1)[~empty]
    h, w = rows.sum(1).double(), cols.sum(1).double()
    assert torch.equal(area[~empty].double(), h * w)  # a full rectangle, never clipped
    # w = int(sqrt(A / r)), h = int(sqrt(A * r)) with A in [0.02, 0.4] c^2, r in [0.3, 1 / 0.3]
    assert (h * w <= 0.4 * c * c).all() and ((h + 1) * (w + 1) > 0.02 * c * c).all()
    assert ((h + 1) / w >= 0.3).all() and (h / (w + 1) <= 1 / 0.3).all()
    assert (h > 1.5 * w).any() and (w > 1.5 * h).any()
    frac = h * w / (c * c)
    assert frac.min() < 0.05 and frac.max() > 0.3


def test_bad_crop_size_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.crop_size"):
        SegViews(MEAN, STD, 0)
