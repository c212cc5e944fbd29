"""UniMatch's deep-stem ResNet and DeepLabV3+: the release's checkpoint names and shapes load by key, and the
network computes what the architecture says (a reference built from torch.nn.functional here).

The state dict is written by this test from the architecture's facts (UniMatch's model/backbone/resnet.py:
a stem of three 3x3 convs 3-64-64-128 at ``conv1.0/.3/.6`` with BN at ``conv1.1/.4`` and ``bn1``; bottlenecks
``conv1`` 1x1, ``conv2`` 3x3 strided, ``conv3`` 1x1 x4, ``downsample.0/.1`` on each stage's first block; an
ImageNet ``fc``), never from the module under test.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.core.errors import UserError
from trustmatch.models import build_model
from trustmatch.models.deepstem_resnet import DeepStemResNet

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
K = 5


def release_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release's resnet{depth}.pth by name, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.0.weight"] = (64, 3, 3, 3)
    bn("conv1.1", 64)
    shapes["conv1.3.weight"] = (64, 64, 3, 3)
    bn("conv1.4", 64)
    shapes["conv1.6.weight"] = (128, 64, 3, 3)
    bn("bn1", 128)
    c_in = 128
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), BLOCKS[depth]), start=1):
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            shapes[f"{name}.conv1.weight"] = (width, c_in, 1, 1)
            bn(f"{name}.bn1", width)
            shapes[f"{name}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{name}.bn2", width)
            shapes[f"{name}.conv3.weight"] = (4 * width, width, 1, 1)
            bn(f"{name}.bn3", 4 * width)
            if b == 0:
                shapes[f"{name}.downsample.0.weight"] = (4 * width, c_in, 1, 1)
                bn(f"{name}.downsample.1", 4 * width)
            c_in = 4 * width
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
    return shapes


def release_state(depth: int, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in release_shapes(depth).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * (0.1 if len(shape) > 1 else 1.0)
    return state


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    state = release_state(50)
    path = tmp_path_factory.mktemp("release") / "resnet50.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def loaded(r50_file: tuple[Path, dict[str, Tensor]]) -> tuple[nn.Module, list[str]]:
    """The DeepLabV3+ built with the release file (built once: an R50 takes a second) and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model = build_model("deeplabv3plus_r50_deepstem", K, 3, bn_momentum=0.1, weights=str(r50_file[0]))
    return model.eval(), printed.getvalue().strip().splitlines()


def test_r101_has_exactly_the_release_names_and_shapes() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        encoder = DeepStemResNet(101, output_stride=16)
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    release = {k: v for k, v in release_shapes(101).items() if not k.startswith("fc.")}
    assert ours == release


def test_release_file_loads_every_backbone_key(
    r50_file: tuple[Path, dict[str, Tensor]], loaded: tuple[nn.Module, list[str]]
) -> None:
    (path, state), (model, lines) = r50_file, loaded
    encoder = model.encoder.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert set(backbone) == set(encoder)
    for k in backbone:
        assert torch.equal(encoder[k], state[k]), k
    assert lines[0] == f"weights: {len(backbone)} tensors from {path} into its encoder"
    assert lines[1] == "weights: missing 0 (initialised at random)"
    assert lines[2] == "weights: unexpected 2: fc.weight, fc.bias (ignored)"


def _bn(x: Tensor, s: dict[str, Tensor], name: str) -> Tensor:
    return F.batch_norm(
        x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"], s[f"{name}.bias"], False, 0.0, 1e-5
    )


def _bottleneck(x: Tensor, s: dict[str, Tensor], name: str, stride: int = 1, dilation: int = 1) -> Tensor:
    out = F.relu(_bn(F.conv2d(x, s[f"{name}.conv1.weight"]), s, f"{name}.bn1"))
    out = F.conv2d(out, s[f"{name}.conv2.weight"], stride=stride, padding=dilation, dilation=dilation)
    out = F.relu(_bn(out, s, f"{name}.bn2"))
    out = _bn(F.conv2d(out, s[f"{name}.conv3.weight"]), s, f"{name}.bn3")
    if f"{name}.downsample.0.weight" in s:
        x = _bn(F.conv2d(x, s[f"{name}.downsample.0.weight"], stride=stride), s, f"{name}.downsample.1")
    return F.relu(out + x)


def test_stem_and_layer1_equal_a_functional_reference(
    r50_file: tuple[Path, dict[str, Tensor]], loaded: tuple[nn.Module, list[str]]
) -> None:
    (_, s), (model, _) = r50_file, loaded
    x = torch.randn(2, 3, 37, 45)
    ref = F.relu(_bn(F.conv2d(x, s["conv1.0.weight"], stride=2, padding=1), s, "conv1.1"))
    ref = F.relu(_bn(F.conv2d(ref, s["conv1.3.weight"], padding=1), s, "conv1.4"))
    ref = F.relu(_bn(F.conv2d(ref, s["conv1.6.weight"], padding=1), s, "bn1"))
    ref = F.max_pool2d(ref, 3, 2, padding=1)
    for b in range(3):
        ref = _bottleneck(ref, s, f"layer1.{b}")
    with torch.no_grad():
        c1 = model.encoder(x)[0]
    assert c1.shape == (2, 256, 10, 12)
    torch.testing.assert_close(c1, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("output_stride", "first", "rest"),
    [(16, {"layer3": (2, 1), "layer4": (1, 1)}, {"layer3": 1, "layer4": 2}),
     (8, {"layer3": (1, 1), "layer4": (1, 2)}, {"layer3": 2, "layer4": 4})],
)  # fmt: skip
def test_dilation_replaces_stride_as_released(
    r50_file: tuple[Path, dict[str, Tensor]], output_stride: int, first: dict, rest: dict
) -> None:
    """The first block of a dilated stage keeps the previous dilation at stride 1; the others take the new one."""
    _, s = r50_file
    with torch.device("meta"):
        encoder = DeepStemResNet(50, output_stride)
    for stage in ("layer3", "layer4"):
        blocks = getattr(encoder, stage)
        assert (blocks[0].conv2.stride[0], blocks[0].conv2.dilation[0]) == first[stage]
        assert {b.conv2.dilation[0] for b in blocks[1:]} == {rest[stage]}
        assert {b.conv2.padding[0] for b in blocks[1:]} == {rest[stage]}
    # one dilated block computed both ways: layer4.1 (dilation 2 at output stride 16, 4 at 8)
    block = encoder.layer4[1].to_empty(device="cpu").eval()
    block.load_state_dict({k.removeprefix("layer4.1."): v for k, v in s.items() if k.startswith("layer4.1.")})
    x = torch.randn(1, 2048, 9, 7)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, _bottleneck(x, s, "layer4.1", dilation=rest["layer4"]), rtol=1e-4, atol=1e-4)


def test_imagenet_refuses_and_names_the_release_file() -> None:
    with pytest.raises(UserError) as e:
        build_model("deeplabv3plus_r101_deepstem", K, 3, weights="imagenet")
    message = str(e.value)
    assert "resnet101.pth" in message and "model.weights=/path/to/resnet101.pth" in message
    assert len(message.splitlines()) == 1


def test_decoder_is_the_releases() -> None:
    """ASPP 2048 -> 256 in five branches (rates 6/12/18), reduce 256 -> 48, two plain 3x3 fuse convs, classifier."""
    with torch.device("meta"):
        model = build_model("deeplabv3plus_r50_deepstem", K, 3)
    shapes = {k: tuple(v.shape) for k, v in model.head.state_dict().items() if k.endswith("weight")}
    assert shapes["aspp.b0.0.weight"] == (256, 2048, 1, 1)
    assert [shapes[f"aspp.b{i}.0.weight"] for i in (1, 2, 3)] == [(256, 2048, 3, 3)] * 3
    assert [
        model.head.aspp.b1[0].dilation[0],
        model.head.aspp.b2[0].dilation[0],
        model.head.aspp.b3[0].dilation[0],
    ] == [
        6,
        12,
        18,
    ]
    assert shapes["aspp.b4.gap.1.weight"] == (256, 2048, 1, 1) and shapes["aspp.project.0.weight"] == (256, 1280, 1, 1)
    assert shapes["reduce.0.weight"] == (48, 256, 1, 1)
    assert shapes["fuse.0.weight"] == (256, 304, 3, 3) and shapes["fuse.3.weight"] == (256, 256, 3, 3)
    assert shapes["classifier.weight"] == (K, 256, 1, 1) and model.head.classifier.bias is not None
