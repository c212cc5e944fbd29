"""Segmentation networks (perturbation, encoder/head split, float32 logits, odd sizes, ImageNet weights or
one line saying why not) and sliding-window inference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trustmatch.core.errors import UserError
from trustmatch.core.precision import Precision
from trustmatch.evaluation.forward import _window_starts, segment
from trustmatch.models import MODELS, SEGMENTATION_MODELS, Output, build_model

NETS = ["segnet_small", "deeplabv3plus_r50", "deeplabv3plus_r50_deepstem"]
K = 4


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    """One of each (a ResNet-50 takes a second to build), tests put them in the mode they need."""
    torch.manual_seed(0)
    return {name: build_model(name, K, 3, bn_momentum=0.1) for name in NETS}


def test_registered_with_uniform_factory_keywords() -> None:
    assert set(SEGMENTATION_MODELS) == {
        "segnet_small",
        "deeplabv3plus_r50",
        "deeplabv3plus_r101",
        "deeplabv3plus_r50_deepstem",
        "deeplabv3plus_r101_deepstem",
    }
    assert set(SEGMENTATION_MODELS) <= set(MODELS.names())
    model = build_model("segnet_small", K, 3, 0.1, 0.0, output_stride=16)
    assert model(torch.randn(1, 3, 16, 16)).logits.shape == (1, K, 16, 16)
    with pytest.raises(UserError, match="segnet_small has no ImageNet weights; use model.weights=none"):
        build_model("segnet_small", K, 3, weights="imagenet")


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("size", [(64, 64), (65, 97)])
def test_shapes_with_and_without_perturb(nets: dict[str, nn.Module], name: str, size: tuple[int, int]) -> None:
    model = nets[name].train()
    x = torch.randn(3, 3, *size)
    out = model(x)
    assert isinstance(out, Output) and out.logits.shape == (3, K, *size) and out.features.ndim == 2
    assert len(out.features) == 3
    perturbed = model(x, perturb=True)
    assert perturbed.logits.shape == (6, K, *size) and perturbed.features.shape == out.features.shape


@pytest.mark.parametrize("name", NETS)
def test_perturbed_half_differs_and_features_are_clean(nets: dict[str, nn.Module], name: str) -> None:
    model = nets[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.train()
        plain, perturbed = model(x), model(x, perturb=True)
        clean, dropped = perturbed.logits.chunk(2)
        assert (clean - dropped).abs().mean() > 1e-3
        torch.testing.assert_close(perturbed.features, plain.features)  # same encoder batch: same features
        model.eval()  # no dropout, running statistics: the perturbed half is the clean one
        plain, perturbed = model(x), model(x, perturb=True)
        torch.testing.assert_close(perturbed.logits, torch.cat([plain.logits, plain.logits]))


@pytest.mark.parametrize("name", NETS)
def test_encoder_and_head_partition_the_parameters(nets: dict[str, nn.Module], name: str) -> None:
    model = nets[name]
    encoder = {id(p) for p in model.encoder.parameters()}
    head = {id(p) for p in model.head.parameters()}
    assert encoder and head and not encoder & head
    assert encoder | head == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", NETS)
def test_float32_logits_under_bf16_autocast(nets: dict[str, nn.Module], name: str) -> None:
    model = nets[name].train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last), perturb=True)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (4, K, 48, 48)
    out.logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()


def test_small_net_is_channels_last_and_bn_momentum_everywhere() -> None:
    model = build_model("segnet_small", K, 3, bn_momentum=0.03)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.03 for m in norms)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["deeplabv3plus_r50", "deeplabv3plus_r50_deepstem"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_output_stride_and_bn_momentum(name: str, output_stride: int) -> None:
    model = build_model(name, K, 3, bn_momentum=0.02, output_stride=output_stride).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 3, 64, 64))
        assert features[-1].shape[-1] == 64 // output_stride
        assert model(torch.randn(1, 3, 50, 70)).logits.shape == (1, K, 50, 70)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.02 for m in norms)
    # UniMatch's ASPP: rates 6/12/18 at stride 16, 12/24/36 at 8; no dropout in the decoder
    dilations = {c.dilation[0] for c in model.head.modules() if isinstance(c, nn.Conv2d)} - {1}
    assert dilations == ({6, 12, 18} if output_stride == 16 else {12, 24, 36})
    assert all(d.p == 0 for d in model.head.modules() if isinstance(d, nn.Dropout))
    with pytest.raises(ValueError, match="output_stride"):
        build_model(name, K, 3, output_stride=32)


def test_deeplab_r101_builds_and_runs() -> None:
    model = build_model("deeplabv3plus_r101", K, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 33)).logits.shape == (1, K, 33, 33)


def _fail_fetch(*args: object, **kwargs: object) -> str:
    raise OSError("no network in this test")


def test_imagenet_fetch_failure_is_one_line_not_random_init(monkeypatch: pytest.MonkeyPatch) -> None:
    import segmentation_models_pytorch.encoders as smp_encoders

    monkeypatch.setattr(smp_encoders, "hf_hub_download", _fail_fetch)
    with pytest.raises(UserError, match="ImageNet weights of smp encoder 'resnet50' are not in the Hugging Face cache"):
        build_model("deeplabv3plus_r50", K, 3, weights="imagenet")


def test_imagenet_weights_are_loaded_when_fetched(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import segmentation_models_pytorch.encoders as smp_encoders

    reference = smp_encoders.get_encoder("resnet50", weights=None)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    monkeypatch.setattr(smp_encoders, "hf_hub_download", lambda *args, **kwargs: str(weights))
    model = build_model("deeplabv3plus_r50", K, 3, weights="imagenet")
    torch.testing.assert_close(model.encoder.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.encoder.layer4[0].conv2.weight, reference.layer4[0].conv2.weight)


class _PixelNet(nn.Module):
    """A 1x1 conv: each pixel's logits depend on that pixel only, so windows must reproduce the whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> Output:
        self.sizes.append(tuple(x.shape[-2:]))
        return Output(self.conv(x), x.mean(dim=(2, 3)))


PRECISION = Precision(torch.device("cpu"), amp=False, channels_last=False)


@pytest.mark.parametrize("size", [(50, 130), (97, 65), (64, 64)])
def test_sliding_window_equals_whole_for_a_per_pixel_model(size: tuple[int, int]) -> None:
    model = _PixelNet().train()
    image = torch.randn(1, 3, *size)
    whole = segment(model, image, PRECISION)
    assert not model.training and not whole.requires_grad
    assert model.sizes == [size]
    model.sizes.clear()
    sliding = segment(model, image, PRECISION, crop=32)
    assert sliding.shape == (1, K, *size) and sliding.dtype == torch.float32
    torch.testing.assert_close(sliding.softmax(1), whole.softmax(1))
    assert set(model.sizes) == {(32, 32)}


def test_image_within_the_crop_is_one_forward() -> None:
    model = _PixelNet()
    segment(model, torch.randn(1, 3, 30, 40), PRECISION, crop=40)
    assert model.sizes == [(30, 40)]


def test_one_side_within_the_crop() -> None:
    model = _PixelNet()
    image = torch.randn(1, 3, 20, 90)
    sliding, whole = segment(model, image, PRECISION, crop=32), segment(model, image, PRECISION)
    torch.testing.assert_close(sliding.softmax(1), whole.softmax(1))
    assert set(model.sizes[:-1]) == {(20, 32)}


class _WindowNet(nn.Module):
    """Window k gets constant logits k * e_0: overlaps show how windows are combined."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> Output:
        logits = torch.zeros(x.shape[0], K, *x.shape[-2:])
        logits[:, 0] = float(self.calls)
        self.calls += 1
        return Output(logits, logits.mean(dim=(2, 3)))


def test_overlapping_windows_average_probabilities() -> None:
    """UniMatch averages the windows' softmax, not their logits: what pixel calibration is measured on."""
    out = segment(_WindowNet(), torch.zeros(1, 3, 8, 12), PRECISION, crop=8, stride_frac=0.5)  # windows at 0, 4
    probs = [torch.zeros(K).index_fill_(0, torch.tensor([0]), float(k)).softmax(0) for k in range(2)]
    torch.testing.assert_close(out[0, :, 0, 6].softmax(0), (probs[0] + probs[1]) / 2)  # both windows
    torch.testing.assert_close(out[0, :, 0, 0].softmax(0), probs[0])  # the first only


@pytest.mark.parametrize(("size", "crop", "stride"), [(100, 64, 43), (65, 32, 22), (64, 32, 32), (33, 32, 1)])
def test_windows_cover_every_pixel_and_end_flush(size: int, crop: int, stride: int) -> None:
    starts = _window_starts(size, crop, stride)
    covered = torch.zeros(size, dtype=torch.long)
    for s in starts:
        covered[s : s + crop] += 1
    assert bool((covered > 0).all()) and starts[0] == 0 and starts[-1] == size - crop
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def test_bf16_sliding_window_returns_float32() -> None:
    model = build_model("segnet_small", K, 3)
    precision = Precision(torch.device("cpu"), amp=True, channels_last=True)
    out = segment(model, torch.randn(1, 3, 70, 90), precision, crop=64)
    assert out.dtype == torch.float32 and out.shape == (1, K, 70, 90) and bool(torch.isfinite(out).all())
