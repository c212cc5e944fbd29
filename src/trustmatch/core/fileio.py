"""One way to write a file so that a crash or a concurrent reader never sees half of it.

A failed write (a full disk, a read-only folder) is a ``UserError`` naming the file, and the file
it would have replaced is left as it was.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from trustmatch.core.errors import UserError

# what the destination causes (full, read-only, forbidden): one line here; other errors (a bad
# source read by ``write``, a file where a folder should be) are left to the caller, who knows more
DESTINATION_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then rename over ``path``.

    The file gets the permissions a plain ``open`` would give (0666 less the umask), not mkstemp's
    0600: run directories are read by colleagues and schedulers too."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in DESTINATION_ERRNOS:
            raise write_error(path, e) from None
        raise
    target = _Recording(os.fdopen(fd, "wb"))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with target.file:
            write(target)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write as its own RuntimeError: the recorded OSError is the cause
        cause = e if isinstance(e, OSError) else target.error
        if cause is not None and cause.errno in DESTINATION_ERRNOS:
            raise write_error(path, cause) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Recording:
    """A binary file that remembers the first OSError of a write, for writers that replace it."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def fileno(self) -> int:
        return self.file.fileno()

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def __getattr__(self, name: str) -> Any:  # everything else (mode, name, truncate, ...) as the file has it
        return getattr(self.file, name)


def write_error(path: Path, error: OSError) -> UserError:
    """One line for a failed write: the file, the reason, the fix, and that nothing older was lost."""
    reason = error.strerror or str(error) or type(error).__name__
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    return UserError(f"cannot write {path} ({reason}){kept}: free disk space or make its folder writable")


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text (configs, metrics, CSV)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
