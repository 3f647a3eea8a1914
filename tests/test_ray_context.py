"""RayTrainContext without a Ray cluster: its scratch folder and the orphans of killed
workers, the checkpoints it persists, the stop it hears from the driver, its reports and
collectives (``ray.train``'s functions and ``torch.distributed``'s collectives faked: other
ranks are the answers a test gives).  (tests/test_ray_train.py runs it inside real Ray
Train workers.)"""

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
    assert restored == ctx.checkpoint_root(None).parent / "restore"  # scratch.py's layout
    assert restored.parent.parent == scratch_tmp
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
    clock[0] = 1.3
    assert ctx.requested_stop(sync_point=False) is None
    assert reads == [0.2, 0.8, 1.3]  # once STOP_POLL_S has passed
    published["k"] = int(signal.SIGTERM)
    clock[0] = 1.8
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


# -- each part of the context on its own, ray.train and torch.distributed faked --------


class Worker:
    """A rank of a Ray Train worker group, with the run's storage."""

    def __init__(self, rank=0, size=1, storage=None):
        self.rank, self.size, self.storage = rank, size, storage

    def get_world_rank(self):
        return self.rank

    def get_world_size(self):
        return self.size

    def get_storage(self):
        return self.storage


class Collectives:
    """torch.distributed's collectives, the other ranks played by the test: what this rank
    sent, and the answers it gets (rank 0's object, every rank's objects, rank 0's flag)."""

    def __init__(self, monkeypatch, main=None, everyone=None, flag=None):
        self.sent, self.gathered, self.flags = [], [], []
        self.main, self.everyone, self.flag = main, everyone, flag
        monkeypatch.setattr(torch.distributed, "broadcast_object_list", self.broadcast_object_list)
        monkeypatch.setattr(torch.distributed, "all_gather_object", self.all_gather_object)
        monkeypatch.setattr(torch.distributed, "broadcast", self.broadcast)

    def broadcast_object_list(self, box, src):
        assert src == 0 and len(box) == 1
        self.sent.append(box[0])
        box[0] = self.main

    def all_gather_object(self, out, obj):
        self.gathered.append((list(out), obj))
        out[:] = self.everyone

    def broadcast(self, tensor, src):
        assert src == 0
        self.flags.append((tensor.tolist(), tensor.dtype, tensor.device))
        tensor.fill_(self.flag)


def _context(monkeypatch, worker=None, **kwargs):
    import ray.train

    from freetf.training.ray_context import RayTrainContext

    monkeypatch.setattr(ray.train, "get_context", lambda: worker or Worker())
    return RayTrainContext(**kwargs)


def test_the_stop_goes_through_the_freetf_namespace_as_the_signals_number(monkeypatch):
    """The driver writes ``str(signum)`` under the key in Ray's key-value store, namespace
    ``freetf``; rank 0 reads it back as an int, and None where nothing (or "") is there."""
    import ray.experimental.internal_kv as kv

    from freetf.training.ray_context import publish_stop, read_stop

    store = {}

    def put(key, value, overwrite=True, *, namespace=None):
        store[(namespace, key)] = value.encode()

    monkeypatch.setattr(kv, "_internal_kv_put", put)
    monkeypatch.setattr(kv, "_internal_kv_get",
                        lambda key, *, namespace=None: store.get((namespace, key)))
    assert read_stop("run-1") is None
    publish_stop("run-1", 15)
    assert store == {("freetf", "run-1"): b"15"}
    assert read_stop("run-1") == 15
    assert read_stop("run-2") is None
    store[("freetf", "run-2")] = b""
    assert read_stop("run-2") is None


def test_a_context_takes_rank_size_and_device_from_ray_train(scratch_tmp, monkeypatch):
    """Rank, world size and device are Ray Train's; the defaults report every point,
    stage checkpoints in the scratch folder, read no stop key and raise at a non-finite
    stop; the process's start time is the first mark of the timeline."""
    import psutil
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("meta"))
    ctx = _context(monkeypatch, Worker(rank=1, size=3))
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.is_main) == (
        1, 3, torch.device("meta"), False)
    assert ctx.resume_from is None
    assert ctx.report_interval_s == 0.0 and ctx.checkpoint_at_nonfinite_stop is False
    scratch = ctx.checkpoint_root(None).parent
    assert scratch.parent == scratch_tmp and scratch.name.startswith("freetf-ckpt-")
    assert ctx.checkpoint_root(None) == scratch / "out"
    assert ctx.marks == {"process_start": psutil.Process().create_time()}
    assert ctx.timeline() == {"timeline/process_start": psutil.Process().create_time()}
    ctx.close()

    kept = scratch_tmp.parent / "kept"
    ctx = _context(monkeypatch, resume_from="runs/a/step_000002", report_interval_s=5.0,
                   persist_root=kept, quiet_nonfinite_stop=True, stop_key="k")
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    assert ctx.resume_from == "runs/a/step_000002"
    assert ctx.report_interval_s == 5.0 and ctx.checkpoint_at_nonfinite_stop is True
    assert ctx.checkpoint_root(None) == kept
    ctx.close()


def test_without_a_checkpoint_from_ray_the_resume_folder_is_the_latest(scratch_tmp,
                                                                     monkeypatch):
    import ray.train

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    ctx = _context(monkeypatch)
    assert ctx.latest_checkpoint() is None
    ctx.close()
    ctx = _context(monkeypatch, resume_from="runs/a/step_000002")
    assert ctx.latest_checkpoint() == Path("runs/a/step_000002")
    ctx.close()


def test_fsdp_shards_the_model_on_the_workers_device_and_ddp_wraps_the_rest(scratch_tmp,
                                                                           monkeypatch):
    """scaling.strategy=fsdp: apply_fsdp on Ray's device, and no DDP on top of it;
    otherwise the model stays whole and Ray Train wraps it without moving it."""
    from types import SimpleNamespace

    import ray.train.torch

    from freetf.training import ray_context

    calls = []
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("meta"))
    monkeypatch.setattr(ray_context, "apply_fsdp",
                        lambda model, cfg, device: calls.append(("fsdp", model, cfg, device))
                        or "sharded")
    monkeypatch.setattr(ray_context, "is_fsdp", lambda model: model == "sharded")
    monkeypatch.setattr(ray.train.torch, "prepare_model",
                        lambda model, **kw: calls.append(("ddp", model, kw)) or "ddp")
    ctx = _context(monkeypatch)
    model = torch.nn.Linear(2, 2)
    fsdp = SimpleNamespace(scaling=SimpleNamespace(strategy="fsdp"))
    ddp = SimpleNamespace(scaling=SimpleNamespace(strategy="ddp"))
    assert ctx.shard_model(model, ddp) is model and calls == []
    assert ctx.shard_model(model, fsdp) == "sharded"
    assert calls == [("fsdp", model, fsdp, torch.device("meta"))]
    assert ctx.prepare_model("sharded") == "sharded" and len(calls) == 1
    assert ctx.prepare_model(model) == "ddp"
    assert calls[1] == ("ddp", model, {"move_to_device": False})
    ctx.close()


def test_one_rank_gathers_and_broadcasts_without_a_collective(scratch_tmp, monkeypatch):
    comm = Collectives(monkeypatch)
    ctx = _context(monkeypatch)
    assert ctx.all_gather({"a": 1}) == [{"a": 1}]
    assert ctx.from_main("x") == "x"
    assert comm.sent == comm.gathered == []
    ctx.close()


def test_several_ranks_gather_in_rank_order_and_take_rank_zeros_object(scratch_tmp,
                                                                      monkeypatch):
    comm = Collectives(monkeypatch, main="rank 0's", everyone=["a", "b", "c"])
    ctx = _context(monkeypatch, Worker(rank=1, size=3))
    assert ctx.all_gather("b") == ["a", "b", "c"]
    assert comm.gathered == [([None, None, None], "b")]
    assert ctx.from_main("mine") == "rank 0's"
    assert comm.sent == ["mine"]
    ctx.close()


def test_only_rank_zero_reads_the_stop_and_a_local_signal_comes_first(scratch_tmp,
                                                                        monkeypatch):
    """A signal to this process (local mode) is answered without asking the store; a
    context without a stop key, or a rank other than 0, never asks it."""
    import signal

    from freetf.training import ray_context

    reads, local = [], [None]
    monkeypatch.setattr(ray_context, "read_stop", lambda key: reads.append(key) or 2)
    monkeypatch.setattr(ray_context, "requested_signal", lambda: local[0])
    monkeypatch.setattr(ray_context.time, "monotonic", lambda: 100.0)
    ctx = _context(monkeypatch)
    assert ctx.requested_stop(sync_point=True) is None and reads == []  # no stop key
    ctx.close()
    local[0] = signal.SIGINT
    ctx = _context(monkeypatch, stop_key="k")
    assert ctx.requested_stop(sync_point=True) == signal.SIGINT and reads == []
    local[0] = None
    assert ctx.requested_stop(sync_point=False) == 2 and reads == ["k"]
    ctx.close()
    comm = Collectives(monkeypatch, main=None)
    ctx = _context(monkeypatch, Worker(rank=1, size=2), stop_key="k")
    assert ctx.requested_stop(sync_point=True) is None
    assert reads == ["k"] and comm.sent == [None]
    ctx.close()


class Reports:
    """ray.train.report, recorded; ``fail``: the error it raises."""

    def __init__(self, monkeypatch, clock=None, fail=None):
        import ray.train

        from freetf.training import ray_context

        self.calls, self.clock, self.fail = [], clock, fail
        monkeypatch.setattr(ray.train, "report", self.report)
        if clock is not None:
            monkeypatch.setattr(ray_context.time, "monotonic", lambda: clock[0])

    def report(self, metrics, checkpoint=None, checkpoint_dir_name=None,
               checkpoint_upload_fn=None):
        self.calls.append(dict(metrics=metrics, checkpoint=checkpoint,
                               name=checkpoint_dir_name, upload=checkpoint_upload_fn))
        if self.fail is not None:
            raise self.fail

    def steps(self):
        return [call["metrics"]["step"] for call in self.calls]


def test_a_report_carries_the_metrics_the_timeline_and_the_staged_checkpoint(
        scratch_tmp, tmp_path, monkeypatch):
    """The metrics and the timeline go to ray.train.report with the staged checkpoint,
    its folder's name and persist() as Ray's upload; the staged folder goes once Ray has
    its copy; the history keeps the metrics as they were reported."""
    reports = Reports(monkeypatch)
    ctx = _context(monkeypatch)
    ctx.marks = {"process_start": 1.0, "first_step": 2.5}
    staged = tmp_path / "out" / "step_000004"
    staged.mkdir(parents=True)
    (staged / "state.pt").write_bytes(b"w")
    metrics = {"step": 4, "train/loss": 1.5}
    ctx.report(metrics, staged)
    metrics["step"] = 5
    [call] = reports.calls
    assert call["metrics"] == {"step": 4, "train/loss": 1.5, "timeline/process_start": 1.0,
                               "timeline/first_step": 2.5}
    assert call["checkpoint"].path == str(staged) and call["name"] == "step_000004"
    assert call["upload"] == ctx.persist
    assert not staged.exists() and staged.parent.is_dir()
    assert ctx.history == [{"step": 4, "train/loss": 1.5}]
    ctx.report({"step": 6}, None, essential=False)
    assert reports.calls[1] == dict(metrics={"step": 6, "timeline/process_start": 1.0,
                                             "timeline/first_step": 2.5},
                                    checkpoint=None, name=None, upload=ctx.persist)
    assert ctx.history == [{"step": 4, "train/loss": 1.5}, {"step": 6}]
    ctx.close()


def test_local_mode_keeps_its_checkpoints_and_uploads_nothing(scratch_tmp, tmp_path,
                                                             monkeypatch):
    """With persist_root (Ray Train's local mode) the reported checkpoint is the kept
    one: no upload function, and the folder stays."""
    reports = Reports(monkeypatch)
    ctx = _context(monkeypatch, persist_root=tmp_path / "kept")
    staged = tmp_path / "kept" / "step_000002"
    staged.mkdir(parents=True)
    ctx.report({"step": 2}, staged)
    [call] = reports.calls
    assert call["upload"] is None and call["name"] == "step_000002"
    assert staged.is_dir()
    ctx.close()


def test_a_staged_folder_already_gone_is_no_error(scratch_tmp, tmp_path, monkeypatch):
    """Ray may move the staged folder instead of copying it: the report still ends."""
    import shutil

    import ray.train

    reports = Reports(monkeypatch)
    staged = tmp_path / "out" / "step_000004"
    staged.mkdir(parents=True)

    def moving_report(metrics, **kw):
        reports.report(metrics, **kw)
        shutil.rmtree(staged)

    monkeypatch.setattr(ray.train, "report", moving_report)
    ctx = _context(monkeypatch)
    ctx.report({"step": 4}, staged)
    assert reports.steps() == [4] and not staged.exists()
    ctx.close()


def test_plain_log_points_are_thinned_to_one_per_interval_essential_ones_never(
        scratch_tmp, monkeypatch):
    """report_interval_s=10: a plain point goes if 10 s have passed since the last report
    (of any kind; the first at once); an essential one always goes.  The history keeps
    every point."""
    clock = [0.0]
    reports = Reports(monkeypatch, clock)
    ctx = _context(monkeypatch, report_interval_s=10.0)
    for step, t, essential in [(1, 0.0, False), (2, 5.0, False), (3, 9.9, False),
                               (4, 10.0, False), (5, 12.0, True), (6, 21.9, False),
                               (7, 22.0, False), (8, 22.5, True), (9, 23.0, False)]:
        clock[0] = t
        ctx.report({"step": step}, None, essential=essential)
    assert reports.steps() == [1, 4, 5, 7, 8]
    assert [h["step"] for h in ctx.history] == list(range(1, 10))
    clock[0] = 23.5
    ctx.report({"step": 10}, None)  # essential unless said otherwise (loop.py's stop)
    assert reports.steps() == [1, 4, 5, 7, 8, 10]
    ctx.close()
    reports.calls.clear()
    ctx = _context(monkeypatch, report_interval_s=0.5)  # under a second thins too
    for step, t in [(1, 30.0), (2, 30.25), (3, 30.5)]:
        clock[0] = t
        ctx.report({"step": step}, None, essential=False)
    assert reports.steps() == [1, 3]
    ctx.close()
    reports.calls.clear()
    ctx = _context(monkeypatch)  # report_interval_s=0: every point
    for step in range(1, 4):
        ctx.report({"step": step}, None, essential=False)
    assert reports.steps() == [1, 2, 3]
    ctx.close()


def test_with_several_ranks_rank_zeros_clock_decides_every_plain_report(scratch_tmp,
                                                                         monkeypatch):
    """ray.train.report is a collective: a rank reports a plain point when rank 0 says it
    is due (a float flag broadcast on the rank's own device, not the default one),
    whatever its own clock says; essential reports and a zero interval ask nothing."""
    clock = [0.0]
    reports = Reports(monkeypatch, clock)
    comm = Collectives(monkeypatch, main=None, flag=1.0)
    ctx = _context(monkeypatch, Worker(rank=1, size=2), report_interval_s=10.0)
    ctx.report({"step": 1}, None, essential=True)
    assert comm.sent == [None] and comm.flags == []
    clock[0] = 3.0
    with torch.device("meta"):
        ctx.report({"step": 2}, None, essential=False)  # due on rank 0 only
    comm.flag = 0.0
    clock[0] = 15.0
    ctx.report({"step": 3}, None, essential=False)  # due here, not on rank 0
    assert reports.steps() == [1, 2]
    assert comm.flags == [([0.0], torch.float32, torch.device("cpu")),
                          ([1.0], torch.float32, torch.device("cpu"))]
    assert comm.sent == [None]
    ctx.close()
    comm.flags.clear()
    ctx = _context(monkeypatch, Worker(rank=1, size=2))
    ctx.report({"step": 4}, None, essential=False)
    assert reports.steps() == [1, 2, 4] and comm.flags == []
    ctx.close()


def test_a_failed_persist_is_raised_by_the_rank_that_saw_it(scratch_tmp, tmp_path,
                                                           monkeypatch):
    """One rank: its own CheckpointWriteError, staged folder kept for close().  Several:
    an essential report raises rank 0's error (broadcast), a plain one this rank's own
    without a collective; any other error is not caught."""
    from freetf.training.checkpoint import CheckpointWriteError

    failed = CheckpointWriteError(tmp_path / "step_000004", "No space left on device")
    reports = Reports(monkeypatch, fail=failed)
    staged = tmp_path / "out" / "step_000004"
    staged.mkdir(parents=True)
    ctx = _context(monkeypatch)
    with pytest.raises(CheckpointWriteError) as info:
        ctx.report({"step": 4}, staged)
    assert info.value is failed and staged.is_dir()
    ctx.close()
    comm = Collectives(monkeypatch, main=failed)
    ctx = _context(monkeypatch, Worker(rank=0, size=2))
    with pytest.raises(CheckpointWriteError) as info:
        ctx.report({"step": 4}, None, essential=True)
    assert info.value is failed and comm.sent == [failed]
    with pytest.raises(CheckpointWriteError) as info:
        ctx.report({"step": 5}, None, essential=False)
    assert info.value is failed and comm.sent == [failed]
    reports.fail = RuntimeError("the controller is gone")
    with pytest.raises(RuntimeError, match="controller is gone"):
        ctx.report({"step": 6}, None, essential=True)
    assert comm.sent == [failed]
    ctx.close()


class Filesystem:
    """pyarrow's LocalFileSystem whose ``move`` or ``delete_dir`` can fail."""

    def __init__(self, move_error=None, delete_error=None):
        import pyarrow.fs

        self.local = pyarrow.fs.LocalFileSystem()
        self.move_error, self.delete_error = move_error, delete_error

    def get_file_info(self, path):
        return self.local.get_file_info(path)

    def move(self, src, dst):
        if self.move_error is not None:
            raise self.move_error
        self.local.move(src, dst)

    def delete_dir(self, path):
        if self.delete_error is not None:
            raise self.delete_error
        self.local.delete_dir(path)


class FailingStorage(FakeStorage):
    """A copy that fails after creating its folder, with an error of no OS cause."""

    def persist_current_checkpoint(self, checkpoint, name):
        (self.run / name).mkdir(parents=True)
        raise RuntimeError("the upload failed\nand a traceback")


class TreeStorage(FakeStorage):
    """A copy of the whole tree (a sharded checkpoint's shards/ too) into one folder,
    which every rank writes into."""

    def persist_current_checkpoint(self, checkpoint, name):
        import shutil

        shutil.copytree(checkpoint.path, self.run / name, dirs_exist_ok=True)


class FullTreeStorage(TreeStorage):
    """The disk of this rank fills during its copy."""

    def persist_current_checkpoint(self, checkpoint, name):
        import errno

        (self.run / name).mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device")


def _staged(root, name, sharded=False):
    folder = root / name
    (folder / "shards" if sharded else folder).mkdir(parents=True)
    (folder / "state.pt").write_bytes(name.encode())
    if sharded:
        (folder / "shards" / "0.distcp").write_bytes(b"shard")
    import ray.train

    return ray.train.Checkpoint.from_directory(str(folder))


def _storage_context(monkeypatch, storage, rank=0, size=1):
    return _context(monkeypatch, Worker(rank, size, storage))


def test_a_step_persisted_again_replaces_the_earlier_copy(scratch_tmp, tmp_path,
                                                          monkeypatch):
    """A retried run reports a step it reported before: the new copy replaces the old
    one; the result is a checkpoint on the storage's own filesystem."""
    run = tmp_path / "run"
    run.mkdir()
    storage = FakeStorage(run)
    ctx = _storage_context(monkeypatch, storage)
    (run / "step_000004").mkdir()
    (run / "step_000004" / "old.pt").write_bytes(b"old")
    persisted = ctx.persist(_staged(tmp_path / "staged", "step_000004"), "step_000004")
    assert persisted.path == str(run / "step_000004")
    assert persisted.filesystem is storage.storage_filesystem
    assert sorted(p.name for p in run.iterdir()) == ["step_000004"]
    assert [p.name for p in (run / "step_000004").iterdir()] == ["state.pt"]
    assert (run / "step_000004" / "state.pt").read_bytes() == b"step_000004"
    ctx.close()


def test_a_copy_or_a_rename_that_fails_leaves_nothing_and_says_why(scratch_tmp, tmp_path,
                                                                   monkeypatch):
    """An error without an OS cause is its first line; a failed rename removes the
    partial copy; a cleanup that fails too still ends in the CheckpointWriteError."""
    from freetf.training.checkpoint import CheckpointWriteError

    run = tmp_path / "run"
    run.mkdir()
    ctx = _storage_context(monkeypatch, FailingStorage(run))
    with pytest.raises(CheckpointWriteError) as info:
        ctx.persist(_staged(tmp_path / "staged", "step_000002"), "step_000002")
    assert info.value.path == run / "step_000002"
    assert info.value.cause == "RuntimeError: the upload failed"
    assert list(run.iterdir()) == []
    ctx.close()

    storage = FakeStorage(run)
    storage.storage_filesystem = Filesystem(move_error=ValueError("cannot move\nhere"))
    ctx = _storage_context(monkeypatch, storage)
    with pytest.raises(CheckpointWriteError) as info:
        ctx.persist(_staged(tmp_path / "staged", "step_000004"), "step_000004")
    assert info.value.cause == "ValueError: cannot move"
    assert list(run.iterdir()) == []
    storage.storage_filesystem.delete_error = ValueError("cannot delete")
    with pytest.raises(CheckpointWriteError) as info:
        ctx.persist(_staged(tmp_path / "staged", "step_000006"), "step_000006")
    assert info.value.cause == "ValueError: cannot move"
    assert [p.name for p in run.iterdir()] == [".step_000006.partial"]
    ctx.close()


def test_a_full_checkpoint_of_rank_zero_is_persisted_without_a_collective(
        scratch_tmp, tmp_path, monkeypatch):
    """Several ranks, a full (unsharded) checkpoint: rank 0 alone reports it, so it
    renames its copy without asking the others."""
    run = tmp_path / "run"
    run.mkdir()
    comm = Collectives(monkeypatch)
    ctx = _storage_context(monkeypatch, FakeStorage(run), rank=0, size=2)
    persisted = ctx.persist(_staged(tmp_path / "staged", "step_000002"), "step_000002")
    assert persisted.path == str(run / "step_000002")
    assert [p.name for p in run.iterdir()] == ["step_000002"]
    assert comm.sent == comm.gathered == []
    ctx.close()


def test_a_sharded_checkpoint_is_renamed_by_rank_zero_once_every_rank_copied_it(
        scratch_tmp, tmp_path, monkeypatch):
    """Every rank copies its shards into the one partial folder; the ranks gather their
    causes, rank 0 renames the folder if none failed (else removes it) and broadcasts
    its answer, which every rank returns or raises."""
    from freetf.training.checkpoint import CheckpointWriteError

    run = tmp_path / "run"
    run.mkdir()
    comm = Collectives(monkeypatch, everyone=[None, None], main=None)
    ctx = _storage_context(monkeypatch, TreeStorage(run), rank=0, size=2)
    persisted = ctx.persist(_staged(tmp_path / "staged", "step_000002", sharded=True),
                            "step_000002")
    assert persisted.path == str(run / "step_000002")
    assert [p.name for p in run.iterdir()] == ["step_000002"]
    assert comm.gathered == [([None, None], None)] and comm.sent == [None]

    comm.everyone = [None, "No space left on device"]  # rank 1's copy failed
    comm.main = "No space left on device"
    with pytest.raises(CheckpointWriteError) as info:
        ctx.persist(_staged(tmp_path / "staged", "step_000004", sharded=True), "step_000004")
    assert info.value.cause == "No space left on device"
    assert info.value.path == run / "step_000004"
    assert [p.name for p in run.iterdir()] == ["step_000002"]
    assert comm.sent == [None, "No space left on device"]
    ctx.close()

    comm.gathered.clear()
    comm.sent.clear()
    comm.everyone, comm.main = [None, None], None
    other = _storage_context(monkeypatch, TreeStorage(run), rank=1, size=2)
    persisted = other.persist(_staged(tmp_path / "staged1", "step_000006", sharded=True),
                              "step_000006")
    assert persisted.path == str(run / "step_000006")
    assert sorted(p.name for p in run.iterdir()) == [".step_000006.partial", "step_000002"]
    assert comm.gathered == [([None, None], None)] and comm.sent == [None]
    comm.main = "Disk quota exceeded"  # rank 0's rename failed
    with pytest.raises(CheckpointWriteError, match="Disk quota exceeded"):
        other.persist(_staged(tmp_path / "staged1", "step_000008", sharded=True),
                      "step_000008")
    other.close()

    comm.gathered.clear()
    comm.everyone = [None, "No space left on device"]
    comm.main = "No space left on device"
    other = _storage_context(monkeypatch, FullTreeStorage(run), rank=1, size=2)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        other.persist(_staged(tmp_path / "staged1", "step_000010", sharded=True),
                      "step_000010")
    assert comm.gathered == [([None, None], "No space left on device")]  # told the others
    other.close()
