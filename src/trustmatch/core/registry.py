"""Name -> factory registries (datasets, models, methods, tasks), as in timm and torchvision."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from trustmatch.core.errors import UserError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A named table of factories whose lookup error suggests the closest name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._metadata: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[T], T]:
        """Add a factory under ``name``, with metadata that ``where`` selects by (a model's task ...)."""

        def add(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name], self._metadata[name] = fn, metadata
            return fn

        return add

    def metadata(self, name: str) -> dict[str, Any]:
        """What ``name`` was registered with besides its factory (an unknown name: ``get``'s error)."""
        self.get(name)
        return self._metadata[name]

    def where(self, **metadata: Any) -> list[str]:
        """The names registered with these metadata values, in registration order."""
        return [n for n, meta in self._metadata.items() if all(meta.get(k) == v for k, v in metadata.items())]

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

    def __iter__(self) -> Iterator[str]:
        """The names in registration order (``names`` sorts them)."""
        return iter(self._items)
