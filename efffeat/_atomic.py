"""The one way efffeat writes a file: all or nothing.

The data goes to a new temporary file in the target's directory (``mkstemp``: a unique name, created with
``O_EXCL``, so no existing file or planted symlink is ever followed), is flushed to disk, and is renamed
over the target (``os.replace``, atomic on POSIX); the directory entry is flushed too. A reader sees the old
file or the new one, never a part. Temporary names carry the writer's process id, so that the leftovers of
a killed writer can be told from those of a writer still running.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".efffeat-tmp"


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it over `path`; returns `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_atomic` of a UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write_atomic(path, write)
