"""Name -> factory registries (datasets, models, selectors), as in timm and torchvision."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from trustmatch.errors import UserError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A named table of factories whose lookup error suggests the closest name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._items))})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
