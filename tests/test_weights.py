"""model.weights: files in every format users have them (and trustmatch runs' checkpoints) load into a fresh
model and give its outputs; anything more than a head of difference, a broken file or ImageNet weights that
cannot be had is one UserError, raised before the model changes. The hub path reads a cache prepared here,
offline: no test reaches the network."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trustmatch.core.errors import UserError
from trustmatch.models import build_model
from trustmatch.models.weights import check_source, load_weights

K = 4


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test here may reach the network: the hub offline, its cache an empty folder unless a test fills it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


def segnet(seed: int, classes: int = K) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("segnet_small", classes, 3, bn_momentum=0.1).eval()


def perturbed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every float tensor moved, so BN statistics are not their defaults either."""
    return {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def source() -> nn.Module:
    model = segnet(1)
    model.load_state_dict(perturbed_state(model))
    return model


def assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x).logits, b.eval()(x).logits, rtol=0, atol=0)


def _plain(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


FORMATS = {
    "plain.pt": lambda m: _plain(m),
    "nested_state_dict_ddp.bin": lambda m: {"state_dict": {f"module.{k}": v for k, v in _plain(m).items()}},
    "nested_model_compiled.pth": lambda m: {"model": {f"_orig_mod.{k}": v for k, v in _plain(m).items()}, "epoch": 3},
    "trustmatch_best.pt": lambda m: {"version": 2, "step": 5, "parts": {"ema": _plain(m)}, "config": {"seed": 0}},
    "trustmatch_last.pt": lambda m: {
        "version": 2,
        "parts": {"model": {k: torch.zeros_like(v) for k, v in _plain(m).items()}, "ema": _plain(m)},
    },
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_saved_model_loads_into_a_fresh_one(
    tmp_path: Path, source: nn.Module, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    torch.save(FORMATS[name](source), path)
    model = build_model("segnet_small", K, 3, bn_momentum=0.1, weights=str(path))
    assert_same_outputs(model, source)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith(f"from {path} into the model") and lines[1].startswith("weights: missing 0")
    assert lines[2].startswith("weights: unexpected 0")


def test_safetensors(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert_same_outputs(build_model("segnet_small", K, 3, weights=str(path)), source)


def test_a_backbone_file_goes_into_the_encoder_and_the_head_stays_random(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "encoder.pth"
    torch.save({f"backbone.{k}": v for k, v in source.encoder.state_dict().items()}, path)
    model = segnet(2)
    head = copy.deepcopy(model.head.state_dict())
    report = load_weights(model, path)
    assert report.into == "encoder" and report.missing == [] and report.unexpected == []
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v)
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())


def test_a_file_without_the_classifier_reports_it_missing(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "no_classifier.pt"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("head.classifier.")}, path)
    report = load_weights(segnet(2), path)
    assert report.into == "" and report.missing == ["head.classifier.weight", "head.classifier.bias"]


def test_weights_prefix_selects_one_model_of_several(tmp_path: Path, source: nn.Module) -> None:
    path = tmp_path / "pair.pt"
    other = segnet(5)
    state = {**{f"student.{k}": v for k, v in other.state_dict().items()}}
    state.update({f"teacher.{k}": v for k, v in source.state_dict().items()})
    torch.save(state, path)
    assert_same_outputs(build_model("segnet_small", K, 3, weights=str(path), weights_prefix="teacher."), source)
    with pytest.raises(UserError, match="no key of .* starts with it \\(its keys start with student., teacher.\\)"):
        build_model("segnet_small", K, 3, weights=str(path), weights_prefix="ema.")


def _refused(model: nn.Module, path: Path, match: str, **kw: str) -> None:
    """``load_weights`` raises one line matching ``match`` and leaves ``model`` as it was."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=match) as e:
        load_weights(model, path, **kw)
    assert len(str(e.value).splitlines()) == 1 and str(path) in str(e.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_head_of_another_size_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "three_classes.pt"
    torch.save(segnet(1, classes=3).state_dict(), path)
    _refused(
        segnet(2), path, r"head of another size .*trained for 3 classes, this data has 4.*weights_prefix=encoder\."
    )
    report = load_weights(segnet(2), path, prefix="encoder.")  # the fix the line names
    assert report.into == "encoder" and report.missing == []


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "classifier.pt"
    torch.save(build_model("cnn", K, 3).state_dict(), path)
    _refused(segnet(2), path, r"does not fit SegNetSmall: none of its \d+ keys \(body.0.weight")
    partial = tmp_path / "partial.pt"
    state = segnet(1).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("encoder.stage2")}, partial)
    _refused(segnet(2), partial, r"does not fit the model \(SegNetSmall\): \d+ tensors missing \(encoder.stage2")
    reshaped = tmp_path / "reshaped.pt"
    torch.save({**state, "encoder.stage1.0.0.weight": torch.zeros(48, 3, 5, 5)}, reshaped)
    _refused(segnet(2), reshaped, r"1 of another shape \(encoder.stage1.0.0.weight: \[48, 3, 5, 5\] in the file")


def test_unreadable_and_foreign_files_are_refused(tmp_path: Path, source: nn.Module) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(source.state_dict(), whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _refused(segnet(2), truncated, "is unreadable or truncated")
    tensors = tmp_path / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tensors))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tensors.read_bytes()[:-100])
    _refused(segnet(2), cut, "is unreadable or truncated")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    _refused(segnet(2), garbage, "is unreadable or truncated")
    for name, obj in (("list.pt", [1, 2, 3]), ("training_state.pt", {"epoch": 3, "lr": 0.1})):
        torch.save(obj, tmp_path / name)
        _refused(segnet(2), tmp_path / name, "holds no state dict")
    pickled = tmp_path / "module.pt"
    torch.save(segnet(1), pickled)  # a whole pickled module: weights_only refuses to run its code
    _refused(
        segnet(2),
        pickled,
        r"was refused: it holds objects other than tensors and plain data \(a pickled trustmatch.models.segnets."
        r"SegNetSmall\)",
    )


def test_check_source_names_the_key_and_the_fix(tmp_path: Path) -> None:
    check_source("none")
    check_source("imagenet")
    with pytest.raises(UserError, match=f"model.weights={tmp_path / 'gone.pth'}: the file does not exist"):
        check_source(tmp_path / "gone.pth")
    with pytest.raises(UserError, match="the file is a folder"):
        check_source(tmp_path)
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match=r"\.ckpt is not a weights file: use one of"):
        check_source(tmp_path / "w.ckpt")


def test_imagenet_for_a_model_without_it() -> None:
    with pytest.raises(UserError, match="cnn has no ImageNet weights; use model.weights=none"):
        build_model("cnn", K, 3, weights="imagenet")


def test_smp_encoders_by_name() -> None:
    model = build_model("smp:resnet18", K, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 50), perturb=False)
    assert out.logits.shape == (1, K, 40, 50) and out.features.shape == (1, 512)
    with pytest.raises(UserError, match="no encoder 'resnet19'; did you mean smp:resnet18"):
        build_model("smp:resnet19", K, 3)
    with pytest.raises(UserError, match="smp has no ImageNet weights for encoder 'dpn68b'"):  # checked before the hub
        build_model("smp:dpn68b", K, 3, weights="imagenet")


# ---------------------------------------------------------------- the hub, offline, from a prepared cache


def smp_cache(root: Path, encoder: str = "resnet18") -> dict[str, torch.Tensor]:
    """Put an smp encoder's ImageNet weights where huggingface_hub's cache layout says smp will look for them
    (repo and revision from smp's own table); the weights are a seeded random encoder's."""
    import segmentation_models_pytorch.encoders as smp_encoders

    settings = smp_encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
    snapshot = root / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in smp_encoders.get_encoder(encoder).state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"note": "written by the test"}))
    return state


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub offline (``_hub_offline``), reading a cache in ``tmp_path`` (read at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_imagenet_from_the_offline_cache(offline_cache: Path) -> None:
    state = smp_cache(offline_cache)
    model = build_model("smp:resnet18", K, 3, weights="imagenet")
    for k, v in state.items():
        assert torch.equal(model.encoder.state_dict()[k], v), k


def test_imagenet_offline_without_the_cache_names_it(offline_cache: Path) -> None:
    with pytest.raises(UserError) as e:
        build_model("smp:resnet18", K, 3, weights="imagenet")
    line = str(e.value)
    assert f"not in the Hugging Face cache {offline_cache} (offline: HF_HUB_OFFLINE=1)" in line
    assert "model.weights=/path/to/weights.pth" in line and len(line.splitlines()) == 1


PROBE = """
import torch, sys
from trustmatch.models import build_model
m = build_model("smp:resnet18", 4, 3, weights="imagenet")
print(float(m.encoder.conv1.weight.double().sum()))
"""


@pytest.mark.slow
def test_hf_home_and_offline_env_are_honoured(tmp_path: Path) -> None:
    """The environment variables themselves, in a fresh process: HF_HOME locates the cache, HF_HUB_OFFLINE=1 keeps
    the hub from being asked."""
    state = smp_cache(tmp_path / "hf" / "hub")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) == pytest.approx(float(state["conv1.weight"].double().sum()))
