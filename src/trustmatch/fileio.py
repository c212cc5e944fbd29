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

from trustmatch.errors import UserError

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
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DESTINATION_ERRNOS:
            raise write_error(path, e) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_error(path: Path, error: OSError) -> UserError:
    """One line for a failed write: the file, the reason, the fix, and that nothing older was lost."""
    reason = error.strerror or str(error) or type(error).__name__
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    return UserError(
        f"cannot write {path} ({reason}){kept}: free disk space or make its folder writable"
    )


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text (configs, metrics, CSV)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
