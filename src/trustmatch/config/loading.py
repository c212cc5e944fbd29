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
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from trustmatch.config.presets import PRESETS
from trustmatch.config.schema import (
    DEFAULT_METHOD,
    INTERPOLATIONS,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    PIXEL_TEMPERATURES,
    PREFETCH_MODES,
    Config,
)
from trustmatch.core.errors import UserError
from trustmatch.core.lr_schedules import SCHEDULES
from trustmatch.methods import METHODS, MethodConfig, method_config


def shipped_configs() -> dict[str, dict[str, Any]]:
    """Name -> values of the configs shipped with the package (generated in ``trustmatch.config.presets``)."""
    return copy.deepcopy(PRESETS)


def _hints(cls: type) -> dict[str, Any]:
    """Field name -> type of a config dataclass; the method section: every method's keys together, so that
    a key of another method is typed and then refused in one line naming the method (``_validate``)."""
    if issubclass(cls, MethodConfig):
        return {k: hint for config in _method_classes() for k, hint in _hints_of(config).items()}
    return _hints_of(cls)


def _hints_of(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _method_classes() -> list[type[MethodConfig]]:
    return [METHODS.get(name).Config for name in METHODS]


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


#: keys replaced since runs saved them: a user's config naming one is refused with its replacement; a saved
#: run's config is read under the new key (``from_saved``)
REPLACED_KEYS = {
    "model.pretrained": "model.weights: imagenet (ImageNet weights, an error where they cannot be had, never a "
    "silent random init), none, or a weights file path",
}


def _unknown_key(key: str) -> UserError:
    if key in REPLACED_KEYS:
        return UserError(f"config key {key!r} was replaced by {REPLACED_KEYS[key]}")
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown config key {key!r}{hint} (see `trustmatch list --keys`)")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans (true / false) only: YAML 1.1 also reads ``off``, ``no`` and ``on`` as
    booleans, which turned ``calibratemix.mode=off`` into False; such words stay text, and a boolean
    key accepts them (``_BOOL_WORDS``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


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
    hints, own = _hints(type(target)), _hints_of(type(target))
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
            value = _coerce(key, value, hints[name])
            if name in own:  # (another method's key: typed, then refused by ``_validate``)
                setattr(target, name, value)


def _validate(cfg: Config, given: set[str]) -> None:
    """Check values; ``given`` are the method.* keys set explicitly, which the method must read."""
    if cfg.method.name not in METHODS:
        raise UserError(f"config key 'method.name' must be one of {', '.join(METHODS)}, got {cfg.method.name!r}")
    method = METHODS.get(cfg.method.name)
    if cfg.task in METHODS.tasks() and cfg.task not in method.tasks:  # a task of the user's own reads every method
        others = METHODS.for_task(cfg.task)
        hint = f" ({method.elsewhere[cfg.task]})" if cfg.task in method.elsewhere else ""
        raise UserError(
            f"method {cfg.method.name!r} does not train task {cfg.task!r}{hint}: use one of {', '.join(others)}"
        )
    reads = cfg.method.keys(cfg.task)  # TMP keys would do nothing in classification
    foreign = sorted(given - {"name"} - set(reads))
    if foreign:
        task = f" in {cfg.task}" if foreign[0] in cfg.method.keys() else ""  # e.g. TMP's keys
        raise UserError(
            f"config key 'method.{foreign[0]}' does not apply to method {cfg.method.name!r}{task} "
            f"(its keys: {', '.join(reads) or 'none'})"
        )
    for key in _all_keys():  # inf or nan passes every range check below (``inf > 0``) and trains on nonsense
        value = _get(cfg, key, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
    checks = [
        (cfg.data.labels_per_class >= 0, "data.labels_per_class", "at least 1, or 0 (every training image)"),
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
        (cfg.train.prefetch in PREFETCH_MODES, "train.prefetch", " or ".join(map(repr, PREFETCH_MODES))),
        (0.0 <= cfg.train.ema < 1.0, "train.ema", "in [0, 1)"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size", "at least 1"),
        (cfg.train.threads is None or cfg.train.threads >= 1, "train.threads", "None or at least 1"),
        (cfg.train.momentum >= 0, "train.momentum", "0 or more"),
        (cfg.train.weight_decay >= 0, "train.weight_decay", "0 or more"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout", "in [0, 1)"),
        (cfg.train.schedule in SCHEDULES, "train.schedule", f"one of {', '.join(SCHEDULES.names())}"),
        (cfg.train.optimizer in OPTIMIZERS, "train.optimizer", " or ".join(map(repr, OPTIMIZERS))),
        (0.0 <= cfg.train.warmup < 1.0, "train.warmup", "a fraction of train.steps in [0, 1)"),
        (0.0 < cfg.train.layer_decay <= 1.0, "train.layer_decay", "in (0, 1] (1: off)"),
        (
            not cfg.train.freeze or cfg.task == "classification",
            "train.freeze",
            f"false for task {cfg.task!r}: it is linear probing of a classifier's head, and method "
            f"{cfg.method.name!r} trains a segmentation decoder, not a linear head",
        ),
        (0.5 <= cfg.data.crop_ratio <= 1.0, "data.crop_ratio", "in [0.5, 1] (a shift of at most half the side)"),
        (
            cfg.data.interpolation in (None, *INTERPOLATIONS),
            "data.interpolation",
            f"None (the model's) or one of {', '.join(INTERPOLATIONS)}",
        ),
        (cfg.train.poly_power > 0, "train.poly_power", "positive"),
        (cfg.train.head_lr_scale > 0, "train.head_lr_scale", "positive"),
        (cfg.data.strong_ops >= 0, "data.strong_ops", "0 or more"),
        (
            cfg.data.strong_magnitude is None or 0.0 <= cfg.data.strong_magnitude <= 1.0,
            "data.strong_magnitude",
            "None or in [0, 1]",
        ),
        *cfg.method.checks(),
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
            not cfg.model.weights_prefix or cfg.model.weights not in ("none", "imagenet"),
            "model.weights_prefix",
            "empty unless model.weights is a file (it selects that file's keys)",
        ),
        *cfg.calibratemix.checks(cfg.task, method, cfg.train.batch_size),
        (
            cfg.eval.pixel_temperature in PIXEL_TEMPERATURES,
            "eval.pixel_temperature",
            " | ".join(PIXEL_TEMPERATURES),
        ),
        (
            cfg.eval.pixel_temperature == "scalar" or cfg.task != "classification",
            "eval.pixel_temperature",
            "scalar for classification (one T is fitted on validation; the key chooses segmentation's)",
        ),
    ]
    for ok, key, expected in checks:
        if not ok:
            value = _get(cfg, key)
            raise UserError(f"config key {key!r} must be {expected}, got {value!r}")


def _get(cfg: Config, key: str, *default: Any) -> Any:
    """The value at a dotted key (``default`` where the chosen method has no such key)."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part, *default)
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
        node[parts[-1]] = override_value(value)
    return nested


def override_value(text: str) -> Any:
    """A command-line value read as YAML (``0.9``, ``true``, ``null``, ``[1, 2]``); text that is not valid
    YAML (``@home``, ``[0.9``) stays a string, which the key's type then accepts or names in one line."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
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
        reads = METHODS.get(name).Config.keys()
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
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
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
    hints = _hints(cls or Config)
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
    section = values.get("method")
    given = set(section) if isinstance(section, dict) else set()
    if "name" in given:  # the method's own section, with its defaults (UDA's tau 0.8), before its keys merge
        assert isinstance(section, dict)
        name = _coerce("method.name", section["name"], str)
        if name in METHODS:  # (an unknown name is named by ``_validate``, after every key's type)
            cfg.method = method_config(name)
    _merge(cfg, values)
    _validate(cfg, given)
    return cfg


def from_saved(values: dict[str, Any]) -> Config:
    """A run's saved config (config.yaml, a checkpoint's), method values renamed since it was written
    (``MethodConfig.renamed``) read under their new names, replaced keys under theirs (``model.pretrained``:
    true as ``model.weights=imagenet``, which a resume never fetches: the checkpoint's weights replace them), and
    keys added since then at the value that reproduces the run (``calibratemix.second_pass_stats``: false), so
    that older runs resume as they ran."""
    section = values.get("method")
    if isinstance(section, dict) and section.get("name") in METHODS:
        renamed = METHODS.get(section["name"]).Config.renamed
        section = {k: renamed[k].get(v, v) if k in renamed and isinstance(v, str) else v for k, v in section.items()}
        values = {**values, "method": section}
    model = values.get("model")
    if isinstance(model, dict) and "pretrained" in model:  # before model.weights: a failed fetch started at random
        model = {k: v for k, v in model.items() if k != "pretrained"}
        values = {**values, "model": {**model, "weights": "imagenet" if values["model"]["pretrained"] else "none"}}
    mix = values.get("calibratemix")
    if isinstance(mix, dict) and "second_pass_stats" not in mix:  # saved before the key: updated once a step
        values = {**values, "calibratemix": {**mix, "second_pass_stats": False}}
    return from_dict(values)


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
        hint = _hints_of(cls)[f.name]
        if hint is MethodConfig:
            rows += _describe_method_keys(f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(hint):
            rows += describe_keys(hint, f"{prefix}{f.name}.", getattr(defaults, f.name))
        else:
            rows.append((prefix + f.name, repr(getattr(defaults, f.name)), f.metadata.get("help", "")))
    return rows


def _describe_method_keys(prefix: str) -> list[tuple[str, str, str]]:
    """``name``, then every method's keys once: the first method's default (others' where they differ)
    and help, with the methods that read the key."""
    readers: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name in METHODS:
        for f in dataclasses.fields(METHODS.get(name).Config):
            if f.name != "name":
                readers.setdefault(f.name, []).append((name, f))
    rows = [(f"{prefix}name", repr(DEFAULT_METHOD), f"the method: {', '.join(METHODS)}")]
    for key, entries in readers.items():
        first = entries[0][1]
        others = "".join(f", {name}: {f.default!r}" for name, f in entries[1:] if f.default != first.default)
        methods = ", ".join(name for name, _ in entries)
        rows.append((prefix + key, repr(first.default) + others, f"{first.metadata.get('help', '')} [{methods}]"))
    return rows
