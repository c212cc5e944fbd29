"""Decoded images on disk: a memory-mapped uint8 file built once, reused by later runs, read by index.

A classification set too large for memory (ImageNet at 224 px: 190 GB) is decoded once at the
training resolution into ``<data.cache_dir>/<name>.u8``: a 64 KiB header (magic, JSON: format version,
source key, shape, loader info such as the channel histogram) and the uint8 ``[N, C, H, W]`` array.
The file is mapped read-only; :class:`MappedImages` copies only the rows a batch asks for, so the
images occupy page cache (file-backed, shared by every process on the machine, evictable), not the
processes' anonymous memory.

- **Key**: a loader hashes what the pixels depend on (every source file's path, size and mtime, the
  image size and channel mode, the decoder's version, :data:`FORMAT_VERSION`); the file name says
  which source it is (folder and role), the header holds the key. A file whose header does not
  match (the source changed, an older format) is rebuilt in place.
- **Atomic**: the file is written as a temp file beside it and renamed (``fileio.atomic_write_bytes``)
  with its header, so a crash mid-build leaves only a ``.*.tmp`` (removed by the next builder) and
  never a file a later run trusts. A process still mapping a replaced file keeps reading the old one.
- **One builder**: processes take an exclusive ``flock`` on ``<name>.lock`` before building; the
  others wait on it, then find the file valid and map it. Under torchrun every process of a
  machine shares the file; machines that do not share the cache folder each build their own (the
  first process there to take the lock). Where the filesystem has no locks, concurrent builders
  each write their own temp file and the last rename wins: correct, only slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_bytes

FORMAT_VERSION = 1  # bump when the file layout or a loader's decoded pixels change
MAGIC = b"TMDECODE"
HEADER_BYTES = 1 << 16  # magic, header length, JSON; the array starts page-aligned after it
AUTO_MEMORY_FRACTION = 0.5  # data.cache=auto: disk above this share of the available memory
CACHE_MODES = ("memory", "disk", "auto")

Fill = Callable[[np.ndarray], dict[str, Any]]  # writes the decoded images into the array, returns header info


def cache_dir() -> Path:
    """Where downloads, unpacked copies and decoded images go: ``$TRUSTMATCH_CACHE`` or ``~/.cache/trustmatch``."""
    return Path(os.environ.get("TRUSTMATCH_CACHE") or Path.home() / ".cache" / "trustmatch").expanduser()


def decoded_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, or ``decoded/`` in :func:`cache_dir`."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir() / "decoded"


# ---------------------------------------------------------------------------------------------- choice


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        group = next(
            (line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")), ""
        )
        for folder in {Path("/sys/fs/cgroup") / group.lstrip("/"), Path("/sys/fs/cgroup")}:
            limit = (folder / "memory.max").read_text().strip() if (folder / "memory.max").is_file() else "max"
            if limit != "max":
                found.append(int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    return max(0, min(found))


def use_disk(cfg: DataConfig, nbytes: int) -> bool:
    """Whether a set of ``nbytes`` decoded bytes goes to the disk cache under ``data.cache``.

    ``auto``: when the decoded images times the processes on this machine (each holds its own copy
    in memory; ``LOCAL_WORLD_SIZE`` under torchrun) exceed :data:`AUTO_MEMORY_FRACTION` of
    :func:`available_memory`.
    """
    if cfg.cache != "auto":
        return cfg.cache == "disk"
    available = available_memory()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available is not None and nbytes * processes > AUTO_MEMORY_FRACTION * available


# ------------------------------------------------------------------------------------------------ keys


def source_key(files: Iterable[Path | str], *extra: object) -> str:
    """SHA-256 of every file's path, size and mtime (in order), and ``extra`` (size, mode, versions)."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, *map(str, extra)]).encode())
    for f in files:
        try:
            stat = os.stat(f)
        except OSError as e:
            raise UserError(f"cannot read {f} ({e.strerror or e}): check that the dataset is intact") from None
        digest.update(f"\0{f}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def cache_name(*parts: object) -> str:
    """A file stem saying which source a cache holds: readable parts and a hash of them all."""
    text = "|".join(map(str, parts))
    readable = "-".join(str(p) for p in parts if len(str(p)) <= 24 and "/" not in str(p))
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------- files


def _read_header(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                return None
            length = int.from_bytes(head[8:], "little")
            if length > HEADER_BYTES - 16:
                return None
            header = json.loads(f.read(length))
            header["_size"] = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _open_valid(path: Path, key: str, shape: tuple[int, ...]) -> tuple[np.memmap, dict[str, Any]] | None:
    """The mapped array and its header info, if ``path`` is a complete cache of ``key``; else None."""
    header = _read_header(path)
    if (
        header is None
        or header.get("version") != FORMAT_VERSION
        or header.get("key") != key
        or tuple(header.get("shape", ())) != shape
        or header["_size"] != HEADER_BYTES + math.prod(shape)
    ):
        return None
    array = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=shape)
    return array, header.get("info", {})


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (True), or go on without one (False) where there is none."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        locked = True
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process to finish the decoded-image cache {path.stem}", file=sys.stderr)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: builders may race, each on its own temp file
            locked = False
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _build(path: Path, key: str, shape: tuple[int, ...], fill: Fill, source: str) -> None:
    nbytes = HEADER_BYTES + math.prod(shape)

    def write(f: Any) -> None:  # f: a binary file (``fileio`` may wrap it): only fileno, seek and write are used
        fd = f.fileno()
        if hasattr(os, "posix_fallocate"):  # a full disk fails here with ENOSPC, not as SIGBUS mid-build
            os.posix_fallocate(fd, 0, nbytes)
        else:
            os.ftruncate(fd, nbytes)
        mapped = mmap.mmap(fd, nbytes)
        try:
            array = np.frombuffer(mapped, dtype=np.uint8, count=math.prod(shape), offset=HEADER_BYTES)
            info = fill(array.reshape(shape))
            del array
            mapped.flush()
        finally:
            with contextlib.suppress(BufferError):  # an exception's traceback may still hold the array
                mapped.close()
        header = json.dumps(
            {"version": FORMAT_VERSION, "key": key, "shape": list(shape), "source": source, "info": info}
        )
        data = header.encode()
        if len(data) > HEADER_BYTES - 16:
            raise ValueError(f"decoded-image cache header of {len(data)} bytes does not fit in {HEADER_BYTES}")
        f.seek(0)
        f.write(MAGIC + len(data).to_bytes(8, "little") + data)

    atomic_write_bytes(path, write)


def open_cache(
    folder: Path, name: str, key: str, shape: tuple[int, ...], fill: Fill, source: str = ""
) -> tuple[np.ndarray, dict[str, Any]]:
    """The uint8 array ``shape`` cached as ``folder/<name>.u8`` under ``key`` (built by ``fill`` if needed).

    Returns the read-only memory map and the info ``fill`` returned when it was built. Safe to call
    from many processes at once: one builds, the others wait for it (see the module docstring).
    """
    if math.prod(shape) == 0:
        array = np.empty(shape, dtype=np.uint8)
        return array, fill(array)
    path = folder / f"{name}.u8"
    found = _open_valid(path, key, shape)
    if found is not None:
        return found
    try:
        return _build_or_wait(folder, name, path, key, shape, fill, source)
    except OSError as e:  # a folder that cannot be made or locked (a full disk is fileio's one line already)
        raise UserError(
            f"cannot write the decoded-image cache in {folder} ({e.strerror or e}): set data.cache_dir to a "
            "writable folder, or data.cache=memory"
        ) from None


def _build_or_wait(
    folder: Path, name: str, path: Path, key: str, shape: tuple[int, ...], fill: Fill, source: str
) -> tuple[np.ndarray, dict[str, Any]]:
    with _build_lock(folder / f"{name}.lock") as locked:
        found = _open_valid(path, key, shape)  # another process may have built it while this one waited
        if found is not None:
            return found
        if locked:  # no other builder of this name is running: its leftovers are a crashed build's, and
            for stale in folder.glob(f".{name}.u8.*.tmp"):  # an outdated cache goes first, so a rebuild
                stale.unlink(missing_ok=True)  # needs its size once, not twice (mappers keep their inode)
            path.unlink(missing_ok=True)
        gb = math.prod(shape) / 1e9
        print(f"decoding {shape[0]:,} images ({gb:.2f} GB) into {path} (once: later runs reuse it)", file=sys.stderr)
        _build(path, key, shape, fill, source)
    found = _open_valid(path, key, shape)
    if found is None:  # replaced by a concurrent builder of another source between the rename and now
        raise UserError(f"the decoded-image cache {path} changed while it was opened: run again")
    return found


# ------------------------------------------------------------------------------------------------ view


class MappedImages:
    """uint8 images ``[N, C, H, W]`` read by index from arrays (memory maps): only indexed rows are copied.

    Indexing works as on a tensor: ``images[index_tensor]`` (and ints, slices, lists, boolean masks)
    returns a new uint8 tensor in memory. The rows are read in sorted order (monotone page faults,
    the kernel's read-ahead helps) and then put back in the order asked for. ``subset`` and ``cat``
    compose indices and never copy pixels. ``parts`` are the underlying arrays; a row of the view is
    a row of their concatenation, chosen by ``index`` (None: all of them, in order).
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, parts: Sequence[np.ndarray], index: np.ndarray | None = None) -> None:
        self.parts = tuple(parts)
        if not self.parts or any(p.dtype != np.uint8 or p.ndim != 4 for p in self.parts):
            raise ValueError("MappedImages needs one or more uint8 [N, C, H, W] arrays")
        if len({p.shape[1:] for p in self.parts}) != 1:
            raise ValueError(f"image shapes differ: {sorted({p.shape[1:] for p in self.parts})}")
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.shape = torch.Size((self._rows(), *self.parts[0].shape[1:]))

    def _rows(self) -> int:
        return int(self.starts[-1]) if self.index is None else len(self.index)

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        files = [str(getattr(p, "filename", None) or "array") for p in self.parts]
        return f"MappedImages(shape={tuple(self.shape)}, parts={files})"

    @property
    def files(self) -> list[str]:
        """The files mapped (memory-map parts only)."""
        return [str(p.filename) for p in self.parts if getattr(p, "filename", None)]

    def _positions(self, key: Any) -> np.ndarray:
        """Rows of this view named by ``key`` (int64, non-negative, checked)."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        if isinstance(key, Tensor):
            key = key.cpu().numpy()
        rows = np.asarray(key)
        if rows.dtype == np.bool_:
            if rows.shape != (n,):
                raise IndexError(f"boolean index of shape {rows.shape} for {n} images")
            return np.flatnonzero(rows)
        if not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"images can be indexed by integers, slices or masks, not {rows.dtype}")
        rows = rows.astype(np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        return rows

    def _global(self, key: Any) -> np.ndarray:
        rows = self._positions(key)
        return rows if self.index is None else self.index[rows]

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, tuple):
            head, rest = (key[0], key[1:]) if key else (slice(None), ())
            rows = self[head]
            return rows[rest] if _is_scalar(head) else rows[(slice(None), *rest)]
        if _is_scalar(key):
            return self[np.asarray([int(key)])][0]
        return torch.from_numpy(self._gather(self._global(key)))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if not len(rows):
            return out
        ordered = bool((rows[1:] >= rows[:-1]).all())
        order = None if ordered else np.argsort(rows, kind="stable")
        sorted_rows = rows if order is None else rows[order]
        target = out if order is None else np.empty_like(out)
        bounds = np.searchsorted(sorted_rows, self.starts)
        for p, part in enumerate(self.parts):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            if hi > lo:
                rows_p = sorted_rows[lo:hi] - self.starts[p]  # checked above: "clip" only skips a buffered copy
                np.take(part, rows_p, axis=0, out=target[lo:hi], mode="clip")
        if order is not None:
            out[order] = target
        return out

    def subset(self, index: Tensor | np.ndarray) -> MappedImages:
        """The images at ``index`` (a view: no pixel is copied)."""
        return MappedImages(self.parts, self._global(index))

    def cat(self, other: MappedImages) -> MappedImages:
        """This view followed by ``other`` (a view: no pixel is copied)."""
        parts, offsets = list(self.parts), []
        for p, start in zip(other.parts, other.starts):
            same = next((i for i, q in enumerate(parts) if q is p), None)
            if same is None:
                parts.append(p)
                same = len(parts) - 1
            offsets.append(int(np.cumsum([0] + [len(q) for q in parts])[same]) - int(start))
        mine = np.arange(self.starts[-1], dtype=np.int64) if self.index is None else self.index
        theirs = np.arange(other.starts[-1], dtype=np.int64) if other.index is None else other.index
        part_of = np.searchsorted(other.starts, theirs, side="right") - 1
        shifted = theirs + np.asarray(offsets, dtype=np.int64)[part_of]
        return MappedImages(parts, np.concatenate([mine, shifted]))


def _is_scalar(key: Any) -> bool:
    return isinstance(key, (int, np.integer)) or (isinstance(key, (Tensor, np.ndarray)) and key.ndim == 0)


def as_mapped(images: Tensor | MappedImages) -> MappedImages:
    """A tensor as a one-part view (its memory shared), or the view itself."""
    return images if isinstance(images, MappedImages) else MappedImages((images.numpy(),))
