"""Batched FixMatch views: shapes, determinism, and each op against torchvision's single-image ops."""

import math

import pytest
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torchvision.transforms import InterpolationMode

from trustmatch.data.views import AFFINE, OPS, PIXEL_OPS, Views, apply_op, apply_ops, sample_ops

MEAN = {1: (0.4,), 3: (0.49, 0.48, 0.45)}
STD = {1: (0.3,), 3: (0.25, 0.24, 0.26)}


def _images(n: int = 16, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _views(c: int = 3, **kwargs) -> Views:
    return Views(MEAN[c], STD[c], **{"hflip": True, **kwargs})


@pytest.mark.parametrize("c", [1, 3])
def test_plain_is_scaled_and_normalised(c: int) -> None:
    x = _images(c=c)
    expected = (x.float() / 255 - torch.tensor(MEAN[c]).view(1, c, 1, 1)) / torch.tensor(STD[c]).view(1, c, 1, 1)
    assert torch.allclose(_views(c).plain(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("view", ["weak", "strong"])
def test_views_keep_shape_and_are_float32(c: int, view: str) -> None:
    x = _images(c=c, size=10)
    out = getattr(_views(c), view)(x, _gen())
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("view", ["weak", "strong"])
def test_same_seed_same_views_other_seed_other_views(view: str) -> None:
    x, v = _images(), _views()
    a, b, other = (getattr(v, view)(x, _gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, other)


def test_global_rng_is_untouched() -> None:
    state = torch.get_rng_state()
    _views().strong(_images(), _gen())
    assert torch.equal(state, torch.get_rng_state())


def test_every_image_gets_its_own_strong_view() -> None:
    x = _images(n=1, size=16).expand(64, -1, -1, -1).contiguous()
    out = _views().strong(x, _gen())
    assert len(torch.unique(out.flatten(1), dim=0)) == 64


def test_weak_without_translate_or_flip_is_plain() -> None:
    x = _images()
    v = _views(hflip=False, translate=0.0)
    assert torch.equal(v.weak(x, _gen()), v.plain(x))


def test_weak_flips_only_when_allowed() -> None:
    x = _images(n=64)
    v = _views(hflip=True, translate=0.0)
    out, plain = v.weak(x, _gen()), v.plain(x)
    flipped = (out == plain.flip(-1)).flatten(1).all(1)
    unflipped = (out == plain).flatten(1).all(1)
    assert (flipped | unflipped).all() and flipped.any() and unflipped.any()


@pytest.mark.parametrize("hflip", [False, True])
def test_weak_is_a_reflect_padded_crop(hflip: bool) -> None:
    """Each weak view is one of the (2p+1)^2 crops of the reflect-padded (maybe flipped) image."""
    x = _images(n=32, size=16)
    v = _views(hflip=hflip, translate=0.125)
    out = v.weak(x, _gen())
    plain = v.plain(x)
    sources = [plain, plain.flip(-1)] if hflip else [plain]
    pad, seen = 2, set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for src in sources
            for padded in [nnf.pad(src[i : i + 1], (pad,) * 4, mode="reflect")[0]]
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(padded[:, dy : dy + 16, dx : dx + 16], out[i])
        ]
        assert matches, f"image {i} is not a reflect-padded crop"
        seen.update(matches)
    assert len(seen) > 5  # shifts vary across the batch


def _reference_pixel_op(name: str, image: torch.Tensor, m: float) -> torch.Tensor:
    """torchvision's single-image op with the magnitude meaning given in the views table."""
    return {
        "AutoContrast": lambda: tvf.autocontrast(image),
        "Brightness": lambda: tvf.adjust_brightness(image, m),
        "Color": lambda: tvf.adjust_saturation(image, m),
        "Contrast": lambda: tvf.adjust_contrast(image, m),
        "Equalize": lambda: tvf.equalize(image),
        "Posterize": lambda: tvf.posterize((image * 255).round().to(torch.uint8), int(m)).float() / 255,
        "Sharpness": lambda: tvf.adjust_sharpness(image, m),
        "Solarize": lambda: tvf.solarize(image, m / 255),
    }[name]()


def _magnitudes(name: str, n: int) -> torch.Tensor:
    op = next(op for op in OPS if op.name == name)
    return op.low + (op.high - op.low) * torch.rand(n, generator=_gen(5))


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", sorted(PIXEL_OPS))
def test_pixel_op_matches_torchvision_per_image(name: str, c: int) -> None:
    x = _images(n=6, c=c).float() / 255
    m = _magnitudes(name, len(x))
    out = apply_op(x, name, m)
    for i in range(len(x)):
        expected = _reference_pixel_op(name, x[i], float(m[i]))
        assert torch.allclose(out[i], expected, atol=1e-5, rtol=0), f"{name} image {i} m={float(m[i])}"


def test_posterize_uses_the_floor_of_the_magnitude() -> None:
    x = _images(n=1).float() / 255
    assert torch.equal(apply_op(x, "Posterize", torch.tensor([7.9])), apply_op(x, "Posterize", torch.tensor([7.0])))


def _reference_affine(name: str, image: torch.Tensor, m: float) -> torch.Tensor:
    """torchvision's affine with PIL's conventions (as its RandAugment uses them), nearest, gray fill."""
    nearest = InterpolationMode.NEAREST
    if name == "Rotate":  # counter-clockwise, as PIL (tvf.affine's angle turns clockwise)
        return tvf.rotate(image, m, interpolation=nearest, fill=[0.5])
    h, w = image.shape[-2:]
    shear = math.degrees(math.atan(m))
    kwargs = {
        "ShearX": dict(angle=0.0, translate=[0.0, 0.0], shear=[shear, 0.0], center=[0, 0]),
        "ShearY": dict(angle=0.0, translate=[0.0, 0.0], shear=[0.0, shear], center=[0, 0]),
        "TranslateX": dict(angle=0.0, translate=[-m * w, 0.0], shear=[0.0, 0.0]),
        "TranslateY": dict(angle=0.0, translate=[0.0, -m * h], shear=[0.0, 0.0]),
    }[name]
    return tvf.affine(image, scale=1.0, interpolation=nearest, fill=[0.5], **kwargs)


@pytest.mark.parametrize(("c", "width"), [(1, 32), (3, 32), (3, 20)])
@pytest.mark.parametrize("name", AFFINE)
def test_affine_op_matches_torchvision_per_image(name: str, c: int, width: int) -> None:
    """Nearest sampling may round a rare pixel centre the other way: allow 1 % of pixels to differ."""
    x = _images(n=6, c=c, size=32)[..., :width].float() / 255
    m = _magnitudes(name, len(x))
    out = apply_op(x, name, m)
    for i in range(len(x)):
        expected = _reference_affine(name, x[i], float(m[i]))
        same = (out[i] - expected).abs() < 1e-6
        assert same.float().mean() > 0.99, f"{name} image {i} m={float(m[i])}"


def test_rotation_is_counter_clockwise() -> None:
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 8] = 1.0  # right of the centre
    out = apply_op(x, "Rotate", torch.tensor([90.0]))
    assert out[0, 0, 0, 4] == 1.0  # now above it


def test_apply_ops_equals_op_by_op() -> None:
    """The grouped batch path (subsets per op, one warp for all affine ops) matches one image at a time."""
    x = _images(n=64, size=16).float() / 255
    op_ids, mags = sample_ops(len(x), 1, _gen(3))
    out = apply_ops(x.clone(), op_ids[:, 0], mags[:, 0])
    for i in range(len(x)):
        expected = apply_op(x[i : i + 1], OPS[int(op_ids[i, 0])].name, mags[i : i + 1, 0])
        assert torch.allclose(out[i : i + 1], expected, atol=1e-6, rtol=0)


def test_sampled_ops_cover_the_table_within_ranges() -> None:
    op_ids, mags = sample_ops(2000, 2, _gen())
    assert set(op_ids.unique().tolist()) == set(range(len(OPS)))
    low = torch.tensor([op.low for op in OPS])[op_ids]
    high = torch.tensor([op.high for op in OPS])[op_ids]
    assert ((mags >= low) & (mags <= high)).all()


def test_fixed_magnitude_sits_at_the_same_strength_of_every_range() -> None:
    """M=0: every op at its identity end; M=1: its strongest end (signed ops with either sign)."""
    by_name = {op.name: i for i, op in enumerate(OPS)}
    weakest = {"Brightness": 0.95, "Posterize": 8.0, "Rotate": 0.0, "Solarize": 256.0, "ShearX": 0.0}
    strongest = {"Brightness": 0.05, "Posterize": 4.0, "Rotate": 30.0, "Solarize": 0.0, "ShearX": 0.3}
    for m, expected in ((0.0, weakest), (1.0, strongest)):
        op_ids, mags = sample_ops(3000, 1, _gen(), magnitude=m)
        for name, value in expected.items():
            picked = mags[op_ids == by_name[name]]
            assert picked.abs().unique().tolist() == pytest.approx([value]), (m, name)
    op_ids, mags = sample_ops(3000, 1, _gen(), magnitude=0.5)
    rotations = mags[op_ids == by_name["Rotate"]]
    assert set(rotations.unique().tolist()) == {-15.0, 15.0}
    with pytest.raises(ValueError, match="magnitude"):
        Views((0.5,), (0.25,), hflip=False, magnitude=1.5)


def test_strong_ops_count_is_used() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    none = Views((0.5,) * 3, (0.25,) * 3, hflip=False, translate=0.0, n_ops=0, cutout=0.0)
    assert torch.equal(none.strong(images, _gen()), none.plain(images))
    three = Views((0.5,) * 3, (0.25,) * 3, hflip=False, translate=0.0, n_ops=3, cutout=0.0)
    assert not torch.equal(three.strong(images, _gen()), three.plain(images))


@pytest.mark.parametrize("c", [1, 3])
def test_cutout_fills_one_gray_square_within_bounds(c: int) -> None:
    size, frac = 16, 0.5
    v = _views(c, hflip=False, translate=0.0, n_ops=0, cutout=frac)
    x = _images(n=64, c=c, size=size)
    out = v.strong(x, _gen())
    gray = (0.5 - torch.tensor(MEAN[c]).view(1, c, 1, 1)) / torch.tensor(STD[c]).view(1, c, 1, 1)
    filled = (out - gray).abs() < 1e-6
    changed = out != v.plain(x)
    assert torch.equal(filled.all(1), changed.any(1))  # only gray pixels change, in every channel
    for mask in filled.all(1):
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        if len(rows):
            height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert int(mask.sum()) == height * width  # one rectangle
            assert max(height, width) <= math.ceil(frac * size)
    assert filled.all(1).flatten(1).any(1).float().mean() > 0.8


def test_no_cutout_when_size_is_zero() -> None:
    v = _views(hflip=False, translate=0.0, n_ops=0, cutout=0.0)
    x = _images()
    assert torch.equal(v.strong(x, _gen()), v.plain(x))


def test_rejects_wrong_images() -> None:
    v = _views(3)
    with pytest.raises(ValueError):
        v.plain(_images().float())
    with pytest.raises(ValueError):
        v.weak(_images(c=1), _gen())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_follow_the_cpu_draws_without_syncs() -> None:
    x, v = _images(n=64, size=32), _views()
    x_cuda = x.cuda()
    for view in ("weak", "strong"):
        cpu = getattr(v, view)(x, _gen(7))
        cuda = getattr(v, view)(x_cuda, _gen(7))
        assert cuda.device.type == "cuda"
        torch.cuda.set_sync_debug_mode("error")  # the device never waits for the host
        try:
            again = getattr(v, view)(x_cuda, _gen(7))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(cuda, again)
        assert ((cuda.cpu() - cpu).abs() < 1e-4).float().mean() > 0.99
