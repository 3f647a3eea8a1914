"""One running sweep per name: the lock a sweep holds on its storage folder.

Two sweeps of one name in one ``storage_path`` would share Tune's folder
(``<storage_path>/<sweep name>``, two ``experiment_state-*.json``), start two MLflow parent
runs and run every trial twice, and each report would mix the two.  So the driver holds
an advisory lock (``flock(2)``) on ``<storage_path>/<sweep name>.lock``, beside that
folder, from before Ray starts until :func:`~freetf.sweeps.sweep.run_sweep` returns; a
second sweep of the name is refused with :class:`SweepRunning` (exit 2 at the command
line), naming the holder that the file records (pid, host, since when).

The kernel drops the lock when the driver ends, however it ends (an exception,
SIGTERM, ``kill -9``), so a lock never outlives its sweep and ``--resume`` works once
the first driver is gone.  No lock where the storage is remote (``s3://...``: nothing
here can lock it) or the system has no ``fcntl`` (not POSIX); the sweep then runs as
before, unguarded.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freetf.files import lock_file
from freetf.sweeps.spec import SweepConfig, SweepError

log = logging.getLogger(__name__)

HOLDER_WAIT_S = 1.0  # how long a refused sweep waits for a new holder to write its line


class SweepRunning(SweepError):
    """Another process runs a sweep of this name in this storage folder."""


def lock_path(sweep: SweepConfig) -> Path:
    """``<storage_path>/<sweep name>.lock``, beside the sweep's Tune folder."""
    return Path(sweep.storage_path) / f"{sweep.name}.lock"


@contextmanager
def sweep_lock(sweep: SweepConfig) -> Iterator[None]:
    """Hold the lock of ``sweep``'s name for the ``with`` block, or raise
    :class:`SweepRunning` naming the process that holds it."""
    fd = _acquire(sweep)
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # the holder's line goes with the lock
            os.close(fd)


def _acquire(sweep: SweepConfig) -> int | None:
    """The descriptor holding the lock, or None where there is no lock to take."""
    if "://" in sweep.storage_path:
        log.debug("sweep %s: remote storage %s, no lock", sweep.name, sweep.storage_path)
        return None
    path = lock_path(sweep)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = lock_file(path, wait=False)
    except NotImplementedError as err:
        log.debug("sweep %s runs without its lock: %s", sweep.name, err)
        return None
    except OSError as err:  # the storage folder's own check comes later, in one line
        log.warning("sweep %s runs without its lock (%s): %s", sweep.name, path, err)
        return None
    if fd is None:
        raise SweepRunning(f"sweep {sweep.name} is running ({_holder(path)}): its folder "
                           f"{sweep.sweep_dir}; wait for it, or give this one another "
                           f"--set mlflow.sweep_name=NEW_NAME")
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)  # a killed holder's line
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def _holder(path: Path) -> str:
    """The holder the file records, as "pid N on host H, since T" (a holder that has just
    taken the lock may not have written it yet)."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            holder = json.loads(path.read_text())
            return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return f"its holder is not recorded in {path}"
            time.sleep(0.05)
