"""Model contract: shapes, features/head split, published parameter counts, BN settings, gradients."""

import pytest
import torch
from torch import nn

from trustmatch.core.errors import UserError
from trustmatch.models import MODELS, build_model

SMALL = ["cnn", "wrn_28_2", "wrn_37_2"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_names() -> None:
    assert MODELS.names() == [
        "cnn",
        "deeplabv3plus_r101",
        "deeplabv3plus_r101_deepstem",
        "deeplabv3plus_r50",
        "deeplabv3plus_r50_deepstem",
        "segnet_small",
        "vit_base_patch16_96",
        "vit_small_patch2_32",
        "vit_tiny_patch2_32",
        "wrn_28_2",
        "wrn_28_8",
        "wrn_37_2",
    ]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).logits.shape == (2, 7)


def test_wrn_37_2_at_stl10_size() -> None:
    model = build_model("wrn_37_2", num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).logits.shape == (1, 10)


def test_wrn_28_8_forward_tiny() -> None:
    model = build_model("wrn_28_8", num_classes=100, in_channels=3)
    assert model(torch.randn(2, 3, 8, 8)).logits.shape == (2, 100)


@pytest.mark.parametrize("name", SMALL)
def test_head_of_features_is_forward(name: str) -> None:
    model = build_model(name, num_classes=5, in_channels=3, dropout=0.3).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert isinstance(model.head, nn.Linear)
        assert feats.shape == (4, model.head.in_features)
        out = model(x)
        torch.testing.assert_close(model.head(feats), out.logits)
        torch.testing.assert_close(feats, out.features)


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [("wrn_28_2", 10, 1.47e6), ("wrn_28_8", 100, 23.4e6), ("wrn_37_2", 10, 5.93e6)],
)
def test_parameter_counts_match_published(name: str, num_classes: int, expected: float) -> None:
    assert n_params(build_model(name, num_classes, in_channels=3)) == pytest.approx(expected, rel=0.01)


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(UserError, match="did you mean 'wrn_28_2'"):
        build_model("wrn28_2", num_classes=10, in_channels=3)


@pytest.mark.parametrize("name", SMALL)
def test_bn_momentum_on_every_bn(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=3, bn_momentum=0.01)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)


@pytest.mark.parametrize("name", SMALL)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = build_model(name, num_classes=3, in_channels=1, dropout=0.1)
    model(torch.randn(4, 1, 16, 16)).logits.logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_features_and_float32_logits_through_compile_and_autocast() -> None:
    """Output(logits, features) survives compile, which only sees forward; logits stay float32 (DDP:
    the torchrun tests in test_train.py)."""
    model = build_model("cnn", num_classes=4, in_channels=1).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        plain = model(x)
        compiled = torch.compile(model, backend="eager")(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    torch.testing.assert_close(compiled.logits, plain.logits)
    torch.testing.assert_close(compiled.features, plain.features)
    assert mixed.logits.dtype == torch.float32 and mixed.features.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.logits, plain.logits, atol=0.05, rtol=0.05)
