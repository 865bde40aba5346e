"""The one way efffeat writes a file: all or nothing.

The data goes to a new temporary file in the target's directory (``mkstemp``: a unique name, created with
``O_EXCL``, so no existing file or planted symlink is ever followed), is flushed to disk, and is renamed
over the target (``os.replace``, atomic on POSIX); the directory entry is flushed too. A reader sees the old
file or the new one, never a part.

Temporary names carry the writer's host and process id (``.<name>.<host>.<pid>.<random>.efffeat-tmp``), so
that the leftovers of a killed writer can be told from the files of a writer still running: each new
temporary file first removes those of this host's writers that are no longer alive from its directory.

`write_atomic` fills the file through a callback; `new_temp` / `commit` / `discard` are its three steps, for
writers that fill one temporary file from several processes (`efffeat.distributed.kernel_to_disk`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".efffeat-tmp"

# Characters of a target's name kept in its temporary name (NAME_MAX is 255 bytes).
_NAME_CHARS = 96
_TMP_NAME = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+" + re.escape(TMP_SUFFIX) + "$")


def _host() -> str:
    """This machine's name as it appears in temporary names (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's process counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed efffeat writers of this host left in `directory`.

    Only regular files named like efffeat's temporary files, written on this host by a process that no
    longer exists, are removed; returns their paths.
    """
    if os.name != "posix":  # process ids cannot be probed without side effects elsewhere
        return []
    host, removed = _host(), []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        m = _TMP_NAME.match(entry.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def new_temp(path: str | os.PathLike) -> Path:
    """A new, empty temporary file beside `path` (mode 0600, created with ``O_EXCL``); stale ones are removed."""
    path = Path(path)
    remove_stale(path.parent)
    prefix = f".{path.name[:_NAME_CHARS]}.{_host()}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Flush the filled temporary file `tmp` to disk and rename it over `path`; returns `path`."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fchmod(fd, 0o666 & ~umask)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary file that will not be committed (nothing if it is gone)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it over `path`; returns `path`."""
    tmp = new_temp(path)
    try:
        write(str(tmp))
        return commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_atomic` of a UTF-8 text."""

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write_atomic(path, write)
