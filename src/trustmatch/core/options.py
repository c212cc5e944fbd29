"""Config fields that carry their own help, so ``trustmatch list --keys`` reads it from the field."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its one-line help (shown by ``trustmatch list --keys``)."""
    return field(default=default, metadata={"help": help})
