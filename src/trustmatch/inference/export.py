"""``--export-labeled DIR``: accepted predictions written as a labeled folder in the project's own format
(classification: ``DIR/<class>/<image>``; segmentation: ``DIR/images``, ``DIR/masks``, ``DIR/classes.txt``),
so the next round of training takes them as labeled data: the self-training loop, by hand."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_bytes, write_error


class Exporter:
    """Files into an export folder that was empty, each name used once (a clash gets ``_<n>`` added)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.taken: set[Path] = set()

    @classmethod
    def start(cls, root: Path) -> Exporter:
        """Refuse a folder with files in it (an export never mixes with, or overwrites, other data)."""
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise UserError(f"--export-labeled {root} exists and is not an empty folder: name a new folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(root, e) from None
        return cls(root)

    def _free(self, relative: Path) -> Path:
        """``relative``, or ``<stem>_<n><suffix>`` when an earlier file took that name."""
        candidate, n = relative, 1
        while candidate in self.taken:
            candidate = relative.with_name(f"{relative.stem}_{n}{relative.suffix}")
            n += 1
        self.taken.add(candidate)
        return candidate

    def copy(self, source: Path, relative: Path) -> Path:
        """Copy ``source`` to ``root/relative`` (or a free name beside it); returns the path inside root."""
        relative = self._free(relative)
        target = self.root / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as e:
            raise write_error(target, e) from None
        return relative

    def write(self, relative: Path, writer: Callable[[BinaryIO], object]) -> None:
        """Write ``root/relative`` with ``writer(file)`` (the name is the caller's: a mask beside its image)."""
        self.taken.add(relative)
        target = self.root / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(target, e) from None
        atomic_write_bytes(target, writer)
