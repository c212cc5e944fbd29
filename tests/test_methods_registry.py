"""The method registry: a new method is one module (config section, selector, registration), and every
list of methods, every key check and every task reads it from there; `trustmatch list NAME`."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from trustmatch.cli import main
from trustmatch.config import describe_keys, from_dict, load_config
from trustmatch.core.errors import UserError
from trustmatch.core.options import opt
from trustmatch.core.registry import Registry
from trustmatch.methods import METHODS, Selection, Selector, SSLMethod
from trustmatch.methods.method import Check, SSLConfig
from trustmatch.methods.step_output import Regularizer
from trustmatch.run.trainer import Trainer

TINY = ["train.steps=4", "train.eval_every=2", "train.batch_size=8", "train.uratio=2"]


# ---- what a new method's module holds (docs/architecture.md, "Adding a method", walks through it)


@dataclass
class PowerConfig(SSLConfig):
    power: float = opt(2.0, "weight c^power of a pseudo-label with confidence c")

    def checks(self) -> list[Check]:
        return [*super().checks(), (self.power > 0, "method.power", "positive")]


class PowerSelector(Selector):
    """Every pseudo-label counts, weighted by its confidence to the power ``power``."""

    def __init__(self, power: float) -> None:
        super().__init__()
        self.power = power

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> Selection:
        conf, labels = probs.max(dim=1)
        weights = conf.pow(self.power)
        return Selection(labels, weights if valid is None else torch.where(valid, weights, 0.0))


class PowerWeighting(SSLMethod):
    Config = PowerConfig
    cfg: PowerConfig

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        return PowerSelector(self.cfg.power)


@pytest.fixture
def power_method(monkeypatch: pytest.MonkeyPatch) -> type[SSLMethod]:
    """``PowerWeighting`` registered for this test only (the registry's tables are restored after it)."""
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    monkeypatch.setattr(METHODS, "_metadata", dict(METHODS._metadata))
    return METHODS.register("power", description="confidence^power weights", tasks=("classification",))(PowerWeighting)


def test_a_registered_method_is_configured_checked_and_trained(power_method: type, tmp_path: Path) -> None:
    cfg = load_config("digits-fixmatch", ["method.name=power", "method.power=3", *TINY])
    assert type(cfg.method) is PowerConfig and cfg.method.power == 3.0 and cfg.method.lambda_u == 1.0
    assert "tau" not in cfg.to_dict()["method"] and from_dict(cfg.to_dict()) == cfg  # FixMatch's key left behind
    assert "power" in [key.split(".")[-1] for key, _, _ in describe_keys()]
    with pytest.raises(UserError, match=r"'method.power' must be positive, got -1.0"):
        load_config("digits-fixmatch", ["method.name=power", "method.power=-1"])
    with pytest.raises(UserError, match=r"'method.power' does not apply to method 'softmatch'"):
        load_config("digits-softmatch", ["method.power=2"])
    with pytest.raises(UserError, match=r"method 'power' does not train task 'segmentation'.*: use one of"):
        load_config("digitscenes-unimatch", ["method.name=power"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert isinstance(trainer.task.selector, PowerSelector)
    out = trainer.train_step()
    assert 0.0 < float(out.logs["mask"]) < 1.0  # c^3 of a softmax over 10 classes: neither 0 nor 1
    assert trainer.fit()["final"]["accuracy"] > 0


def test_method_lists_come_from_the_registry(power_method: type) -> None:
    assert METHODS.for_task("classification")[-1] == "power" and "power" not in METHODS.for_task("segmentation")
    assert "power" in METHODS.get("power").description and METHODS.get("power").tasks == ("classification",)


def test_registry_metadata_selects_names() -> None:
    table: Registry[object] = Registry("thing")
    table.register("a", kind="x")(object)
    table.register("b", kind="y")(object)
    table.register("c", kind="x")(object)
    assert table.where(kind="x") == ["a", "c"] and table.where() == ["a", "b", "c"]
    assert table.metadata("b") == {"kind": "y"}
    with pytest.raises(UserError, match="unknown thing 'd'"):
        table.metadata("d")


class _NeedsMixes(Regularizer):
    views = ("lb", "mixes")

    def forward(self, model, batch, out):  # type: ignore[no-untyped-def]
        raise AssertionError("never reached: the step lacks the 'mixes' view")


def test_a_regularizer_without_its_views_is_refused(tmp_path: Path) -> None:
    trainer = Trainer(load_config("digits-fixmatch", TINY), tmp_path / "run", progress=False)
    trainer.task.regularizers["needs"] = _NeedsMixes()
    with pytest.raises(ValueError, match=r"regularizer 'needs' needs the views \['mixes'\]"):
        trainer.train_step()


def test_cli_list_name_prints_the_resolved_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["list", "digitscenes-csl"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert from_dict(printed) == load_config("digitscenes-csl")
    assert printed["method"]["tmp_cell"] == 8 and printed["train"]["steps"] == 2000
    path = tmp_path / "mine.yaml"
    path.write_text("base: digits-uda\ntrain:\n  steps: 7\n")
    assert main(["list", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["train"]["steps"], printed["method"]["tau"]) == (7, 0.8)
    assert main(["list", "digits-fixmach"]) == 2
    assert "did you mean 'digits-fixmatch'" in capsys.readouterr().err
    assert main(["list", "digits-fixmatch", "--keys"]) == 2
    assert "NAME or --keys" in capsys.readouterr().err
