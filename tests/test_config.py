"""Configs: shipped configs load, overrides are typed, mistakes name the key and the fix."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from trustmatch.cli import main
from trustmatch.config import all_keys, from_dict, load_config, parse_overrides, shipped_configs
from trustmatch.core.errors import UserError
from trustmatch.methods import METHODS, build_method, method_config

SSL_METHODS = ["fixmatch", "flexmatch", "freematch", "softmatch", "uda", "csl"]
PUBLISHED = {  # dataset -> (classes, label counts): USB's published settings
    "cifar10": (10, [40, 250, 4000]),
    "cifar100": (100, [400, 2500, 10000]),
    "svhn": (10, [40, 250, 1000]),
    "stl10": (10, [40, 250, 1000]),
}
CALIBRATEMIX = (
    {"digits-calibratemix"}
    | {f"fashionmnist-calibratemix-{n}" for n in (40, 250)}
    | {f"{d}-calibratemix-{n}" for d, (_, counts) in PUBLISHED.items() for n in counts}
)
SEG_METHODS = ["supervised", "freematch", "softmatch", "uda", "unimatch", "csl"]
SEG_SPLITS = {  # UniMatch's published splits
    "pascal": ["92", "183", "366", "732", "1464"],
    "cityscapes": ["1_16", "1_8", "1_4", "1_2"],
    "coco": ["1_512", "1_256", "1_128", "1_64", "1_32"],
}
SEGMENTATION = (
    {f"digitscenes-{m}" for m in SEG_METHODS}
    | {"digitscenes-csl-notmp", "digitscenes-supervised-steps", "digitscenes-supervised-epochs"}
    | {f"{d}-{m}-{split}" for d, splits in SEG_SPLITS.items() for m in SEG_METHODS for split in splits}
)
USB_CV = {  # USB's usb_cv benchmark: dataset -> label counts (config/usb_cv/<method>/<method>_<dataset>_<n>_0.yaml)
    "cifar100": [200, 400],
    "stl10": [40, 100],
    "eurosat": [20, 40],
    "tissuemnist": [80, 400],
    "semi_aves": [3959],
}
SHIPPED = (
    {f"digits-{m}" for m in ["supervised", *SSL_METHODS]}
    | {f"fashionmnist-{m}-{n}" for m in ["supervised", *SSL_METHODS] for n in (40, 250)}
    | {f"{d}-{m}-{n}" for d, (_, counts) in PUBLISHED.items() for m in SSL_METHODS for n in counts}
    | CALIBRATEMIX
    | SEGMENTATION
    | {f"usb-{d}-{m}-{n}" for d, counts in USB_CV.items() for m in ["supervised", *SSL_METHODS] for n in counts}
)


def test_method_registry_gives_selectors_keys_and_tasks() -> None:
    """Every method but the baseline builds a selector from its own section; the lists of methods per
    task come from the registry alone."""
    with_selector = {name for name in METHODS if build_method(method_config(name)).selector(3, 10) is not None}
    assert with_selector == set(METHODS) - {"supervised"} == {n for n in METHODS if METHODS.get(n).semi_supervised}
    assert METHODS.for_task("classification") == ["supervised", *SSL_METHODS]
    assert sorted(METHODS.for_task("segmentation")) == sorted(SEG_METHODS)
    for name in METHODS:
        fields = {f.name for f in dataclasses.fields(METHODS.get(name).Config)} - {"name"}
        assert set(method_config(name).keys()) == fields, name
    labeled = {"labeled_loss", "ohem_thresh", "ohem_min_kept"}  # every method's, in segmentation
    assert set(method_config("csl").keys("segmentation")) - set(method_config("csl").keys("classification")) == {
        "tmp",
        "tmp_cover",
        "tmp_cell",
        *labeled,
    }
    assert set(method_config("supervised").keys("segmentation")) == labeled


def test_shipped_names_are_the_264_families() -> None:
    assert len(SHIPPED) == 108 + 93 + 63 and set(shipped_configs()) == SHIPPED


def test_published_segmentation_settings() -> None:
    """UniMatch's: batch 8 + 8, SGD 0.9 / wd 1e-4, poly 0.9, DeepLabV3+ at stride 16, threshold 0.95;
    steps = epochs x iterations over the unlabeled set (Pascal 80 epochs of 10,582 - labeled)."""
    cfg = load_config("pascal-unimatch-92")
    assert (cfg.task, cfg.data.name, cfg.data.split, cfg.data.crop_size) == ("segmentation", "pascal", "92", 321)
    # UniMatch's network with the release's ImageNet weights (a file the user passes: imagenet refuses and says so)
    assert (cfg.model.name, cfg.model.weights, cfg.model.output_stride) == (
        "deeplabv3plus_r101_deepstem",
        "imagenet",
        16,
    )
    t = cfg.train
    assert (t.batch_size, t.uratio, t.lr, t.head_lr_scale, t.schedule, t.poly_power) == (8, 1, 0.001, 10.0, "poly", 0.9)
    assert (t.momentum, t.nesterov, t.weight_decay, cfg.method.tau) == (0.9, False, 1e-4, 0.95)
    assert t.steps == 80 * -(-(10582 - 92) // 8)
    assert (cfg.train.ema, cfg.data.workers) == (0.0, 8)  # UniMatch evaluates the trained model itself
    assert load_config("pascal-supervised-92").train.steps == 80 * -(-92 // 8)  # epochs over the labeled set
    city = load_config("cityscapes-unimatch-1_16")
    assert (city.data.crop_size, city.data.sliding_window, city.train.lr, city.train.head_lr_scale) == (
        801,
        True,
        0.005,
        1.0,
    )
    assert (city.model.name, city.model.output_stride) == (
        "deeplabv3plus_r101_deepstem",
        16,
    )  # UniMatch's current release
    assert city.train.steps == 240 * -(-(2975 - 186) // 8)
    ohem = ("ohem", 0.7, 100_000)  # released: min_kept 200,000 per GPU batch of 2 crops
    assert (city.method.tau, city.method.labeled_loss, city.method.ohem_thresh, city.method.ohem_min_kept) == (0, *ohem)
    assert load_config("pascal-unimatch-92").method.labeled_loss == "ce"
    assert load_config("coco-softmatch-1_512").data.crop_size == 513
    csl = load_config("pascal-csl-732")  # CSL's published backbone: R101 at stride 8, UniMatch's schedule
    assert (csl.model.output_stride, csl.method.csl_alpha, csl.method.tmp, csl.method.tmp_cell) == (8, 8.0, True, 32)
    assert csl.train.steps == 80 * -(-(10582 - 732) // 8) and csl.data.crop_size == 321
    assert load_config("digitscenes-csl-notmp").method.tmp is False
    city_csl = load_config("cityscapes-csl-1_8")
    assert (city_csl.model.name, city_csl.model.output_stride, city_csl.data.crop_size) == (
        "deeplabv3plus_r101_deepstem",
        8,
        801,
    )
    m = city_csl.method
    assert city_csl.data.sliding_window and (m.labeled_loss, m.ohem_thresh, m.ohem_min_kept) == ohem


def test_digitscenes_supervised_at_equal_steps_and_at_equal_epochs() -> None:
    """-steps (= digitscenes-supervised): the SSL presets' 2,000 steps; -epochs: their 2,000 x 8 / 920 = 17.4
    epochs of unlabeled scenes as epochs of the 80 labeled ones, the releases' protocol."""
    ssl, steps = load_config("digitscenes-unimatch"), load_config("digitscenes-supervised-steps")
    assert steps == load_config("digitscenes-supervised") and steps.train.steps == ssl.train.steps == 2000
    epochs = load_config("digitscenes-supervised-epochs")
    assert epochs.train.steps == round(2000 / -(-920 // 8) * (80 // 8)) == 174
    assert epochs.data == steps.data and epochs.model == steps.model and epochs.train.batch_size == 8


def test_tmp_keys_are_segmentation_only() -> None:
    """CSL reads the TMP keys in segmentation only; a classification run's saved config loads again."""
    with pytest.raises(
        UserError, match=re.escape("'method.tmp_cell' does not apply to method 'csl' in classification")
    ):
        load_config("digits-csl", ["method.tmp_cell=8"])
    cfg = load_config("digits-csl", ["method.csl_alpha=2"])
    assert "tmp" not in cfg.to_dict()["method"] and from_dict(cfg.to_dict()).method.csl_alpha == 2.0
    assert load_config("digitscenes-csl", ["method.tmp_cell=16"]).to_dict()["method"]["tmp_cell"] == 16


def test_labeled_loss_keys_are_segmentation_only_and_checked() -> None:
    with pytest.raises(
        UserError, match=re.escape("'method.labeled_loss' does not apply to method 'supervised' in classification")
    ):
        load_config("digits-supervised", ["method.labeled_loss=ohem"])
    for override in ("method.labeled_loss=focal", "method.ohem_thresh=0", "method.ohem_min_kept=-1"):
        with pytest.raises(UserError, match=re.escape(f"config key '{override.split('=')[0]}' must be")):
            load_config("digitscenes-supervised", [override])
    assert load_config("digitscenes-unimatch", ["method.tau=0"]).method.tau == 0.0  # UniMatch's Cityscapes


def test_methods_are_checked_against_the_task() -> None:
    with pytest.raises(UserError, match="'fixmatch' does not train task 'segmentation'.*'unimatch'"):
        load_config("digitscenes-unimatch", ["method.name=fixmatch"])
    with pytest.raises(UserError, match="'unimatch' does not train task 'classification'"):
        load_config("digits-fixmatch", ["method.name=unimatch"])
    with pytest.raises(UserError, match="calibratemix.mode"):
        load_config("digitscenes-softmatch", ["calibratemix.mode=efficient"])


def test_calibratemix_configs_are_the_released_softmatch_variant() -> None:
    configs = shipped_configs()
    for name in CALIBRATEMIX:
        cfg = from_dict(configs[name])
        assert cfg.method.name == "softmatch" and cfg.calibratemix.mode == "faithful", name
        base = from_dict(configs[name.replace("calibratemix", "softmatch")])
        assert cfg.train == base.train and cfg.data == base.data and cfg.method == base.method


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
    assert (cfg.data.val_per_class, cfg.data.strong_ops, cfg.data.include_labeled_in_unlabeled) == (0, 3, True)
    assert load_config("stl10-fixmatch-40").model.name == "wrn_37_2"
    assert load_config("svhn-fixmatch-40").model.name == "wrn_28_2"


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_published_configs_train_on_exactly_the_named_labels(dataset: str) -> None:
    classes, counts = PUBLISHED[dataset]
    for name in [n for n in SHIPPED if n.startswith(f"{dataset}-")]:
        cfg = load_config(name)
        method = name.split("-")[1].replace("calibratemix", "softmatch")
        assert cfg.data.name == dataset and cfg.method.name == method, name
        assert cfg.data.labels_per_class * classes == int(name.split("-")[2]), name
        assert (cfg.data.val_per_class, cfg.data.strong_ops) == (0, 3), name
        assert getattr(cfg.method, "ema_m", 0.999) == 0.999, name


def test_cpu_configs() -> None:
    for name in [n for n in SHIPPED if n.startswith(("digits-", "fashionmnist-"))]:
        cfg = load_config(name)
        labels = 40 if name.startswith("digits-") else int(name.split("-")[2])
        assert cfg.data.labels_per_class * 10 == labels and cfg.data.strong_ops == 2, name
        assert getattr(cfg.method, "ema_m", None) == (0.99 if "ema_m" in cfg.method.keys() else None), name
        assert (cfg.model.bn_momentum, cfg.train.ema) == (0.1, 0.99), name
    assert load_config("digits-fixmatch").train.steps == 1500
    assert load_config("fashionmnist-softmatch-40").train.steps == 2000


@pytest.mark.slow
def test_saved_config_round_trips() -> None:
    """config.yaml and checkpoints hold to_dict(); resume reads them back with from_dict."""
    for name in SHIPPED:
        cfg = load_config(name)
        assert from_dict(cfg.to_dict()) == cfg, name
        assert from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))) == cfg, name
        assert set(cfg.to_dict()["method"]) == {"name", *cfg.method.keys(cfg.task)}, name


def test_foreign_method_key_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = (
        "config key 'method.tau' does not apply to method 'softmatch' "
        "(its keys: lambda_u, lambda_u_rampup, lambda_u_rampup_shape, ema_m, n_sigma, dist_align, pseudo_label_from)"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        load_config("digits-softmatch", ["method.tau=0.9"])
    with pytest.raises(
        UserError, match=re.escape("'method.lambda_u' does not apply to method 'supervised' (its keys: none)")
    ):
        load_config("digits-supervised", ["method.lambda_u=2"])
    with pytest.raises(UserError, match="'method.tau' does not apply"):
        from_dict({"method": {"name": "freematch", "tau": 0.9}})
    path = tmp_path / "mine.yaml"  # the base sets ema_m for SoftMatch: a new method leaves it behind ...
    path.write_text("base: digits-softmatch\nmethod:\n  name: fixmatch\n")
    assert load_config(str(path)).method.name == "fixmatch"
    assert load_config("digits-softmatch", ["method.name=freematch"]).method.ema_m == 0.99  # ... or keeps it
    assert load_config("digits-softmatch", ["method.name=csl"]).method.name == "csl"
    path.write_text("base: digits-softmatch\nmethod:\n  name: fixmatch\n  ema_m: 0.9\n")  # given with it: an error
    with pytest.raises(UserError, match=re.escape("'method.ema_m' does not apply to method 'fixmatch'")):
        load_config(str(path))
    assert main(["train", "digits-softmatch", "method.tau=0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


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
        ("method.tau=1.5", "'method.tau' must be in [0, 1]"),
        ("train.steps", "is not key=value"),
        ("train.schedule=step", "'train.schedule' must be one of cosine, poly, got 'step'"),
        ("train.poly_power=0", "'train.poly_power' must be positive, got 0.0"),
        ("train.head_lr_scale=-1", "'train.head_lr_scale' must be positive, got -1.0"),
        ("data.strong_ops=-1", "'data.strong_ops' must be 0 or more, got -1"),
        ("data.strong_ops=2.5", "'data.strong_ops' expects int, got 2.5"),
        ("data.strong_magnitude=1.5", "'data.strong_magnitude' must be None or in [0, 1], got 1.5"),
        ("train.threads=0", "'train.threads' must be None or at least 1, got 0"),
        ("train.eval_batch_size=0", "'train.eval_batch_size' must be at least 1, got 0"),
        ("model.dropout=1", "'model.dropout' must be in [0, 1), got 1.0"),
        ("train.momentum=-0.9", "'train.momentum' must be 0 or more, got -0.9"),
        ("train.weight_decay=-1", "'train.weight_decay' must be 0 or more, got -1.0"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        load_config("digits-fixmatch", [override])


def test_new_keys_defaults_and_values() -> None:
    cfg = load_config("digits-fixmatch")
    assert (cfg.task, cfg.train.schedule, cfg.train.poly_power, cfg.train.head_lr_scale) == (
        "classification",
        "cosine",
        0.9,
        1.0,
    )
    assert (cfg.data.strong_ops, cfg.data.strong_magnitude) == (2, None)
    cfg = load_config(
        "digits-fixmatch",
        ["train.schedule=poly", "train.poly_power=1", "train.head_lr_scale=10", "data.strong_magnitude=0.5"],
    )
    assert (cfg.train.schedule, cfg.train.poly_power, cfg.train.head_lr_scale) == ("poly", 1.0, 10.0)
    assert cfg.data.strong_magnitude == 0.5
    assert load_config("digits-fixmatch", ["data.strong_magnitude=none"]).data.strong_magnitude is None


def test_user_yaml_with_base(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("base: digits-fixmatch\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path))
    assert cfg.train.steps == 7 and cfg.data.name == "digits" and cfg.method.name == "fixmatch"
    child = tmp_path / "child.yaml"  # base: a YAML file beside it, whose base is a shipped name
    child.write_text("base: mine.yaml\nmethod:\n  tau: 0.8\n")
    cfg = load_config(str(child))
    assert (cfg.train.steps, cfg.method.tau, cfg.data.image_size) == (7, 0.8, 16)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="circular 'base:' chain"):
        load_config(str(loop))
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
    assert len(out.splitlines()) == len(SHIPPED) and {row.split()[0] for row in out.splitlines()} == SHIPPED
    line = next(row for row in out.splitlines() if row.startswith("digits-fixmatch "))
    assert "FixMatch" in line
    line = next(row for row in out.splitlines() if row.startswith("cifar10-fixmatch-40 "))
    assert "CIFAR-10 with 40 labels" in line and "WRN-28-2" in line
    assert main(["list", "--keys"]) == 0
    rows = {row.split()[0]: row for row in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(all_keys())
    assert "0.95" in rows["method.tau"] and "threshold" in rows["method.tau"]


def test_errors_keep_their_order_and_a_users_task_reads_every_method_key() -> None:
    """Types first, then names and ranges, in one order; CSL's TMP keys are refused only in the tasks
    methods train without them (classification), not in a task of the user's own."""
    with pytest.raises(UserError, match="'method.tau' expects float"):
        from_dict({"method": {"name": "nope", "tau": "x"}})
    with pytest.raises(UserError, match="'method.name' must be one of"):
        from_dict({"method": {"name": "nope"}})
    with pytest.raises(UserError, match="off for method 'supervised'"):
        load_config("digits-supervised", ["calibratemix.mode=faithful", "calibratemix.similarity=bad"])
    with pytest.raises(UserError, match="'train.batch_size' must be at least 2 with CalibrateMix"):
        load_config("digits-fixmatch", ["calibratemix.mode=faithful", "calibratemix.k=0", "train.batch_size=1"])
    cfg = from_dict({"task": "mytask", "method": {"name": "csl", "tmp": False}})
    assert cfg.method.tmp is False and cfg.to_dict()["method"]["tmp"] is False


def test_off_and_no_stay_words_where_a_key_takes_text(tmp_path: Path) -> None:
    """YAML 1.1 reads off / no / on as booleans; a text key keeps the word, a boolean key accepts it."""
    cfg = load_config("digits-fixmatch", ["calibratemix.mode=off", "train.amp=off", "train.nesterov=on"])
    assert cfg.calibratemix.mode == "off" and cfg.train.amp is False and cfg.train.nesterov is True
    path = tmp_path / "seg.yaml"
    path.write_text("base: digitscenes-unimatch\neval:\n  pixel_temperature: off\ntrain:\n  amp: no\n")
    cfg = load_config(str(path))
    assert cfg.eval.pixel_temperature == "off" and cfg.train.amp is False
