"""freetf.training.scratch: a process's scratch folder, and the removal of the folders
of ended processes on this host only (tests/test_ray_context.py runs it through
RayTrainContext)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from freetf.training import scratch

pytestmark = pytest.mark.timeout(60)

PREFIX = "freetf-test-"


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """The system temp dir is an empty ``tmp_path/tmp`` for the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="module")
def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_the_folder_is_named_after_host_and_process_and_read_back(tmp):
    made = scratch.make_scratch(PREFIX)
    host = socket.gethostname()
    assert made.parent == tmp and made.is_dir()
    assert made.name.startswith(f"{PREFIX}{host}-{os.getpid()}-")
    assert scratch._owner(made.name[len(PREFIX):]) == (host, os.getpid())
    scratch.remove_scratch(made)
    assert not made.exists()
    scratch.remove_scratch(None)  # nothing to remove


def test_a_host_without_a_name_is_localhost(tmp, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    made = scratch.make_scratch(PREFIX)
    assert made.name.startswith(f"{PREFIX}localhost-{os.getpid()}-")


@pytest.mark.parametrize("rest, owner", [
    ("node-7-12-abc", ("node-7", 12)),  # a host name with dashes
    ("h-12-abc", ("h", 12)),
    ("h-x-abc", None),  # no pid
    ("h12abc", None),
    ("h-12", None),
])
def test_the_owner_is_read_from_the_right(rest, owner):
    assert scratch._owner(rest) == owner


def test_only_this_hosts_folders_of_ended_processes_go(tmp, dead_pid, monkeypatch):
    """Many orphans among many entries that stay (files, live processes, other hosts,
    other users, other names): every orphan goes, whatever order the folder lists them
    in, and nothing else."""
    monkeypatch.setattr(socket, "gethostname", lambda: "node-1")
    orphans = []
    for i in range(12):
        orphans.append(tmp / f"{PREFIX}node-1-{dead_pid}-o{i}")
        (orphans[-1] / "restore").mkdir(parents=True)
    stay = []
    for i in range(12):
        stay.append(tmp / f"{PREFIX}node-1-{dead_pid}-file{i}")
        stay[-1].write_text("a file, not a folder")
        stay.append(tmp / f"{PREFIX}node-1-{os.getpid()}-live{i}")
        stay.append(tmp / f"{PREFIX}node-2-{dead_pid}-host{i}")
        stay.append(tmp / f"{PREFIX}other{i}")
        stay.append(tmp / f"another-node-1-{dead_pid}-name{i}")
        for path in stay[-4:]:
            path.mkdir()
    if os.getuid() == 0:  # root can give a folder away: another user's orphan stays
        theirs = tmp / f"{PREFIX}node-1-{dead_pid}-theirs"
        theirs.mkdir()
        os.chown(theirs, 54321, -1)
        stay.append(theirs)
    removed = scratch.remove_orphans(PREFIX)
    assert sorted(removed) == sorted(orphans)
    assert sorted(tmp.iterdir()) == sorted(stay)
    assert scratch.remove_orphans(PREFIX) == []


def test_a_link_named_like_an_orphan_is_not_followed(tmp, dead_pid, tmp_path):
    """A symbolic link in the temp dir with an orphan's name: the folder it points to
    keeps its files (rmtree refuses a link) and the removal goes on without an error."""
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("kept")
    (tmp / f"{PREFIX}{socket.gethostname()}-{dead_pid}-link").symlink_to(target)
    orphan = tmp / f"{PREFIX}{socket.gethostname()}-{dead_pid}-real"
    orphan.mkdir()
    assert orphan in scratch.remove_orphans(PREFIX)
    assert (target / "data").read_text() == "kept" and not orphan.exists()
