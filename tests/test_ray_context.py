"""RayTrainContext without a Ray cluster: its scratch folder and the orphans of killed
workers, the checkpoints it persists, the stop it hears from the driver.
(tests/test_ray_train.py runs it inside real Ray Train workers.)"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

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


class FakeStorage:
    """Ray Train's StorageContext on a local folder: its copy into ``<run>/<name>`` is
    file by file, and with ``room`` bytes left it fails partway as a full disk does."""

    def __init__(self, run, room=None):
        import pyarrow.fs

        self.run, self.room = run, room
        self.storage_filesystem = pyarrow.fs.LocalFileSystem()

    def build_checkpoint_path_from_name(self, name):
        return str(self.run / name)

    def persist_current_checkpoint(self, checkpoint, name):
        import errno

        import ray.train

        dest = self.run / name
        dest.mkdir(parents=True)
        for source in sorted(p for p in Path(checkpoint.path).iterdir()):
            data = source.read_bytes()
            if self.room is not None and len(data) > self.room:
                (dest / source.name).write_bytes(data[: self.room])
                raise OSError(errno.ENOSPC, "No space left on device")
            (dest / source.name).write_bytes(data)
            self.room = None if self.room is None else self.room - len(data)
        return ray.train.Checkpoint.from_directory(str(dest))


class WithStorage(OneWorker):
    def __init__(self, storage):
        self.storage = storage

    def get_storage(self):
        return self.storage


def _staged_checkpoint(root, step):
    from freetf import load_config
    from freetf.training.checkpoint import save_to_root

    return save_to_root(root, step, {"step": step, "w": torch.ones(5000)}, load_config())


def test_a_persisted_checkpoint_appears_only_once_complete(scratch_tmp, tmp_path, monkeypatch):
    """Ray copies the reported checkpoint under a temporary name, renamed once complete:
    a copy cut short by a full disk leaves nothing in storage_path and is one
    CheckpointWriteError; a whole one loads from its final name."""
    import ray.train

    from freetf.training.checkpoint import CheckpointWriteError, load_checkpoint
    from freetf.training.ray_context import RayTrainContext

    run = tmp_path / "ray_results" / "run"
    run.mkdir(parents=True)
    storage = FakeStorage(run)
    monkeypatch.setattr(ray.train, "get_context", lambda: WithStorage(storage))
    ctx = RayTrainContext()
    staged = _staged_checkpoint(tmp_path / "staged", 2)
    persisted = ctx.persist(ray.train.Checkpoint.from_directory(str(staged)), staged.name)
    assert persisted.path == str(run / "step_000002")
    assert load_checkpoint(run / "step_000002")[0]["step"] == 2
    storage.room = 3000  # the disk fills during the next copy
    staged = _staged_checkpoint(tmp_path / "staged", 4)
    with pytest.raises(CheckpointWriteError) as info:
        ctx.persist(ray.train.Checkpoint.from_directory(str(staged)), staged.name)
    assert str(info.value).startswith(f"cannot write the checkpoint {run / 'step_000004'}: "
                                      f"No space left on device;")
    assert sorted(p.name for p in run.iterdir()) == ["step_000002"]
    ctx.close()


def test_a_failed_persist_stops_every_rank(scratch_tmp, tmp_path, monkeypatch):
    """Rank 0 alone persists a full checkpoint: when it fails, the other ranks (which
    reported none) raise the same error at that report, instead of training on into a
    collective rank 0 never joins."""
    import ray.train

    from freetf.training.checkpoint import CheckpointWriteError
    from freetf.training.ray_context import RayTrainContext

    class RankOne(OneWorker):
        def get_world_rank(self):
            return 1

        def get_world_size(self):
            return 2

    failed = CheckpointWriteError(tmp_path / "step_000004", "No space left on device")
    broadcasts = []

    def broadcast_object_list(box, src):
        assert src == 0
        broadcasts.append(box[0])
        box[0] = failed  # what rank 0 sends

    monkeypatch.setattr(ray.train, "get_context", lambda: RankOne())
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: None)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    ctx = RayTrainContext()
    with pytest.raises(CheckpointWriteError, match="step_000004: No space left"):
        ctx.report({"step": 4}, None, essential=True)
    assert broadcasts == [None]  # this rank's own report went through
    ctx.close()


def test_rank_zero_polls_the_drivers_stop_and_every_rank_follows_it(scratch_tmp,
                                                                      monkeypatch):
    """The driver publishes a stop in Ray's key-value store: rank 0 reads it at most
    every STOP_POLL_S; with several ranks, only at sync points, where rank 0's answer is
    broadcast (all ranks stop at the same step)."""
    import signal

    import ray.train

    from freetf.training import ray_context
    from freetf.training.ray_context import RayTrainContext

    published, reads, clock = {}, [], [0.0]

    def read_stop(key):
        reads.append(clock[0])
        return published.get(key)

    monkeypatch.setattr(ray_context, "read_stop", read_stop)
    monkeypatch.setattr(ray_context.time, "monotonic", lambda: clock[0])
    ctx = RayTrainContext(stop_key="k")
    for step in range(1, 5):  # a step every 0.2 s
        clock[0] = 0.2 * step
        assert ctx.requested_stop(sync_point=False) is None
    assert reads == [0.2, 0.8]  # at most every STOP_POLL_S
    published["k"] = int(signal.SIGTERM)
    clock[0] = 1.4
    assert ctx.requested_stop(sync_point=False) == signal.SIGTERM
    ctx.close()

    class RankZeroOfTwo(OneWorker):
        def get_world_size(self):
            return 2

    sent = []

    def broadcast_object_list(box, src):
        sent.append(box[0])

    monkeypatch.setattr(ray.train, "get_context", lambda: RankZeroOfTwo())
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    two = RayTrainContext(stop_key="k")
    clock[0] = 10.0
    assert two.requested_stop(sync_point=False) is None and sent == []  # no collective
    assert two.requested_stop(sync_point=True) == signal.SIGTERM
    assert sent == [signal.SIGTERM]
    two.close()
