"""ray_train.py's driver without a Ray cluster: the worker's entry point, the trainer it
builds, how it starts Ray and reads a result (``ray``, ``ray.train``'s configs, the
trainer, the loop and MLflow faked by stand-ins that record what they are given).
(tests/test_ray_train.py runs the same code with real Ray Train workers.)"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from freetf import load_config
from freetf.training import ray_train
from freetf.training.checkpoint import CheckpointWriteError
from freetf.training.loop import NONFINITE_STOP_KEY, NonFiniteLossError
from freetf.training.stop import TrainingStopped

pytestmark = pytest.mark.timeout(60)


def config(*overrides):
    return load_config(overrides=["tracking.mlflow.tracking_uri=sqlite:///t/mlflow.db",
                                  *overrides])


class Recorded:
    """A stand-in for one of Ray's config classes: keeps what it was built with."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


# -- the worker's entry point ----------------------------------------------------------


class FakeContext:
    """RayTrainContext's signature; records its arguments and its close."""

    made: list[FakeContext] = []

    def __init__(self, resume_from=None, report_interval_s=0.0, persist_root=None,
                 quiet_nonfinite_stop=False, stop_key=None):
        self.given = {"resume_from": resume_from, "report_interval_s": report_interval_s,
                      "persist_root": persist_root,
                      "quiet_nonfinite_stop": quiet_nonfinite_stop, "stop_key": stop_key}
        self.closed = 0
        FakeContext.made.append(self)

    def close(self):
        self.closed += 1


class FakeTracker:
    def __init__(self, run_id="run-1", client="client"):
        self.run_id, self.client = run_id, client
        self.calls: list[tuple] = []

    def flush(self):
        self.calls.append(("flush",))

    def log_text(self, text, name):
        self.calls.append(("log_text", text, name))

    def set_tags(self, tags):
        self.calls.append(("set_tags", tags))

    def log_artifact(self, path):
        self.calls.append(("log_artifact", path))

    def finish(self, status):
        self.calls.append(("finish", status))


@pytest.fixture
def worker(monkeypatch):
    """The worker's collaborators faked: -> a namespace whose ``raises`` the loop raises,
    whose ``tracker`` the worker's tracker is, and which records the calls."""
    seen = SimpleNamespace(logging=[], loops=[], trackers=[], raises=None,
                           tracker=FakeTracker())
    FakeContext.made = []

    def train_loop(cfg, ctx, tracker=None):
        seen.loops.append((cfg, ctx, tracker))
        if seen.raises is not None:
            raise seen.raises

    def worker_tracker(cfg, ctx, run_id):
        seen.trackers.append((cfg, ctx, run_id))
        if isinstance(seen.tracker, BaseException):
            raise seen.tracker
        return seen.tracker

    monkeypatch.setattr(ray_train, "setup_logging", lambda **kw: seen.logging.append(kw))
    monkeypatch.setattr(ray_train, "RayTrainContext", FakeContext)
    monkeypatch.setattr(ray_train, "train_loop", train_loop)
    monkeypatch.setattr(ray_train, "_worker_tracker", worker_tracker)
    return seen


def test_a_worker_runs_the_loop_on_the_config_it_is_given(worker, tmp_path):
    """The loop gets the config back from its dict, the context its resume, report
    interval and stop key, and rank 0's tracker; its own logging does not propagate."""
    cfg = config("scaling.num_workers=2", "scaling.report_interval_s=7.5",
                 f"scaling.storage_path={tmp_path}/rr")
    out = ray_train._worker_loop({"config": cfg.to_dict(), "run_id": "run-9",
                                  "resume": "/ckpt/step_4", "quiet_stops": False,
                                  "stop_key": "stop-k"})
    assert out is None
    assert worker.logging == [{"propagate": False}]
    [ctx] = FakeContext.made
    assert ctx.given == {"resume_from": "/ckpt/step_4", "report_interval_s": 7.5,
                         "persist_root": None, "quiet_nonfinite_stop": False,
                         "stop_key": "stop-k"}
    assert worker.trackers == [(cfg, ctx, "run-9")]
    assert worker.loops == [(cfg, ctx, worker.tracker)]
    assert worker.tracker.calls == [("flush",)] and ctx.closed == 1


def test_local_mode_persists_into_the_run_folder_and_keeps_the_drivers_logging(worker,
                                                                               tmp_path):
    """num_workers=0 runs in the driver: no logging set up again, checkpoints kept in
    ``storage_path/<run name>``; a loop config without the optional keys is fine."""
    cfg = config("scaling.num_workers=0", f"scaling.storage_path={tmp_path}/rr",
                 "scaling.run_name=local")
    assert ray_train._worker_loop({"config": cfg.to_dict()}) is None
    assert worker.logging == []
    [ctx] = FakeContext.made
    assert ctx.given == {"resume_from": None, "report_interval_s": 2.5,
                         "persist_root": tmp_path / "rr" / "local",
                         "quiet_nonfinite_stop": False, "stop_key": None}
    assert worker.trackers == [(cfg, ctx, None)]


@pytest.mark.parametrize("error, returned", [
    (NonFiniteLossError(3, 9), None),
    (TrainingStopped(int(signal.SIGTERM), 12), {"stopped": int(signal.SIGTERM), "step": 12}),
    (CheckpointWriteError("/rr/step_8", "No space left on device"),
     {"write_error": ["/rr/step_8", "No space left on device"]}),
])
def test_with_quiet_stops_a_worker_returns_how_it_stopped(worker, error, returned):
    """quiet_stops: a non-finite stop returns nothing (its report told it), a signal's
    stop and a failed checkpoint write return what the driver needs to tell them; the
    tracker is flushed and the context closed either way."""
    cfg = config()
    worker.raises = error
    out = ray_train._worker_loop({"config": cfg.to_dict(), "quiet_stops": True})
    assert out == returned
    [ctx] = FakeContext.made
    assert ctx.given["quiet_nonfinite_stop"] is True
    assert worker.tracker.calls == [("flush",)] and ctx.closed == 1


@pytest.mark.parametrize("error", [
    NonFiniteLossError(3, 9), TrainingStopped(int(signal.SIGINT), 2),
    CheckpointWriteError("/rr/step_8", "Read-only file system"), RuntimeError("boom"),
])
@pytest.mark.parametrize("quiet", [False, None])
def test_without_quiet_stops_a_worker_raises_every_stop(worker, error, quiet):
    """A sweep's trial (no quiet_stops, or it off) raises: Tune records the trial as
    failed.  The tracker is flushed and the context closed first."""
    worker.raises = error
    loop_config = {"config": config().to_dict()}
    if quiet is not None:
        loop_config["quiet_stops"] = quiet
    with pytest.raises(type(error)) as info:
        ray_train._worker_loop(loop_config)
    assert info.value is error
    [ctx] = FakeContext.made
    assert worker.tracker.calls == [("flush",)] and ctx.closed == 1


def test_any_other_error_is_raised_even_with_quiet_stops(worker):
    worker.raises = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        ray_train._worker_loop({"config": config().to_dict(), "quiet_stops": True})
    assert worker.tracker.calls == [("flush",)] and FakeContext.made[0].closed == 1


def test_a_worker_without_a_tracker_or_whose_tracker_fails_still_closes(worker):
    """Other ranks have no tracker; a tracker that cannot be made raises its own error
    (not one of a flush on nothing), and the context is closed."""
    worker.tracker = None
    assert ray_train._worker_loop({"config": config().to_dict()}) is None
    assert FakeContext.made[0].closed == 1
    worker.tracker = ValueError("no store")
    with pytest.raises(ValueError, match="no store"):
        ray_train._worker_loop({"config": config().to_dict(), "quiet_stops": True})
    assert FakeContext.made[1].closed == 1
    assert len(worker.loops) == 1  # the loop never ran the second time


# -- what rank 0 returned, read by the driver -------------------------------------------


def test_a_returned_stop_becomes_the_drivers_error_with_rays_checkpoint():
    ckpt = Path("/rr/run/checkpoint_000003")
    stopped = ray_train._worker_outcome({"stopped": 15.0, "step": "7"}, ckpt)
    assert type(stopped) is TrainingStopped
    assert (stopped.signum, stopped.step, stopped.checkpoint) == (15, 7, ckpt)
    assert type(stopped.signum) is int and type(stopped.step) is int
    failed = ray_train._worker_outcome({"write_error": ["/rr/step_8", "disk full"]}, ckpt)
    assert type(failed) is CheckpointWriteError
    assert (failed.path, failed.cause, failed.last_good) == (Path("/rr/step_8"),
                                                             "disk full", ckpt)
    assert ray_train._worker_outcome({"write_error": ["/x", "y"]}, None).last_good is None


@pytest.mark.parametrize("value", [None, {}, {"other": 1}, [("stopped", 15)], "stopped"])
def test_no_stop_is_read_from_anything_else(value):
    assert ray_train._worker_outcome(value, Path("/c")) is None


# -- rank 0's tracker ------------------------------------------------------------------


@pytest.fixture
def trackers(monkeypatch):
    import freetf.tracking

    seen = SimpleNamespace(made=[], logged=0, asked=[])

    def make_tracker(cfg, **kwargs):
        tracker = FakeTracker(kwargs.get("run_id"))
        seen.made.append((cfg, kwargs, tracker))
        return tracker

    def last_logged_step(tracker):
        seen.asked.append(tracker)
        return seen.logged

    monkeypatch.setattr(freetf.tracking, "make_tracker", make_tracker)
    monkeypatch.setattr(freetf.tracking, "last_logged_step", last_logged_step)
    return seen


@pytest.mark.parametrize("is_main, run_id", [(False, "run-1"), (True, None), (True, "")])
def test_only_rank_zero_of_a_tracked_run_gets_a_tracker(trackers, is_main, run_id):
    ctx = SimpleNamespace(is_main=is_main)
    assert ray_train._worker_tracker(config(), ctx, run_id) is None
    assert trackers.made == []


def test_rank_zero_logs_into_the_drivers_run_past_the_steps_it_holds(trackers):
    """A first start logs every step; a restart skips the steps the run already holds."""
    from freetf.tracking import SkipLoggedSteps

    cfg, ctx = config(), SimpleNamespace(is_main=True)
    tracker = ray_train._worker_tracker(cfg, ctx, "run-1")
    [(made_cfg, kwargs, made)] = trackers.made
    assert tracker is made and made_cfg is cfg
    assert kwargs == {"rank": 0, "run_id": "run-1"}
    assert trackers.asked == [made]
    trackers.logged = 7
    skipping = ray_train._worker_tracker(cfg, ctx, "run-1")
    assert type(skipping) is SkipLoggedSteps
    assert skipping.tracker is trackers.made[1][2] and skipping.through_step == 7


# -- starting Ray ----------------------------------------------------------------------


class FakeSocket:
    bound: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        FakeSocket.bound.append(address)

    def getsockname(self):
        return ("127.0.0.1", 43210)


@pytest.fixture
def fake_ray_init(monkeypatch):
    """ray.init recorded (with the environment and Ray's cluster flag it saw); no Ray
    initialized; the variables init_ray sets restored by monkeypatch."""
    import ray._private.ray_constants as ray_constants

    calls = []
    flag = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR

    def init(**kwargs):
        import os

        calls.append((kwargs, ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(flag),
                      os.environ.get("RAY_API_SERVER_ADDRESS"),
                      os.environ.get(ray_train.WORKER_GROUP_START_TIMEOUT_ENV)))

    for name in ("RAY_ADDRESS", flag, ray_train.WORKER_GROUP_START_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unset")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setattr(ray_train.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_train.ray, "init", init)
    FakeSocket.bound = []
    monkeypatch.setattr(ray_train.socket, "socket", FakeSocket)
    return calls


def test_a_local_ray_listens_on_loopback_with_its_dashboard_on_a_free_port(fake_ray_init):
    """A new local Ray: its CPUs, a small object store, the dashboard on a port just
    found free on 127.0.0.1 (and Ray's API server pointed at it), Ray's cluster mode off
    while it starts, Ray's log lines shown; a setup hook for its workers."""
    import os

    import ray._private.ray_constants as ray_constants

    ray_train.init_ray(num_cpus=1.5, setup_hook="freetf.logs.setup_logging")
    [(kwargs, cluster, flag, api, timeout)] = fake_ray_init
    assert FakeSocket.bound == [("127.0.0.1", 0)]
    assert kwargs == {"address": "local", "num_cpus": 1.5,
                      "object_store_memory": 256 * 1024 * 1024, "include_dashboard": True,
                      "dashboard_host": "127.0.0.1", "dashboard_port": 43210,
                      "runtime_env": {"worker_process_setup_hook": "freetf.logs.setup_logging"},
                      "log_to_driver": True, "logging_level": logging.INFO}
    assert (cluster, flag, api, timeout) == (False, "0", "http://127.0.0.1:43210", "300")
    assert ray_constants.ENABLE_RAY_CLUSTER is True  # restored
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR not in os.environ
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:43210"


def test_a_quiet_local_ray_without_a_hook_keeps_a_timeout_the_user_set(fake_ray_init,
                                                                       monkeypatch):
    monkeypatch.setenv(ray_train.WORKER_GROUP_START_TIMEOUT_ENV, "42")
    ray_train.init_ray(quiet=True)
    [(kwargs, _, _, _, timeout)] = fake_ray_init
    assert kwargs["num_cpus"] is None and "runtime_env" in kwargs
    assert kwargs["runtime_env"] is None
    assert (kwargs["log_to_driver"], kwargs["logging_level"]) == (False, logging.ERROR)
    assert timeout == "42"


@pytest.mark.parametrize("quiet, shown, level", [(False, True, logging.INFO),
                                                 (True, False, logging.ERROR)])
def test_with_ray_address_set_ray_joins_that_cluster_as_it_is(fake_ray_init, monkeypatch,
                                                               quiet, shown, level):
    """RAY_ADDRESS: ray.init with nothing but the log settings (the cluster's own
    runtime environment, no dashboard port, no environment changed here)."""
    import os

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    ray_train.init_ray(num_cpus=4, quiet=quiet, setup_hook="x.y")
    [(kwargs, cluster, _, api, timeout)] = fake_ray_init
    assert kwargs == {"log_to_driver": shown, "logging_level": level}
    assert (cluster, api, timeout) == (True, "unset", None)
    assert FakeSocket.bound == [] and os.environ["RAY_API_SERVER_ADDRESS"] == "unset"


def test_an_initialized_ray_is_left_as_it_is(fake_ray_init, monkeypatch):
    import os

    monkeypatch.setattr(ray_train.ray, "is_initialized", lambda: True)
    ray_train.init_ray(num_cpus=2)
    assert fake_ray_init == [] and FakeSocket.bound == []
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "unset"
    assert ray_train.WORKER_GROUP_START_TIMEOUT_ENV not in os.environ


def test_loopback_only_restores_rays_cluster_flag_after_an_error(monkeypatch):
    import os

    import ray._private.ray_constants as ray_constants

    flag = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    monkeypatch.setenv(flag, "1")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    with pytest.raises(KeyError), ray_train.loopback_only():
        assert ray_constants.ENABLE_RAY_CLUSTER is False and os.environ[flag] == "0"
        raise KeyError("x")
    assert ray_constants.ENABLE_RAY_CLUSTER is True and os.environ[flag] == "1"


def test_the_clusters_hosts_are_its_live_nodes_addresses(monkeypatch):
    nodes = [{"NodeManagerAddress": "10.0.0.1", "Alive": True},
             {"NodeManagerAddress": "10.0.0.2", "Alive": False},
             {"NodeManagerAddress": "10.0.0.1", "Alive": True},
             {"NodeManagerAddress": "10.0.0.3", "Alive": True},
             {"NodeManagerAddress": "10.0.0.4"}]
    monkeypatch.setattr(ray_train.ray, "nodes", lambda: nodes)
    assert ray_train.cluster_hosts() == {"10.0.0.1", "10.0.0.3"}


def test_the_tracking_store_is_checked_against_the_clusters_hosts(monkeypatch):
    import freetf.tracking

    seen = []
    monkeypatch.setattr(ray_train, "cluster_hosts", lambda: {"a", "b"})
    monkeypatch.setattr(freetf.tracking, "check_store_shared_by",
                        lambda uri, hosts: seen.append((uri, hosts)))
    ray_train.check_tracking_store("sqlite:///x.db")
    assert seen == [("sqlite:///x.db", {"a", "b"})]


def test_the_stoppable_trainer_leaves_sigint_to_the_driver(monkeypatch):
    """Ray Train's own SIGINT handler (set in fit) aborts the workers: the subclass
    registers none, and SIGINT's handler stays the driver's."""
    import ray.train.torch

    base = ray.train.torch.TorchTrainer
    assert issubclass(ray_train._StoppableTrainer, base)
    assert hasattr(base, "_register_sigint_handler")  # what the subclass overrides
    before = signal.getsignal(signal.SIGINT)
    trainer = object.__new__(ray_train._StoppableTrainer)
    assert trainer._register_sigint_handler(object()) is None
    assert signal.getsignal(signal.SIGINT) is before


# -- the trainer -----------------------------------------------------------------------


@pytest.fixture
def ray_configs(monkeypatch):
    """Ray Train's config classes and both trainers replaced by recorders."""
    import ray.train
    import ray.train.torch

    classes = {}
    for module, name in [(ray.train, "CheckpointConfig"), (ray.train, "RunConfig"),
                         (ray.train, "FailureConfig"), (ray.train, "ScalingConfig"),
                         (ray.train.torch, "TorchConfig"), (ray.train.torch, "TorchTrainer")]:
        classes[name] = type(name, (Recorded,), {})
        monkeypatch.setattr(module, name, classes[name])
    classes["Stoppable"] = type("Stoppable", (Recorded,), {})
    monkeypatch.setattr(ray_train, "_StoppableTrainer", classes["Stoppable"])
    return classes


def test_a_cpu_trainer_takes_scaling_checkpoints_and_failures_from_the_config(ray_configs,
                                                                              tmp_path):
    cfg = config("scaling.num_workers=3", "scaling.cpus_per_worker=0.5",
                 "scaling.placement_strategy=SPREAD", "scaling.max_failures=2",
                 f"scaling.storage_path={tmp_path}/rr", "scaling.run_name=cpu",
                 "checkpoint.keep=4", "checkpoint.metric=train/loss", "checkpoint.mode=max")
    callback = object()
    trainer = ray_train.build_trainer(cfg, "run-1", "/ckpt/step_4", callbacks=[callback],
                                      controller_failure_limit=5, quiet_stops=True)
    assert type(trainer) is ray_configs["TorchTrainer"]
    assert trainer.args == (ray_train._worker_loop,)
    kw = trainer.kwargs
    assert set(kw) == {"train_loop_config", "scaling_config", "torch_config", "run_config"}
    assert kw["train_loop_config"] == {"config": cfg.to_dict(), "run_id": "run-1",
                                       "resume": "/ckpt/step_4", "quiet_stops": True,
                                       "stop_key": None}
    assert type(kw["scaling_config"]) is ray_configs["ScalingConfig"]
    assert kw["scaling_config"].args == ()
    assert kw["scaling_config"].kwargs == {"num_workers": 3, "use_gpu": False,
                                           "resources_per_worker": {"CPU": 0.5},
                                           "placement_strategy": "SPREAD"}
    assert type(kw["torch_config"]) is ray_configs["TorchConfig"]
    assert (kw["torch_config"].args, kw["torch_config"].kwargs) == ((), {"backend": "gloo"})
    run = kw["run_config"]
    assert type(run) is ray_configs["RunConfig"] and run.args == ()
    assert set(run.kwargs) == {"name", "storage_path", "checkpoint_config",
                               "failure_config", "callbacks"}
    assert run.kwargs["name"] == "cpu"
    assert run.kwargs["storage_path"] == str(tmp_path / "rr")
    assert run.kwargs["callbacks"] == [callback]
    checkpoints = run.kwargs["checkpoint_config"]
    assert type(checkpoints) is ray_configs["CheckpointConfig"] and checkpoints.args == ()
    assert checkpoints.kwargs == {"num_to_keep": 4, "checkpoint_score_attribute": "train/loss",
                                  "checkpoint_score_order": "max"}
    failures = run.kwargs["failure_config"]
    assert type(failures) is ray_configs["FailureConfig"] and failures.args == ()
    assert failures.kwargs == {"max_failures": 2, "controller_failure_limit": 5}


def test_a_gpu_trainer_with_a_stop_key_is_the_stoppable_one(ray_configs, tmp_path,
                                                             monkeypatch):
    """On GPUs: NCCL and a GPU share per worker; a stop key: the trainer that leaves
    SIGINT to the driver.  The defaults: no run, no resume, no callbacks, start-ups
    retried for ever, stops raised; a relative storage path resolved here, unless the
    caller gives one."""
    monkeypatch.chdir(tmp_path)
    cfg = config("scaling.use_gpu=true", "scaling.gpus_per_worker=0.25",
                 "scaling.storage_path=rel")
    trainer = ray_train.build_trainer(cfg, stop_key="stop-k")
    assert type(trainer) is ray_configs["Stoppable"]
    assert trainer.args == (ray_train._worker_loop,)
    kw = trainer.kwargs
    assert kw["train_loop_config"] == {"config": cfg.to_dict(), "run_id": None,
                                       "resume": None, "quiet_stops": False,
                                       "stop_key": "stop-k"}
    assert kw["scaling_config"].kwargs == {"num_workers": 1, "use_gpu": True,
                                           "resources_per_worker": {"CPU": 1.0, "GPU": 0.25},
                                           "placement_strategy": "PACK"}
    assert kw["torch_config"].kwargs == {"backend": "nccl"}
    run = kw["run_config"].kwargs
    assert run["name"] == "freetf" and run["callbacks"] is None
    assert run["storage_path"] == str(tmp_path / "rel")
    assert run["failure_config"].kwargs == {"max_failures": 0, "controller_failure_limit": -1}
    assert run["checkpoint_config"].kwargs == {
        "num_to_keep": 3, "checkpoint_score_attribute": "eval/ce_prior_nats",
        "checkpoint_score_order": "min"}
    given = ray_train.build_trainer(cfg, storage_path="s3://bucket/runs")
    assert type(given) is ray_configs["TorchTrainer"]
    assert given.kwargs["run_config"].kwargs["storage_path"] == "s3://bucket/runs"


@pytest.mark.parametrize("gpu, backend", [("true", "gloo"), ("false", "nccl")])
def test_a_backend_set_in_the_config_is_kept(ray_configs, gpu, backend):
    cfg = config(f"scaling.use_gpu={gpu}", f"scaling.backend={backend}")
    trainer = ray_train.build_trainer(cfg)
    assert trainer.kwargs["torch_config"].kwargs == {"backend": backend}


# -- the driver's run ------------------------------------------------------------------


class FakeDataFrame:
    def __init__(self, rows):
        self.rows, self.orients = rows, []

    def to_dict(self, orient):
        self.orients.append(orient)
        return self.rows if orient == "records" else {"wrong": orient}


def ray_result(metrics=None, checkpoint=None, error=None, return_value=None, frame=None):
    return SimpleNamespace(
        metrics=metrics, error=error, return_value=return_value, metrics_dataframe=frame,
        checkpoint=SimpleNamespace(path=checkpoint) if checkpoint is not None else None)


@pytest.fixture
def driver(monkeypatch, tmp_path):
    """run_training's collaborators faked.  -> a namespace: set ``result`` (what fit
    returns, or raises if an exception), ``loop_result`` likewise for the in-process
    loop, ``tracker``; read ``events`` (every call in order) and the recorded calls."""
    import freetf.tracking

    seen = SimpleNamespace(events=[], result=ray_result(), loop_result=None,
                           tracker=FakeTracker(), history=[{"step": 1, "train/loss": 2.0}])
    seen.folder = tmp_path / "runs" / "tiny-2"

    def plan_run(cfg, resume, fresh):
        seen.events.append(("plan_run", cfg, resume, fresh))
        seen.planned = cfg.replace(["scaling.run_name=planned"])
        return SimpleNamespace(cfg=seen.planned, folder=seen.folder, resume="/planned/step_2")

    def make_tracker(cfg, **kwargs):
        seen.events.append(("make_tracker", cfg, kwargs))
        return seen.tracker

    def metric_history(client, run_id, keys):
        seen.events.append(("metric_history", client, run_id, keys))
        return seen.history

    @contextlib.contextmanager
    def stop_on_signals(on_request=None):
        seen.on_request = on_request
        seen.events.append(("signals on",))
        yield
        seen.events.append(("signals off",))

    class Trainer:
        def fit(self):
            seen.events.append(("fit",))
            if isinstance(seen.result, BaseException):
                raise seen.result
            return seen.result

    def build_trainer(*args, **kwargs):
        seen.events.append(("build_trainer", args, kwargs))
        return Trainer()

    class Progress:
        def __init__(self, *args):
            seen.events.append(("progress", *args))

        def __enter__(self):
            seen.events.append(("progress on",))

        def __exit__(self, *exc):
            seen.events.append(("progress off",))

    def context(**kwargs):
        seen.events.append(("context", kwargs))
        return "the context"

    def train_loop(cfg, ctx, tracker=None):
        seen.events.append(("train_loop", cfg, ctx, tracker))
        if isinstance(seen.loop_result, BaseException):
            raise seen.loop_result
        return seen.loop_result

    def plot(points, path):
        return path

    monkeypatch.setattr(ray_train, "plan_run", plan_run)
    monkeypatch.setattr(ray_train, "init_ray",
                        lambda **kw: seen.events.append(("init_ray", kw)))
    monkeypatch.setattr(ray_train, "check_tracking_store",
                        lambda uri: seen.events.append(("check_tracking_store", uri)))
    monkeypatch.setattr(freetf.tracking, "make_tracker", make_tracker)
    monkeypatch.setattr(freetf.tracking, "metric_history", metric_history)
    monkeypatch.setattr(freetf.tracking, "plot_training_curves", plot)
    seen.plot = plot
    monkeypatch.setattr(ray_train, "stop_on_signals", stop_on_signals)
    monkeypatch.setattr(ray_train, "publish_stop",
                        lambda key, signum: seen.events.append(("publish_stop", key, signum)))
    monkeypatch.setattr(ray_train, "build_trainer", build_trainer)
    monkeypatch.setattr(ray_train, "MlflowProgress", Progress)
    monkeypatch.setattr(ray_train, "TrainContext", context)
    monkeypatch.setattr(ray_train, "train_loop", train_loop)
    monkeypatch.setattr(ray_train, "log_run_artifacts",
                        lambda *args: seen.events.append(("log_run_artifacts", *args)))
    monkeypatch.setattr(ray_train, "time",
                        SimpleNamespace(perf_counter=itertools.cycle([10.0, 13.5]).__next__))
    return seen


class Console:
    def __init__(self, verbose=False):
        self.verbose, self.plans = verbose, []

    def start(self, plan):
        self.plans.append(plan)

    def report(self, metrics, total_steps):
        pass


def test_a_ray_run_plans_checks_the_store_tracks_and_reads_rays_result(driver):
    """The whole driver under Ray, in order: plan, start a quiet Ray, check the MLflow
    store, open the run named after the folder, fit under the stop handlers and the
    console's progress, read the result, log the artifacts, finish the run."""
    import re

    from freetf.tracking import CURVE_METRICS

    cfg, console = config(), Console()
    driver.result = ray_result({"train/loss": 1.5, "step": 6}, "/rr/checkpoint_000001",
                               frame=FakeDataFrame([{"never": 1}]))
    summary = ray_train.run_training(cfg, "/given/step_1", fresh=True, console=console)
    planned, tracker = driver.planned, driver.tracker
    [build] = [e for e in driver.events if e[0] == "build_trainer"]
    key = build[2]["stop_key"]
    assert re.fullmatch(r"stop-[0-9a-f]{32}", key)
    assert driver.events == [
        ("plan_run", cfg, "/given/step_1", True),
        ("init_ray", {"quiet": True}),
        ("check_tracking_store", "sqlite:///t/mlflow.db"),
        ("make_tracker", planned, {"rank": 0, "run_name": "tiny-2"}),
        ("signals on",),
        ("progress", "client", "run-1", console),
        ("progress on",),
        ("build_trainer", (planned, "run-1", "/planned/step_2"),
         {"quiet_stops": True, "stop_key": key}),
        ("fit",),
        ("progress off",),
        ("metric_history", "client", "run-1", CURVE_METRICS),
        ("signals off",),
        ("log_run_artifacts", tracker, {"train/loss": 1.5, "step": 6},
         Path("/rr/checkpoint_000001"), driver.history, driver.plot),
    ]
    assert tracker.calls == [("finish", "FINISHED")]
    assert len(console.plans) == 1 and console.plans[0].folder == driver.folder
    assert summary == ray_train.RunSummary({"train/loss": 1.5, "step": 6},
                                           Path("/rr/checkpoint_000001"), "run-1", None, 3.5)
    driver.on_request(int(signal.SIGTERM))  # the stop handlers forward a signal to the workers
    assert driver.events[-1] == ("publish_stop", key, int(signal.SIGTERM))


@pytest.mark.parametrize("console", [None, Console(verbose=True)])
def test_without_a_quiet_console_ray_starts_with_its_logs(driver, console):
    """No console, or a verbose one: Ray's logs shown; no console: no progress."""
    driver.result = ray_result({"step": 1})
    ray_train.run_training(config(), console=console)
    assert ("init_ray", {"quiet": False}) in driver.events
    assert any(e[0] == "progress" for e in driver.events) == (console is not None)


def test_an_untracked_ray_run_takes_its_curves_from_rays_results(driver):
    """MLflow off: no store checked, no run, no artifacts; the history is Ray's rows."""
    frame = FakeDataFrame([{"step": 1, "train/loss": 3.0}])
    driver.result = ray_result(None, None, frame=frame)
    summary = ray_train.run_training(config("tracking.mlflow.enabled=false"),
                                     console=Console())
    names = [e[0] for e in driver.events]
    assert names == ["plan_run", "init_ray", "signals on", "build_trainer", "fit",
                     "signals off"]
    assert frame.orients == ["records"]
    assert summary == ray_train.RunSummary({}, None, None, None, 3.5)


def test_a_tracker_without_a_client_reads_rays_rows_or_none(driver):
    """A tracker that writes no MLflow client (a sink of its own): the curves come from
    Ray's rows, or are none when Ray kept no dataframe."""
    driver.tracker = FakeTracker(client=None)
    frame = FakeDataFrame([{"step": 1, "train/loss": 3.0}])
    driver.result = ray_result({"step": 1}, frame=frame)
    ray_train.run_training(config(), console=Console())
    assert not any(e[0] in ("metric_history", "progress") for e in driver.events)
    assert driver.events[-1][4] == [{"step": 1, "train/loss": 3.0}]
    driver.events.clear()
    driver.result = ray_result({"step": 1}, frame=None)
    ray_train.run_training(config(), console=Console())
    assert driver.events[-1][4] == []


def test_the_mlflow_run_keeps_a_name_given_in_the_config(driver):
    driver.result = ray_result({"step": 1})
    ray_train.run_training(config("tracking.mlflow.run_name=named"))
    [made] = [e for e in driver.events if e[0] == "make_tracker"]
    assert made[2] == {"rank": 0, "run_name": "named"}


def test_rays_own_error_wins_over_what_rank_zero_returned(driver):
    error = RuntimeError("a worker died")
    driver.result = ray_result({"step": 3}, "/rr/c3", error=error,
                               return_value={"stopped": 15, "step": 3})
    summary = ray_train.run_training(config())
    assert summary.error is error and summary.checkpoint == Path("/rr/c3")
    assert driver.tracker.calls == [("finish", "FAILED")]


def test_a_stop_returned_by_rank_zero_is_the_runs_error_and_kills_the_run(driver):
    driver.result = ray_result({"step": 3}, "/rr/c3", return_value={"stopped": 15, "step": 3})
    summary = ray_train.run_training(config())
    assert type(summary.error) is TrainingStopped
    assert (summary.error.signum, summary.error.step, summary.error.checkpoint) == (
        15, 3, Path("/rr/c3"))
    assert driver.tracker.calls == [("finish", "KILLED")]


def test_a_nonfinite_stop_in_the_last_report_fails_the_run(driver):
    driver.result = ray_result({NONFINITE_STOP_KEY: 4.0, "step": 9.0}, "/rr/c8")
    summary = ray_train.run_training(config())
    assert type(summary.error) is NonFiniteLossError
    assert (summary.error.count, summary.error.step) == (4, 9)
    assert type(summary.error.count) is int and type(summary.error.step) is int
    assert summary.checkpoint == Path("/rr/c8")
    assert driver.tracker.calls == [("finish", "FAILED")]


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"),
                                           (RuntimeError("fit failed"), "FAILED")])
def test_an_error_of_fit_is_kept_and_the_run_closed(driver, error, status):
    driver.result = error
    summary = ray_train.run_training(config())
    assert summary.error is error
    assert summary == ray_train.RunSummary({}, None, "run-1", error, 3.5)
    assert driver.events[-1] == ("log_run_artifacts", driver.tracker, {}, None, [],
                                 driver.plot)
    assert driver.tracker.calls == [("finish", status)]


def test_an_in_process_run_trains_here_and_adds_the_step_to_its_metrics(driver):
    """use_ray off: no Ray, no store check, no stop key; the loop's context resumes from
    the plan and reports to the console; the metrics carry the step as Ray's do."""
    console = Console()
    driver.loop_result = SimpleNamespace(metrics={"train/loss": 2.0}, step=5,
                                         checkpoint=Path("/ck/step_5"),
                                         history=[{"step": 5, "train/loss": 2.0}])
    cfg = config("scaling.use_ray=false")
    summary = ray_train.run_training(cfg, console=console)
    planned = driver.planned
    assert driver.events == [
        ("plan_run", cfg, None, False),
        ("make_tracker", planned, {"rank": 0, "run_name": "tiny-2"}),
        ("signals on",),
        ("context", {"resume_from": "/planned/step_2", "listener": console.report}),
        ("train_loop", planned, "the context", driver.tracker),
        ("signals off",),
        ("log_run_artifacts", driver.tracker, {"train/loss": 2.0, "step": 5},
         Path("/ck/step_5"), [{"step": 5, "train/loss": 2.0}], driver.plot),
    ]
    assert driver.on_request is None
    assert summary == ray_train.RunSummary({"train/loss": 2.0, "step": 5}, Path("/ck/step_5"),
                                           "run-1", None, 3.5)
    assert driver.tracker.calls == [("finish", "FINISHED")]


@pytest.mark.parametrize("error, status", [
    (NonFiniteLossError(3, 7, Path("/ck/step_6")), "FAILED"),
    (TrainingStopped(int(signal.SIGINT), 7, Path("/ck/step_7")), "KILLED"),
])
def test_an_in_process_stop_keeps_the_loops_last_checkpoint(driver, error, status):
    driver.loop_result = error
    summary = ray_train.run_training(config("scaling.use_ray=false",
                                            "tracking.mlflow.enabled=false"))
    assert ("context", {"resume_from": "/planned/step_2", "listener": None}) in driver.events
    assert summary == ray_train.RunSummary({}, error.checkpoint, None, error, 3.5)


def test_an_in_process_failure_is_kept_and_the_run_failed(driver):
    error = ValueError("bad batch")
    driver.loop_result = error
    summary = ray_train.run_training(config("scaling.use_ray=false"))
    assert summary.error is error and summary.checkpoint is None
    assert driver.tracker.calls == [("finish", "FAILED")]


def test_the_progress_reads_mlflow_only_with_a_console_and_a_client(monkeypatch):
    made = []
    monkeypatch.setattr(ray_train, "MlflowProgress", lambda *args: made.append(args) or "p")
    console, tracker = Console(), FakeTracker("run-3", client="c")
    for args in [(None, tracker), (console, None), (console, FakeTracker(client=None))]:
        assert type(ray_train._progress(*args)) is contextlib.nullcontext
    assert made == []
    assert ray_train._progress(console, tracker) == "p"
    assert made == [("c", "run-3", console)]


# -- the run's artifacts ---------------------------------------------------------------


def test_the_artifacts_are_the_samples_checkpoint_verdict_and_curves(monkeypatch):
    import freetf.tracking

    tracker, verdicts, plots = FakeTracker(), [], []
    monkeypatch.setattr(freetf.tracking, "log_verdict",
                        lambda t, verdict, step=None: verdicts.append((t, verdict, step)))

    def plot(points, path):
        assert path.parent.is_dir() and path.name == "training_curves.png"
        plots.append(points)
        return f"drawn:{path.name}"

    history = [{"step": 1, "train/loss": 3.0}, {"step": 2, "eval/ce_prior_nats": 2.0},
               {"step": 3, "train/loss": 2.5}]
    ray_train.log_run_artifacts(
        tracker, {"eval/samples": ["a = 1", "b = 2"], "eval/verdict": "used", "step": 3},
        Path("/rr/c3"), history, plot)
    assert tracker.calls == [("log_text", "a = 1\nb = 2\n", "samples.txt"),
                             ("log_text", "/rr/c3\n", "checkpoint_path.txt"),
                             ("set_tags", {"freetf.checkpoint": "/rr/c3"}),
                             ("log_artifact", "drawn:training_curves.png")]
    assert verdicts == [(tracker, "used", 3)]
    assert plots == [[history[0], history[2]]]


def test_a_run_with_nothing_to_show_logs_no_artifact(monkeypatch):
    import freetf.tracking

    tracker, verdicts = FakeTracker(), []
    monkeypatch.setattr(freetf.tracking, "log_verdict",
                        lambda t, verdict, step=None: verdicts.append((verdict, step)))

    def plot(points, path):
        raise AssertionError("nothing to plot")

    ray_train.log_run_artifacts(tracker, {"eval/samples": [], "eval/verdict": ""}, None,
                                [{"step": 1, "eval/ce_prior_nats": 2.0}], plot)
    ray_train.log_run_artifacts(tracker, {}, None, [], plot)
    assert tracker.calls == [] and verdicts == []
    ray_train.log_run_artifacts(tracker, {"eval/verdict": "collapsed"}, None, [], plot)
    assert verdicts == [("collapsed", None)]
