"""Search spaces: which config keys a study varies, and over what.

One spec syntax everywhere (a space file's ``params:``, ``--space key=spec``): ``LOW:HIGH`` (a float,
uniform), ``log:LOW:HIGH`` (a float, log-uniform), ``int:LOW:HIGH`` (``int:log:LOW:HIGH``) and
``choice:A,B,...`` (a YAML list in a file is a choice too). Files are read with every scalar as text,
so YAML 1.1 never turns ``1:5`` into 65. Shipped spaces (``spaces/<name>.yaml``) are used by name.
Every bound and choice is checked against the config (key known, read by the method, in range)
before a study starts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trustmatch.config import load_config
from trustmatch.config.loading import override_value
from trustmatch.core.errors import UserError

SPACES_DIR = Path(__file__).parent / "spaces"
SYNTAX = "LOW:HIGH, log:LOW:HIGH, int:LOW:HIGH or choice:A,B"


@dataclass(frozen=True)
class Param:
    """One searched key: a float or int range (``log``: sampled log-uniformly) or a choice."""

    key: str
    kind: str  # "float" | "int" | "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The trial's value (an ``optuna.Trial``; the key is the parameter's name in the study)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def extremes(self) -> list[Any]:
        """The values that bound what a trial may get: each is checked against the config."""
        if self.kind == "choice":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def spec(self) -> str:
        if self.kind == "choice":
            return "choice:" + ",".join(map(str, self.choices))
        prefix = ("int:" if self.kind == "int" else "") + ("log:" if self.log else "")
        return f"{prefix}{self.low:g}:{self.high:g}"


def override(key: str, value: Any) -> str:
    """``key=value`` as ``trustmatch train`` reads it back (YAML scalars)."""
    return f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"


def _number(text: str, where: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        what = "an integer (int: ranges take whole numbers)" if kind is int else "a number"
        raise UserError(f"{where}: {text!r} is not {what}; a range is {SYNTAX}") from None


def parse_spec(key: str, spec: Any) -> Param:
    """One key's spec (a string, or a list: a choice) -> ``Param``; a malformed or empty range is one line."""
    where = f"search space {key}={spec}"
    if isinstance(spec, list):
        spec = "choice:" + ",".join(map(str, spec))
    if not isinstance(spec, str):
        raise UserError(f"{where}: a spec is text ({SYNTAX}), got {type(spec).__name__}")
    kind, rest = "float", spec.strip()
    if rest.startswith("choice:"):
        items = [item.strip() for item in rest[len("choice:") :].split(",") if item.strip()]
        if len(items) < 2:
            raise UserError(f"{where}: a choice needs two values or more (one value: set it as key=value instead)")
        values = tuple(override_value(item) for item in items)  # as key=value reads it: 'off' stays a word
        if any(isinstance(v, (dict, list)) for v in values):
            raise UserError(f"{where}: choices are plain values (numbers, words, true/false)")
        return Param(key, "choice", choices=values)
    if rest.startswith("int:"):
        kind, rest = "int", rest[len("int:") :]
    log = rest.startswith("log:")
    rest = rest[len("log:") :] if log else rest
    bounds = rest.split(":")
    if len(bounds) != 2:
        raise UserError(f"{where}: not a range; write {SYNTAX}")
    low, high = (_number(b.strip(), where, int if kind == "int" else float) for b in bounds)
    if low >= high:
        raise UserError(f"{where}: empty range (low {low:g} >= high {high:g}); give LOW < HIGH")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs LOW > 0, got {low:g}; use {low}:{high} for a uniform range")
    return Param(key, kind, float(low), float(high), log)


@dataclass
class Space:
    """The searched keys (in the order given) and a label for the study's name."""

    params: dict[str, Param]
    label: str

    def suggest(self, trial: Any) -> list[str]:
        """The trial's ``key=value`` overrides."""
        return [override(key, p.suggest(trial)) for key, p in self.params.items()]

    def describe(self) -> dict[str, str]:
        return {key: p.spec() for key, p in self.params.items()}


def shipped_spaces() -> dict[str, str]:
    """Name -> description of the spaces shipped in ``spaces/``."""
    return {path.stem: _read_space_file(path)[0] for path in sorted(SPACES_DIR.glob("*.yaml"))}


def space_text(name: str) -> str:
    """A shipped space's file, for ``trustmatch list --spaces NAME``."""
    return _space_path(name).read_text(encoding="utf-8")


def _space_path(name: str) -> Path:
    path = SPACES_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, [p.stem for p in SPACES_DIR.glob("*.yaml")], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"--space {name!r} is no shipped space, file or key=spec{hint} (see `trustmatch list --spaces`)"
        )
    return path


def _read_space_file(path: Path) -> tuple[str, dict[str, Any]]:
    """(description, key -> spec) of a space file: ``description:`` (optional) and ``params:``."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)  # every scalar as text
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read space file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise UserError(
            f"space file {path}: put the ranges under 'params:' (key: spec lines, e.g. train.lr: log:0.003:0.3)"
        )
    unknown = set(data) - {"description", "params"}
    if unknown:
        raise UserError(
            f"space file {path}: unknown entry {sorted(unknown)[0]!r} (a space file has description and params)"
        )
    return str(data.get("description", "")), data["params"]


def load_space(items: list[str]) -> Space:
    """``--space`` arguments (shipped names, YAML files, ``key=spec``) merged in order; a later key wins."""
    specs: dict[str, Any] = {}
    labels: list[str] = []
    for item in items:
        if "=" in item:
            key, spec = item.split("=", 1)
            specs[key.strip()] = spec
            labels.append("custom")
            continue
        path = Path(item)
        is_file = path.suffix in (".yaml", ".yml") or path.exists()
        if is_file and not path.is_file():
            raise UserError(f"space file {path} does not exist")
        specs.update(_read_space_file(path if is_file else _space_path(item))[1])
        labels.append(path.stem)
    if not specs:
        raise UserError("tune needs --space: a shipped space (`trustmatch list --spaces`), a YAML file or key=spec")
    params = {key: parse_spec(key, spec) for key, spec in specs.items()}
    return Space(params, "+".join(dict.fromkeys(labels)))


def check_space(space: Space, config: str, overrides: list[str]) -> None:
    """Each bound and choice applied to the config on its own: an unknown key ("did you mean"), a key the
    method does not read or a value out of the key's range is one line before anything is made."""
    fixed = {item.split("=", 1)[0].strip() for item in overrides}
    for key, param in space.params.items():
        if key in fixed:
            raise UserError(f"search space: {key} is both set (after CONFIG) and searched (--space): drop one")
        for value in param.extremes():
            try:
                load_config(config, [*overrides, override(key, value)])
            except UserError as e:
                raise UserError(f"search space {key}={param.spec()}: {e}") from None
