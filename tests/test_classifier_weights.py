"""model.weights files into classifiers (timm's, USB's ViTs, the project's WRN and CNN): a plain timm state dict
goes into the TimmClassifier's ``body`` by itself; a head of another size (ImageNet's 1,000 classes, a run on
other classes) is left out and the head starts fresh, said in one line; a run's best.pt starts a new run.
Every file is written here; nothing reaches the network."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from trustmatch.cli import main
from trustmatch.core.errors import UserError
from trustmatch.models import build_model
from trustmatch.models.weights import load_weights, read_state_dict

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def published(name: str, num_classes: int = 1000) -> nn.Module:
    """timm's network as a plain timm state dict holds it: timm's keys and its own classifier."""
    torch.manual_seed(3)
    size = {"img_size": 32} if name == "test_vit" else {}
    return timm.create_model(name, num_classes=num_classes, **size).eval()


def built(name: str, classes: int, seed: int = 0, **weights: Any) -> nn.Module:
    torch.manual_seed(seed)
    size = {"image_size": 32} if name.startswith("timm:") else {}
    return build_model(name, classes, 3, **size, **weights).eval()


def timm_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_a_plain_timm_state_dict_loads_into_the_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """timm's keys carry no ``body.``: the loader finds the body they fit and the body gives timm's features."""
    source = published("test_vit")
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    model = built("timm:test_vit", 10, weights=str(tmp_path / "vit.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(X).features, timm_features(source, X))
    assert f"tensors from {tmp_path / 'vit.safetensors'} into its body\n" in capsys.readouterr().out


@pytest.mark.parametrize("name, classifier", [("test_vit", "head"), ("test_resnet", "fc")])
def test_an_imagenet_head_is_left_out_and_the_head_starts_fresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, classifier: str
) -> None:
    """A 1,000-class classifier in the file, a 10-class model: the body loaded, the head as a run without the file
    would start it, and one line saying so."""
    source = published(name)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = built(f"timm:{name}", 10, weights=str(tmp_path / "w.pth"))
    fresh = built(f"timm:{name}", 10)
    body = model.body.state_dict()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith(f"{classifier}.")}
    assert body.keys() == expected.keys() and all(torch.equal(body[k], v) for k, v in expected.items())
    assert torch.equal(model.head.weight, fresh.head.weight) and torch.equal(model.head.bias, fresh.head.bias)
    width = model.num_features
    line = (
        f"weights: the file's head is left out ({classifier}.weight, {classifier}.bias; {classifier}.weight: "
        f"[1000, {width}]): the model's head ([10, {width}]: 10 classes) starts fresh"
    )
    assert line in capsys.readouterr().out.splitlines()


def test_a_timm_classifier_of_the_heads_size_is_loaded_into_it(tmp_path: Path) -> None:
    """A timm model trained on these 10 classes (its ``fc`` beside the body): the whole network, timm's logits."""
    source = published("test_resnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = built("timm:test_resnet", 10, weights=str(tmp_path / "w.pth"))
    with torch.no_grad():
        assert torch.equal(model(X).logits, source(X))


def _run_file(path: Path, model: nn.Module) -> Path:
    """A trustmatch run's best.pt as the trainer writes it: the evaluated (EMA) weights under parts."""
    torch.save({"version": 2, "step": 5, "parts": {"ema": model.state_dict()}, "config": {"seed": 0}}, path)
    return path


@pytest.mark.parametrize("name", ["timm:test_vit", "cnn", "wrn_28_2"])
def test_a_run_on_other_classes_gives_its_body_and_a_fresh_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """A run's best.pt with a 5-class head into a 3-class model: all but the head loaded, the head fresh."""
    trained = built(name, 5, seed=1)
    path = _run_file(tmp_path / "best.pt", trained)
    model, fresh = built(name, 3, weights=str(path)), built(name, 3)
    state, trained_state, fresh_state = model.state_dict(), trained.state_dict(), fresh.state_dict()
    for k, v in state.items():
        assert torch.equal(v, (fresh_state if k.startswith("head.") else trained_state)[k]), k
    printed = capsys.readouterr().out
    assert "weights: missing 2: head.weight, head.bias (initialised at random)" in printed
    assert re.search(r"the file's head is left out \(head\.weight, head\.bias; head\.weight: \[5, \d+\]\)", printed)


def test_a_run_of_these_classes_loads_whole(tmp_path: Path) -> None:
    trained = built("timm:test_vit", 4, seed=1)
    model = built("timm:test_vit", 4, weights=str(_run_file(tmp_path / "best.pt", trained)))
    with torch.no_grad():
        assert torch.equal(model(X).logits, trained(X).logits)


def test_more_than_a_head_of_difference_stays_an_error(tmp_path: Path) -> None:
    """Only the head may differ for a classifier too: another width is the wrong architecture, model untouched."""
    path = _run_file(tmp_path / "best.pt", built("wrn_28_2", 5))
    model = built("wrn_37_2", 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"does not fit .*only the head may differ"):
        load_weights(model, path, fresh_head=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_timm_runs_best_pt_starts_a_new_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """model.weights=RUN/best.pt on the CLI: a timm classifier's trained run, loaded whole into the new run."""
    common = ["digits-fixmatch", "model.name=timm:test_vit", "data.image_size=32", "train.steps=2"]
    common += ["train.eval_every=2", "train.batch_size=4", "train.uratio=1", "--quiet"]
    assert main(["train", *common, "--out", str(tmp_path / "first")]) == 0
    best = tmp_path / "first" / "best.pt"
    capsys.readouterr()
    assert main(["train", *common, f"model.weights={best}", "--out", str(tmp_path / "second")]) == 0
    printed = capsys.readouterr().out
    assert f"weights: {len(read_state_dict(best))} tensors from {best} into the model" in printed
    assert "weights: missing 0" in printed and "weights: unexpected 0" in printed and "left out" not in printed
    assert (tmp_path / "second" / "best.pt").is_file()
