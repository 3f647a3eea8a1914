"""Tests for freetf.files: why a place cannot be written, and the advisory file lock."""

from __future__ import annotations

import os

import pytest

from freetf import files
from freetf.files import lock_file, unwritable

pytestmark = pytest.mark.timeout(30)

needs_permissions = pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                                       reason="root writes through any mode bits")


def test_unwritable_folders_and_files(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert unwritable(tmp_path) is None
    assert unwritable(blocker, is_file=True) is None
    assert unwritable(blocker) == f"{blocker} is a file, not a folder"
    assert unwritable(tmp_path, is_file=True) == f"{tmp_path} is a folder, not a file"
    # not there yet: the nearest existing folder above decides
    assert unwritable(tmp_path / "a" / "b") is None
    assert unwritable(tmp_path / "a" / "b.txt", is_file=True) is None
    assert unwritable(blocker / "a" / "b") == (
        f"{blocker} is a file, not a folder, so {blocker / 'a' / 'b'} cannot be created")


def test_unwritable_paths_are_absolute_and_expanded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "f").write_text("x")
    assert unwritable(files.Path("f")) == f"{tmp_path / 'f'} is a file, not a folder"
    assert unwritable(files.Path("~/f")) == f"{tmp_path / 'f'} is a file, not a folder"
    assert unwritable(files.Path("~/f") / "g") == (
        f"{tmp_path / 'f'} is a file, not a folder, so {tmp_path / 'f' / 'g'} cannot be created")


def test_unwritable_without_permission(tmp_path, monkeypatch):
    """``os.access`` stands in for the mode bits (root writes through them): each check is
    asked with its own path and flags."""
    folder, file = tmp_path / "ro", tmp_path / "ro" / "f.txt"
    folder.mkdir()
    file.write_text("x")
    denied: set = set()
    monkeypatch.setattr(files.os, "access",
                        lambda path, mode: (str(path), mode) not in denied)
    wx = os.W_OK | os.X_OK
    denied = {(str(folder), wx)}
    assert unwritable(folder) == f"no permission to write {folder}"
    assert unwritable(file, is_file=True) == f"no permission to write {file}"
    assert unwritable(folder / "new") == f"no permission to create {folder / 'new'} in {folder}"
    assert unwritable(folder / "a" / "b") == (
        f"no permission to create {folder / 'a' / 'b'} in {folder}")
    denied = {(str(file), os.W_OK)}
    assert unwritable(file, is_file=True) == f"no permission to write {file}"
    assert unwritable(folder) is None
    denied = {(str(folder), os.W_OK), (str(folder), os.X_OK)}  # asked for both at once only
    assert unwritable(folder) is None and unwritable(file, is_file=True) is None


def test_unwritable_stops_at_the_root(monkeypatch, tmp_path):
    """A path none of whose parents exists but the root: the root decides."""
    seen = []
    monkeypatch.setattr(files.os, "access", lambda path, mode: seen.append(str(path)) or False)
    missing = files.Path("/no_such_folder_freetf/a/b")
    assert unwritable(missing) == f"no permission to create {missing} in /"
    assert seen == ["/"]


def test_a_lock_is_exclusive_released_on_close_and_not_inherited(tmp_path):
    """flock(2) locks an open file description: a second open of the file, in this process
    as in another, cannot take it while the first is open."""
    path = tmp_path / "sub.lock"
    fd = lock_file(path)
    assert isinstance(fd, int) and path.is_file()
    assert oct(path.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    assert os.get_inheritable(fd) is False
    assert lock_file(path, wait=False) is None
    os.close(fd)
    other = lock_file(path, wait=False)
    assert other is not None
    os.close(other)


def test_waiting_for_a_lock_asks_flock_to_block(tmp_path, monkeypatch):
    path = tmp_path / "l.lock"
    calls = []
    real = files.fcntl.flock
    monkeypatch.setattr(files.fcntl, "flock", lambda f, op: calls.append(op) or real(f, op))
    os.close(lock_file(path))
    os.close(lock_file(path, wait=False))
    assert calls == [files.fcntl.LOCK_EX, files.fcntl.LOCK_EX | files.fcntl.LOCK_NB]


def test_a_lock_that_fails_closes_its_descriptor(tmp_path, monkeypatch):
    opened, closed = [], []
    real_open, real_close = os.open, os.close
    monkeypatch.setattr(files.os, "open", lambda *a: opened.append(real_open(*a)) or opened[-1])
    monkeypatch.setattr(files.os, "close", lambda fd: closed.append(fd) or real_close(fd))

    def flock(fd, op):
        raise OSError(95, "no locks here")

    monkeypatch.setattr(files.fcntl, "flock", flock)
    with pytest.raises(OSError, match="no locks here"):
        lock_file(tmp_path / "x.lock")
    assert closed == opened and len(opened) == 1

    def busy(fd, op):
        raise BlockingIOError

    monkeypatch.setattr(files.fcntl, "flock", busy)
    assert lock_file(tmp_path / "x.lock", wait=False) is None
    assert closed == opened and len(opened) == 2


def test_no_fcntl_is_no_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "fcntl", None)
    with pytest.raises(NotImplementedError, match="^no fcntl: advisory file locks are POSIX only$"):
        lock_file(tmp_path / "x.lock")
    assert not (tmp_path / "x.lock").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
