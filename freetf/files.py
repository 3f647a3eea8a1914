"""Checks on the places freetf writes, and locks on them, shared by every package (no
freetf imports)."""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory file locks
    fcntl = None


def unwritable(path: Path, is_file: bool = False) -> str | None:
    """Why ``path`` (a folder, or a file if ``is_file``) cannot be written, or None."""
    path = path.expanduser().absolute()
    if path.exists():
        if is_file and path.is_dir():
            return f"{path} is a folder, not a file"
        if not is_file and not path.is_dir():
            return f"{path} is a file, not a folder"
        target = path if not is_file else path.parent
        if not os.access(target, os.W_OK | os.X_OK) or (is_file and not os.access(path, os.W_OK)):
            return f"no permission to write {path}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder, so {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to create {path} in {parent}"
    return None


def lock_file(path: Path, wait: bool = True) -> int | None:
    """Take an exclusive advisory lock (``flock(2)``) on ``path``, created if missing.

    Returns the open descriptor that holds it (``os.close`` releases it), or None when
    ``wait`` is false and another process holds it.  The kernel drops the lock when the
    descriptor is closed, however its process ends (``kill -9`` too), so a lock never
    outlives its holder; the descriptor is not inherited by child processes.  Raises
    ``NotImplementedError`` where there is no ``fcntl`` (not POSIX), and ``OSError`` where
    the file cannot be opened or its file system takes no locks.
    """
    if fcntl is None:
        raise NotImplementedError("no fcntl: advisory file locks are POSIX only")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
