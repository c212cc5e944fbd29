"""Configs: shipped files load, overrides are typed, mistakes name the key and the fix."""

from pathlib import Path

import pytest

from trustmatch.cli import main
from trustmatch.config import all_keys, load_config, parse_overrides, shipped_configs
from trustmatch.errors import UserError


def test_every_shipped_config_loads_and_describes_itself() -> None:
    configs = shipped_configs()
    for required in [
        "digits-supervised",
        "digits-fixmatch",
        "digits-flexmatch",
        "digits-freematch",
        "digits-softmatch",
        "fashionmnist-fixmatch-40",
        "cifar10-fixmatch-40",
        "cifar100-fixmatch-400",
        "svhn-fixmatch-40",
        "stl10-fixmatch-40",
    ]:
        assert required in configs
    for name in configs:
        cfg = load_config(name)
        assert cfg.description, name
    assert not any(name.startswith("_") for name in configs)


def test_published_settings() -> None:
    cfg = load_config("cifar100-softmatch-2500")
    assert (cfg.model.name, cfg.train.weight_decay, cfg.data.labels_per_class) == ("wrn_28_8", 1e-3, 25)
    assert (cfg.train.batch_size, cfg.train.uratio, cfg.train.lr, cfg.train.steps) == (64, 7, 0.03, 2**20)
    assert load_config("stl10-fixmatch-40").model.name == "wrn_37_2"


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "digits-fixmatch", ["train.steps=10", "method.tau=0.9", "data.image_size=none", "train.amp=false"]
    )
    assert cfg.train.steps == 10 and cfg.method.tau == 0.9 and cfg.data.image_size is None
    assert cfg.train.amp is False
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.step=10", "unknown config key 'train.step'; did you mean 'train.steps'"),
        ("train.steps=ten", "'train.steps' expects int, got 'ten'"),
        ("method.name=mixmatch", "'method.name' must be one of"),
        ("method.tau=1.5", "'method.tau' must be in (0, 1]"),
        ("train.steps", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config("digits-fixmatch", [override])


def test_user_yaml_with_base(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("base: digits-fixmatch\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path))
    assert cfg.train.steps == 7 and cfg.data.name == "digits" and cfg.method.name == "fixmatch"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_bad_key_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "digits-fixmatch", "trian.steps=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'train.steps'" in err
    assert main(["train", "digits-fixmach"]) == 2
    assert "did you mean 'digits-fixmatch'" in capsys.readouterr().err


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("digits-fixmatch "))
    assert "FixMatch" in line
    assert main(["list", "--keys"]) == 0
    rows = {row.split()[0]: row for row in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(all_keys())
    assert "0.95" in rows["method.tau"] and "threshold" in rows["method.tau"]
