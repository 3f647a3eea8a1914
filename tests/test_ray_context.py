"""RayTrainContext without a Ray cluster: its scratch folder, and the orphans of killed
workers.  (tests/test_ray_train.py runs it inside real Ray Train workers.)"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

pytestmark = pytest.mark.timeout(60)


class OneWorker:
    def get_world_rank(self):
        return 0

    def get_world_size(self):
        return 1


@pytest.fixture
def scratch_tmp(tmp_path, monkeypatch):
    """The system temp dir is ``tmp_path/tmp`` (an empty folder) for this test."""
    import ray.train
    import ray.train.torch

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(ray.train, "get_context", lambda: OneWorker())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    return tmp


def test_the_scratch_folder_goes_with_the_context_after_a_resume(scratch_tmp, tmp_path,
                                                                 monkeypatch):
    """A resumed worker copies Ray's checkpoint into its scratch folder (restore/) and
    stages the checkpoints it reports there (out/): close() removes all of it."""
    import ray.train

    from freetf.training.ray_context import RayTrainContext

    saved = tmp_path / "persisted" / "step_000004"
    saved.mkdir(parents=True)
    (saved / "state.pt").write_bytes(b"x" * 1000)
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: ray.train.Checkpoint.from_directory(str(saved)))
    ctx = RayTrainContext()
    restored = ctx.latest_checkpoint()
    assert (restored / "state.pt").read_bytes() == b"x" * 1000
    assert restored.is_relative_to(scratch_tmp)
    (ctx.checkpoint_root(None) / "step_000006").mkdir(parents=True)  # a staged checkpoint
    ctx.close()
    assert list(scratch_tmp.iterdir()) == []
    assert (saved / "state.pt").is_file()  # Ray's own copy is never touched
    ctx.close()  # twice is fine


def test_a_new_context_removes_the_folders_of_workers_that_were_killed(scratch_tmp):
    """Ray kills the other workers of a failed group: their folders are removed by the
    next worker on the host; a live process's, another host's, another name's stay."""
    from freetf.training.ray_context import RayTrainContext

    host = socket.gethostname()
    dead = _pid_of_an_ended_process()
    orphan = scratch_tmp / f"freetf-ckpt-{host}-{dead}-abc123"
    (orphan / "restore").mkdir(parents=True)
    alive = scratch_tmp / f"freetf-ckpt-{host}-{os.getppid()}-def456"
    other_host = scratch_tmp / f"freetf-ckpt-elsewhere-{dead}-ghi789"
    unrelated = scratch_tmp / "freetf-ckpt-notours"
    for path in (alive, other_host, unrelated):
        path.mkdir()
    ctx = RayTrainContext()
    assert not orphan.exists()
    assert alive.is_dir() and other_host.is_dir() and unrelated.is_dir()
    ctx.close()
    assert sorted(p.name for p in scratch_tmp.iterdir()) == sorted(
        p.name for p in (alive, other_host, unrelated))


def _pid_of_an_ended_process() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)
