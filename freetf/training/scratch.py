"""A training process's scratch folder in the system temp dir, removed when it ends.

A Ray Train worker stages each checkpoint in a local folder before Ray copies it into
``scaling.storage_path``, and copies the checkpoint it resumes from into ``restore/``; a
Tune trial that runs the loop itself does the same.  Each process makes one folder
(:func:`make_scratch`) named after its host and process id,
``<prefix><host>-<pid>-<random>``, and removes it when it ends (success, failure, stop).
A process killed before that (Ray kills the other workers of a group when one fails)
leaves its folder behind: the next one made on that host removes the folders of this
prefix whose process is gone (:func:`remove_orphans`).  Folders of other hosts (a temp dir
shared between containers), of other users and of live processes are left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def make_scratch(prefix: str) -> Path:
    """A new folder ``<tmp>/<prefix><host>-<pid>-<random>``, after removing orphans."""
    remove_orphans(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_host()}-{os.getpid()}-"))


def remove_scratch(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def remove_orphans(prefix: str) -> list[Path]:
    """Remove this host's ``prefix`` folders whose process has ended.  -> those removed."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        owner = _owner(path.name[len(prefix):])
        if owner is None or owner[0] != _host() or psutil.pid_exists(owner[1]):
            continue
        try:
            if not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
        except OSError:  # removed meanwhile
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.debug("removed %d scratch folder(s) of ended processes: %s", len(removed),
                  ", ".join(map(str, removed)))
    return removed


def _owner(rest: str) -> tuple[str, int] | None:
    """``<host>-<pid>-<random>`` -> (host, pid); None for any other name.  (mkdtemp's
    random part has no dash; a host name may.)"""
    parts = rest.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _host() -> str:
    return socket.gethostname() or "localhost"
