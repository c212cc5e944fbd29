"""Typed run configuration: shipped configs, user YAML files and ``key=value`` overrides.

Every key is a dataclass field, so a typo or a wrong type is caught before any work starts and
reported in one line that names the key and the closest valid one. A ``method.*`` key the chosen
method does not read is an error too: silently ignoring it would run another experiment.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trustmatch.errors import UserError
from trustmatch.methods import CSL_DISPERSIONS, CSL_RELIABLE_RULES, METHODS, TASK_NAMES, method_keys
from trustmatch.presets import PRESETS
from trustmatch.schedules import SCHEDULES

CALIBRATEMIX_MODES = ("off", "faithful", "efficient")
NONFINITE_POLICIES = ("stop", "skip")


def opt(default: Any, help: str) -> Any:
    """A config field with its one-line help (shown by ``trustmatch list --keys``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    name: str = opt(
        "digits",
        "dataset: digits, fashionmnist, mnist, cifar10, cifar100, svhn, stl10, folder; "
        "segmentation: digitscenes, pascal, cityscapes, coco, folder",
    )
    root: str | None = opt(None, "dataset directory (torchvision or standard layout) or the user's folder")
    download: bool = opt(False, "only on request: nothing is fetched unless this is true")
    labels_per_class: int = opt(4, "labeled images per class drawn from the training pool")
    val_per_class: int = opt(5, "labeled validation split held out of the training pool")
    image_size: int | None = opt(
        None, "square side images are resized to (None: the dataset's native size; folders: 32)"
    )
    unlabeled_dir: str | None = opt(None, "folder dataset: a folder of unlabeled images, searched recursively")
    test_dir: str | None = opt(
        None, "folder dataset: optional test folder (classification: class subfolders; segmentation: images/ + masks/)"
    )
    val_dir: str | None = opt(None, "segmentation folder: optional validation folder with images/ + masks/")
    split: str | None = opt(None, "segmentation: UniMatch split name under <root>/splits/ (92, 1464, 1_16 ...)")
    split_dir: str | None = opt(
        None, "segmentation: folder with labeled.txt and unlabeled.txt (None: <root>/splits/<split>); val.txt beside it"
    )
    crop_size: int = opt(64, "segmentation: training crop side (Pascal 321, Cityscapes 801, COCO 513)")
    sliding_window: bool = opt(False, "segmentation: evaluate in crop-sized windows (stride 2/3 crop; Cityscapes)")
    workers: int = opt(0, "segmentation: threads that decode and crop images from files (0: the main thread)")
    scenes: int = opt(1000, "digitscenes: training scenes generated (the labeled + unlabeled pool)")
    labeled_images: int = opt(80, "digitscenes: labeled scenes drawn from the pool")
    val_images: int = opt(100, "digitscenes: validation scenes (generated apart from the pool)")
    test_fraction: float = opt(0.2, "share held out as a fixed, stratified test split when the dataset has none")
    include_labeled_in_unlabeled: bool = opt(False, "also use the labeled images as unlabeled ones (USB does)")
    strong_ops: int = opt(2, "RandAugment ops per strong view (FixMatch: 2; USB's published configs: 3)")
    strong_magnitude: float | None = opt(
        None,
        "None: each op's magnitude uniform over its range, per image (FixMatch, USB); "
        "a number in [0, 1]: every op at that fixed strength, RandAugment-style",
    )
    cache: str = opt(
        "auto",
        "classification images: 'memory' (decoded into RAM), 'disk' (decoded once into a memory-mapped file "
        "under data.cache_dir, reused by later runs, rebuilt when the files change), 'auto' (disk when the "
        "decoded images times the processes on this machine exceed half the available memory); digits is "
        "always in memory, segmentation decodes per batch",
    )
    cache_dir: str | None = opt(
        None, "folder of the decoded-image cache (None: $TRUSTMATCH_CACHE/decoded or ~/.cache/trustmatch/decoded)"
    )


@dataclass
class ModelConfig:
    name: str = opt(
        "cnn", "network: cnn, wrn_28_2, wrn_28_8, wrn_37_2; segmentation: segnet_small, deeplabv3plus_r50, _r101"
    )
    pretrained: bool = opt(False, "segmentation: ImageNet encoder weights (fetched; random init if they cannot be)")
    output_stride: int = opt(16, "DeepLabV3+ encoder output stride: 16 (UniMatch) or 8 (CSL)")
    bn_momentum: float = opt(
        0.001, "BatchNorm momentum (PyTorch convention); 0.001 as USB for 2^20-step runs, ~0.1 for short ones"
    )
    dropout: float = opt(0.0, "dropout rate inside the network")


@dataclass
class MethodConfig:
    name: str = opt("fixmatch", ", ".join(METHODS))
    lambda_u: float = opt(1.0, "weight of the unlabeled loss")
    tau: float = opt(0.95, "FixMatch / FlexMatch confidence threshold")
    threshold_warmup: bool = opt(True, "FlexMatch: count unused samples in the normaliser")
    ema_m: float = opt(0.999, "EMA momentum of the FreeMatch / SoftMatch statistics")
    saf_weight: float = opt(0.001, "FreeMatch fairness weight w_f: USB's published configs (0 disables)")
    n_sigma: float = opt(2.0, "SoftMatch: width of the truncated Gaussian in standard deviations")
    dist_align: bool = opt(True, "SoftMatch uniform distribution alignment")
    pseudo_label_from: str = opt("raw", "SoftMatch: take yhat from 'raw' (USB) or 'aligned' probabilities")
    temperature: float = opt(0.4, "UDA: sharpening temperature of the soft pseudo-labels")
    csl_alpha: float = opt(8.0, "CSL: width alpha of the weight exp(-z^2 / alpha) (release 8; CoVar 2)")
    csl_dispersion: str = opt(
        "release", "CSL residual dispersion: 'release' (all K slots) or 'nonmax' (the K-1 non-max classes, CoVar)"
    )
    csl_scaled: bool = opt(False, "CSL: CoVar's confidence-scaled dispersion 0.5 (K-1)^2 v / (2 (1 - c))")
    csl_reliable: str = opt(
        "confidence", "CSL reliable cluster: higher mean 'confidence', or 'covar' (mu_c - 0.25 mu_v)"
    )
    tmp: bool = opt(True, "CSL segmentation: Trusted Mask Perturbation replaces the second strong view")
    tmp_cover: float = opt(0.7, "TMP: probability that a grid cell hides its reliable pixels")
    tmp_cell: int = opt(32, "TMP: grid cell size in pixels (round(crop / cell)^2 cells)")


@dataclass
class CalibrateMixConfig:
    mode: str = opt(
        "off",
        "off | faithful (as released: a second forward pass over the mixes) | efficient (one forward and "
        "backward per step: the mixes built in step t join step t+1's forward)",
    )
    similarity: str = opt(
        "pixel", "pairing by cosine similarity of weak-view 'pixel's (release) or penultimate 'feature's"
    )
    loss: str = opt("bce", "mix loss: 'bce' sigmoid cross-entropy over classes (release) or softmax 'ce'")
    k: int = opt(15, "each anchor's partner is drawn from its k least similar candidates (release: 15 of 224)")
    warmup: float = opt(150_000 / 2**20, "fraction of train.steps before mixing starts (release: 150,000 of 2^20)")
    alpha: float = opt(0.4, "mixing weight lambda ~ Beta(alpha, alpha), one per group")
    apm_delta: float = opt(0.997, "APM update a = delta / (1 + visits)")
    apm_dtype: str = opt("float32", "storage of the per-class APM: float32, or float16 (half the memory)")


@dataclass
class TrainConfig:
    steps: int = opt(1000, "optimisation steps (the learning-rate schedule spans them)")
    batch_size: int = opt(64, "labeled images per step, all processes together (torchrun: each takes 1/N)")
    uratio: int = opt(7, "unlabeled batch = uratio * batch_size")
    lr: float = opt(0.03, "SGD learning rate at step 0")
    schedule: str = opt(
        "cosine", "learning-rate schedule: cosine (FixMatch: lr0·cos(7πk/16K)) or poly (UniMatch: lr0·(1−k/K)^power)"
    )
    poly_power: float = opt(0.9, "exponent of the poly schedule (UniMatch: 0.9)")
    head_lr_scale: float = opt(1.0, "learning-rate multiplier for the model's head (UniMatch: 10 for the decoder)")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "weight decay on conv/linear weights (not BatchNorm, not biases)")
    ema: float = opt(0.999, "model EMA for evaluation (buffers copied from the live model)")
    eval_every: int = opt(250, "steps between evaluations (and last.pt saves)")
    save_every: int = opt(0, "steps between extra last.pt saves without evaluation (0: only at evaluations)")
    nonfinite: str = opt(
        "stop",
        "a non-finite loss: 'stop' the run (naming the step and the last good checkpoint), or 'skip' the "
        "step (no update; selector, trackers and BatchNorm statistics restored) and count it",
    )
    eval_batch_size: int = opt(512, "images per evaluation forward, per process (a memory knob, not a training knob)")
    log_every: int = opt(50, "steps between logged training averages")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    amp: bool = opt(
        True,
        "bfloat16 autocast where the device runs it natively (CUDA; CPUs with AVX-512 BF16 or AMX); "
        "false keeps float32",
    )
    channels_last: bool = opt(True, "channels-last memory format (CUDA, and the CPU when amp applies)")
    compile: bool = opt(False, "torch.compile the training model")
    threads: int | None = opt(None, "torch intra-op threads on CPU (None: torch's default)")


@dataclass
class Config:
    description: str = opt("", "one line shown by `trustmatch list`")
    seed: int = opt(0, "fixes the labeled/validation split, the initialisation and the data order")
    task: str = opt("classification", "what is learned: classification or segmentation")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibratemix: CalibrateMixConfig = field(default_factory=CalibrateMixConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every key but the method keys this method does not read, which ``from_dict`` would reject."""
        values = dataclasses.asdict(self)
        reads = method_keys(self.method.name, self.task)
        values["method"] = {k: v for k, v in values["method"].items() if k == "name" or k in reads}
        return values


def shipped_configs() -> dict[str, dict[str, Any]]:
    """Name -> values of the configs shipped with the package (generated in ``trustmatch.presets``)."""
    return copy.deepcopy(PRESETS)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown config key {key!r}{hint} (see `trustmatch list --keys`)")


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or say which key is wrong."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif hint in (int, float, str) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        if not (hint is int and isinstance(value, float)):  # never truncate 2.5 to 2 silently
            try:
                return hint(value)
            except ValueError:
                pass
    type_name = getattr(hint, "__name__", str(hint))
    raise UserError(f"config key {key!r} expects {type_name}, got {value!r}")


def _merge(target: Any, values: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(target))
    for name, value in values.items():
        key = prefix + str(name)
        if name not in hints:
            while isinstance(value, dict) and value:  # name the full key the user wrote
                name, value = next(iter(value.items()))
                key = f"{key}.{name}"
            raise _unknown_key(key)
        if dataclasses.is_dataclass(hints[name]):
            _merge(getattr(target, name), value, key + ".")
        else:
            setattr(target, name, _coerce(key, value, hints[name]))


def _validate(cfg: Config, given: set[str]) -> None:
    """Check values; ``given`` are the method.* keys set explicitly, which the method must read."""
    if cfg.method.name not in METHODS:
        raise UserError(f"config key 'method.name' must be one of {', '.join(METHODS)}, got {cfg.method.name!r}")
    spec = METHODS[cfg.method.name]
    if cfg.task in TASK_NAMES and cfg.task not in spec.tasks:  # a task of the user's own reads every method
        others = [name for name, m in METHODS.items() if cfg.task in m.tasks]
        hint = " (its fixed-threshold selection is 'unimatch' there)" if cfg.method.name == "fixmatch" else ""
        raise UserError(
            f"method {cfg.method.name!r} does not train task {cfg.task!r}{hint}: use one of {', '.join(others)}"
        )
    reads = method_keys(cfg.method.name, cfg.task)  # TMP keys would do nothing in classification
    foreign = sorted(given - {"name"} - set(reads))
    if foreign:
        task = f" in {cfg.task}" if foreign[0] in METHODS[cfg.method.name].keys else ""  # e.g. TMP's keys
        raise UserError(
            f"config key 'method.{foreign[0]}' does not apply to method {cfg.method.name!r}{task} "
            f"(its keys: {', '.join(reads) or 'none'})"
        )
    for key in _all_keys():  # inf or nan passes every range check below (``inf > 0``) and trains on nonsense
        value = _get(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
    checks = [
        (cfg.data.labels_per_class >= 1, "data.labels_per_class", "at least 1"),
        (cfg.data.val_per_class >= 0, "data.val_per_class", "0 or more"),
        (0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction", "between 0 and 1"),
        (cfg.data.image_size is None or cfg.data.image_size >= 8, "data.image_size", "at least 8 pixels"),
        (cfg.train.steps >= 1, "train.steps", "at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", "at least 1"),
        (cfg.train.uratio >= 1, "train.uratio", "at least 1"),
        (cfg.train.lr > 0, "train.lr", "positive"),
        (cfg.train.eval_every >= 1, "train.eval_every", "at least 1"),
        (cfg.train.log_every >= 1, "train.log_every", "at least 1"),
        (cfg.train.save_every >= 0, "train.save_every", "0 (only at evaluations) or more"),
        (cfg.train.nonfinite in NONFINITE_POLICIES, "train.nonfinite", " or ".join(map(repr, NONFINITE_POLICIES))),
        (0.0 <= cfg.train.ema < 1.0, "train.ema", "in [0, 1)"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size", "at least 1"),
        (cfg.train.threads is None or cfg.train.threads >= 1, "train.threads", "None or at least 1"),
        (cfg.train.momentum >= 0, "train.momentum", "0 or more"),
        (cfg.train.weight_decay >= 0, "train.weight_decay", "0 or more"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout", "in [0, 1)"),
        (cfg.train.schedule in SCHEDULES, "train.schedule", f"one of {', '.join(SCHEDULES.names())}"),
        (cfg.train.poly_power > 0, "train.poly_power", "positive"),
        (cfg.train.head_lr_scale > 0, "train.head_lr_scale", "positive"),
        (cfg.data.strong_ops >= 0, "data.strong_ops", "0 or more"),
        (
            cfg.data.strong_magnitude is None or 0.0 <= cfg.data.strong_magnitude <= 1.0,
            "data.strong_magnitude",
            "None or in [0, 1]",
        ),
        (0.0 < cfg.method.tau <= 1.0, "method.tau", "in (0, 1]"),
        (0.0 <= cfg.method.ema_m < 1.0, "method.ema_m", "in [0, 1)"),
        (cfg.method.n_sigma > 0, "method.n_sigma", "positive"),
        (cfg.method.pseudo_label_from in ("raw", "aligned"), "method.pseudo_label_from", "'raw' or 'aligned'"),
        (cfg.method.temperature > 0, "method.temperature", "positive"),
        (cfg.method.csl_alpha > 0, "method.csl_alpha", "positive"),
        (cfg.method.csl_dispersion in CSL_DISPERSIONS, "method.csl_dispersion", " or ".join(CSL_DISPERSIONS)),
        (cfg.method.csl_reliable in CSL_RELIABLE_RULES, "method.csl_reliable", " or ".join(CSL_RELIABLE_RULES)),
        (0.0 <= cfg.method.tmp_cover <= 1.0, "method.tmp_cover", "in [0, 1]"),
        (cfg.method.tmp_cell >= 1, "method.tmp_cell", "at least 1 pixel"),
        (cfg.data.crop_size >= 8, "data.crop_size", "at least 8 pixels"),
        (cfg.data.workers >= 0, "data.workers", "0 or more"),
        (cfg.data.scenes >= 2, "data.scenes", "at least 2"),
        (1 <= cfg.data.labeled_images < cfg.data.scenes, "data.labeled_images", "at least 1 and below data.scenes"),
        (cfg.data.val_images >= 0, "data.val_images", "0 or more"),
        (cfg.data.cache in ("memory", "disk", "auto"), "data.cache", "'memory', 'disk' or 'auto'"),
        (
            cfg.data.cache != "disk" or (cfg.task != "segmentation" and cfg.data.name != "digits"),
            "data.cache",
            "memory or auto here: digits is embedded (always in memory) and segmentation decodes per batch",
        ),
        (cfg.model.output_stride in (8, 16), "model.output_stride", "8 or 16"),
        (
            cfg.calibratemix.mode == "off" or cfg.task == "classification",
            "calibratemix.mode",
            "off for segmentation (CalibrateMix is a classification method)",
        ),
        (cfg.calibratemix.mode in CALIBRATEMIX_MODES, "calibratemix.mode", " | ".join(CALIBRATEMIX_MODES)),
        (
            cfg.calibratemix.mode == "off" or cfg.method.name != "supervised",
            "calibratemix.mode",
            "off for method 'supervised' (CalibrateMix mixes labeled with unlabeled images)",
        ),
        (
            cfg.calibratemix.mode == "off" or cfg.train.batch_size >= 2,
            "train.batch_size",
            "at least 2 with CalibrateMix (each batch is split into an easy and a hard half)",
        ),
        (cfg.calibratemix.similarity in ("pixel", "feature"), "calibratemix.similarity", "'pixel' or 'feature'"),
        (cfg.calibratemix.loss in ("bce", "ce"), "calibratemix.loss", "'bce' or 'ce'"),
        (cfg.calibratemix.k >= 1, "calibratemix.k", "at least 1"),
        (0.0 <= cfg.calibratemix.warmup < 1.0, "calibratemix.warmup", "a fraction in [0, 1)"),
        (cfg.calibratemix.alpha > 0, "calibratemix.alpha", "positive"),
        (0.0 < cfg.calibratemix.apm_delta <= 1.0, "calibratemix.apm_delta", "in (0, 1]"),
        (cfg.calibratemix.apm_dtype in ("float32", "float16"), "calibratemix.apm_dtype", "'float32' or 'float16'"),
    ]
    for ok, key, expected in checks:
        if not ok:
            value = _get(cfg, key)
            raise UserError(f"config key {key!r} must be {expected}, got {value!r}")


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``a.b=value`` strings into a nested mapping (values stay strings: typed on merge)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (for example train.steps=2000)")
        key, value = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} sets a key inside a value")
        node[parts[-1]] = _override_value(value)
    return nested


def _override_value(text: str) -> Any:
    """A command-line value read as YAML (``0.9``, ``true``, ``null``, ``[1, 2]``); text that is not valid
    YAML (``@home``, ``[0.9``) stays a string, which the key's type then accepts or names in one line."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_values(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top``'s keys over ``base``'s, section by section (neither is changed)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_config(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``merge_values``, except that where ``top`` names another method, the base's method keys that
    method does not read are left behind (they would do nothing for it): ``digits-softmatch`` with
    ``method.name=csl`` is CSL on the digits setting, not an error about SoftMatch's ``ema_m``. Keys
    both methods read carry over; a foreign key given beside the new name is still an error."""
    name = top.get("method", {}).get("name") if isinstance(top.get("method"), dict) else None
    base_method = base.get("method")
    if name in METHODS and isinstance(base_method, dict) and base_method.get("name") != name:
        reads = METHODS[name].keys
        base = {**base, "method": {k: v for k, v in base_method.items() if k in reads}}
    return merge_values(base, top)


def read_config(name_or_path: str, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A shipped config's values, or a YAML file's with its ``base:`` chain merged in."""
    if name_or_path in PRESETS:
        return copy.deepcopy(PRESETS[name_or_path])
    return read_config_file(resolve_config_path(name_or_path), seen)


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its ``base:`` chain merged in (a YAML file beside it, or a shipped name)."""
    if path.resolve() in seen:
        raise UserError(f"config file {seen[-1]} has a circular 'base:' chain through {path}")
    data, lines = _read_yaml_lines(path)
    _check_file_keys(path, data, lines)
    base = data.pop("base", None)
    if base is None:
        return data
    beside, seen = path.parent / str(base), seen + (path.resolve(),)
    values = read_config_file(beside, seen) if beside.is_file() else read_config(str(base), seen)
    return merge_config(values, data)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping; a syntax error (with its line and column), a duplicated key or a file that is
    not a mapping is one line naming the file."""
    return _read_yaml_lines(path)[0]


def _read_yaml_lines(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """``read_yaml``'s mapping and the line of every key in it (``"train.steps" -> 3``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text: a config is a YAML text file") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML{_yaml_error(e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path} must hold a mapping of keys (key: value lines), not a {type(data).__name__}"
        )
    lines: dict[str, int] = {}
    _key_lines(path, node, "", lines)
    return data, lines


def _yaml_error(error: yaml.YAMLError) -> str:
    """`` at line L, column C: problem (context at line L'): fix`` from PyYAML's multi-line message."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [type(error).__name__])[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"{where}: {problem}; fix the syntax there (indent with spaces, quote values holding ': ' or ' #')"


def _key_lines(path: Path, node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    """Record each mapping key's line; a key given twice in one mapping is an error (YAML keeps the last)."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        name, line = str(key_node.value), key_node.start_mark.line + 1
        if name in seen:
            raise UserError(
                f"config file {path} line {line}: key {prefix + name!r} is given twice (lines {seen[name]} and "
                f"{line}): keep one"
            )
        seen[name] = lines[prefix + name] = line
        _key_lines(path, value_node, f"{prefix}{name}.", lines)


def _check_file_keys(
    path: Path, values: dict[str, Any], lines: dict[str, int], cls: type | None = None, prefix: str = ""
) -> None:
    """Every key of one config file known and of its type, named with the file and line (a typo in a
    ``base:`` chain is found in the file that holds it). Ranges are checked once the chain is merged."""
    hints = typing.get_type_hints(cls or Config)
    for name, value in values.items():
        key = prefix + str(name)
        where = f"config file {path} line {lines[key]}" if key in lines else f"config file {path}"
        if key == "base":
            continue
        if name not in hints:
            while isinstance(value, dict) and value:  # name the full key the user wrote, as ``_merge``
                name, value = next(iter(value.items()))
                key = f"{key}.{name}"
            raise UserError(f"{where}: {_unknown_key(key)}")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise UserError(
                    f"{where}: {key!r} is a section: indent its keys under it ({key}:, then '  key: value' lines), "
                    f"got {value!r}"
                )
            _check_file_keys(path, value, lines, hints[name], key + ".")
        else:
            try:
                _coerce(key, value, hints[name])
            except UserError as e:
                raise UserError(f"{where}: {e}") from None


def resolve_config_path(name_or_path: str) -> Path:
    """The path of a user YAML file; a bare name that is none suggests the closest shipped config."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise UserError(f"config file {path} is a folder: name a YAML file or a shipped config")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        return path
    close = difflib.get_close_matches(name_or_path, PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"no shipped config named {name_or_path!r}{hint} (see `trustmatch list`)")


def from_dict(values: dict[str, Any]) -> Config:
    """A validated config from nested values; the keys not given keep their defaults."""
    cfg = Config()
    _merge(cfg, values)
    given = set(values.get("method", {}))
    if cfg.method.name in METHODS:  # a method's own defaults (UDA's tau 0.8) where the key is not given
        for key, value in METHODS[cfg.method.name].defaults:
            if key not in given:
                setattr(cfg.method, key, value)
    _validate(cfg, given)
    return cfg


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A shipped config name or a YAML path, with ``key=value`` overrides applied on top."""
    return from_dict(merge_config(read_config(name_or_path), parse_overrides(overrides or [])))


def all_keys() -> list[str]:
    return _all_keys()


def describe_keys(cls: type = Config, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, for ``trustmatch list --keys``."""
    defaults = cls() if defaults is None else defaults
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe_keys(hint, f"{prefix}{f.name}.", getattr(defaults, f.name))
        else:
            rows.append((prefix + f.name, repr(getattr(defaults, f.name)), f.metadata.get("help", "")))
    return rows
