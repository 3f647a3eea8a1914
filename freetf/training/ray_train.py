"""Ray Train wiring: run :func:`freetf.training.loop.train_loop` under ``TorchTrainer``.

Ray touches the loop at four points (Ray's own pattern): the device, ``prepare_model``
(DDP: gloo on CPU, NCCL on GPU; or ``shard_model``, FSDP2, with scaling.strategy=fsdp,
where every rank reports its own checkpoint shards and Ray merges them into one
checkpoint), ``ray.train.report`` for metrics and checkpoints, and
``ray.train.get_checkpoint`` to resume after a worker failure.  Everything else is the
same loop that runs in-process.

The driver owns the MLflow run: it checks the tracking server before any training,
creates the run, hands its id to the workers (rank 0 logs metrics into it), and after
``fit`` logs the artifacts and closes the run with the right status.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from freetf.config import Config, from_dict
from freetf.logs import setup_logging
from freetf.process_env import environment
from freetf.training.checkpoint import CheckpointWriteError
from freetf.training.console import MlflowProgress, TrainConsole
from freetf.training.context import TrainContext
from freetf.training.loop import NONFINITE_STOP_KEY, NonFiniteLossError, train_loop
from freetf.training.paths import (  # noqa: F401 - run_name: ray_train's API too
    absolute_paths,
    absolute_storage,
    run_directory,
    run_name,
)
from freetf.training.ray_context import RayTrainContext, publish_stop
from freetf.training.run_folder import plan_run
from freetf.training.stop import TrainingStopped, stop_on_signals

log = logging.getLogger(__name__)

# A small object store: this project moves no datasets through it.
OBJECT_STORE_BYTES = 256 * 1024 ** 2


def _worker_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Entry point of each Ray Train worker.  -> (with ``quiet_stops``) how the run
    stopped, if it stopped early: rank 0's return value is the driver's ``Result``'s."""
    cfg = from_dict(loop_config["config"])
    # Local mode (num_workers=0) persists no reported checkpoint: write them in place.
    local_mode = cfg.scaling.num_workers == 0
    if not local_mode:  # (local mode runs in the driver, whose console is set up already)
        setup_logging(propagate=False)  # Ray Train's root logger would print each line again
    quiet = bool(loop_config.get("quiet_stops"))
    ctx = RayTrainContext(loop_config.get("resume"), cfg.scaling.report_interval_s,
                          persist_root=run_directory(cfg) if local_mode else None,
                          quiet_nonfinite_stop=quiet, stop_key=loop_config.get("stop_key"))
    # Returning, not raising, keeps Ray from printing tracebacks and from retrying a run
    # that would stop again; every rank stops at the same step.  (Sweep trials raise:
    # Tune records them as failed.)
    tracker = None
    try:
        tracker = _worker_tracker(cfg, ctx, loop_config.get("run_id"))
        train_loop(cfg, ctx, tracker=tracker)
    except NonFiniteLossError:  # reported with its checkpoint by the loop
        if not quiet:
            raise
    except TrainingStopped as err:  # reported with its checkpoint by the loop
        if not quiet:
            raise
        return {"stopped": err.signum, "step": err.step}
    except CheckpointWriteError as err:  # the last good checkpoint is Ray's latest
        if not quiet:
            raise
        return {"write_error": [str(err.path), err.cause]}
    finally:
        if tracker is not None:  # the driver ends the run; what this worker buffered goes now
            tracker.flush()
        ctx.close()
    return None


def _worker_outcome(value: Any, checkpoint: Path | None) -> BaseException | None:
    """The stop that rank 0's :func:`_worker_loop` returned, if any, with ``checkpoint``
    (Ray's latest persisted one) as the checkpoint to continue from."""
    if not isinstance(value, dict):
        return None
    if "stopped" in value:
        return TrainingStopped(int(value["stopped"]), int(value["step"]), checkpoint)
    if "write_error" in value:
        path, cause = value["write_error"]
        return CheckpointWriteError(path, cause, checkpoint)
    return None


def _worker_tracker(cfg: Config, ctx: RayTrainContext, run_id: str | None):
    """Rank 0 logs into the driver's MLflow run; other ranks log nothing."""
    if not ctx.is_main or not run_id:
        return None
    from freetf.tracking import SkipLoggedSteps, last_logged_step, make_tracker

    tracker = make_tracker(cfg, rank=0, run_id=run_id)
    # A restart after a worker failure replays the steps after its checkpoint, or
    # every step when the failure came before Ray registered any checkpoint (a node
    # lost right after writing one): the run's MLflow points tell which were logged.
    logged = last_logged_step(tracker)
    return SkipLoggedSteps(tracker, logged) if logged else tracker


@dataclass
class RunSummary:
    """What a finished (or failed) training run left behind."""

    metrics: dict[str, Any]
    checkpoint: Path | None
    run_id: str | None
    error: BaseException | None
    wall_s: float


def init_ray(num_cpus: float | None = None, quiet: bool = False,
             setup_hook: str | None = None) -> None:
    """Join ``RAY_ADDRESS`` (or the job's cluster) if set, else start a new local Ray.

    ``ray.init()`` alone would join any Ray that another process runs on this machine.
    And Ray Train's placement-group cleaner asks the dashboard of the most recently
    started Ray on the machine whether its controller is alive: with another Ray
    running, it asks the wrong one, hears "dead", and removes live workers.  Pinning
    the dashboard port and exporting ``RAY_API_SERVER_ADDRESS`` to the Ray processes
    (they inherit this environment) points it at the right one.  The dashboard
    (ray[default]) also lets Ray clean up the placement groups of stopped runs.
    ``quiet``: Ray's own log lines only from ERROR up, and the Ray processes' output
    not printed here (it stays in their log files).  ``setup_hook``: a local Ray's
    worker processes call this function (``module.name``) when they start; a Ray joined
    through ``RAY_ADDRESS`` keeps the runtime environment it was given.
    """
    settings = {"log_to_driver": not quiet, "logging_level": logging.ERROR if quiet else
                logging.INFO}
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**settings)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray Train gives a worker group 60 s to start, then restarts it: on a loaded machine
    # (torch's import alone can take that long) it restarts for ever.  A local Ray's
    # processes inherit this environment; a value the user set is kept.
    os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, str(WORKER_GROUP_START_TIMEOUT_S))
    with loopback_only():
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"worker_process_setup_hook": setup_hook} if setup_hook else None,
                 **settings)


WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_START_TIMEOUT_S = 300


@contextlib.contextmanager
def loopback_only():
    """Start a local Ray whose every server listens on 127.0.0.1 only.

    Ray binds its servers to the node IP: the GCS, the raylet's node and object
    managers and every worker's (and the driver's) gRPC server listen on 127.0.0.1 when
    the node IP is 127.0.0.1 and on all interfaces otherwise; the dashboard agent, the
    runtime-env agent and the metrics exporters listen on the node IP.  On Linux Ray
    turns ``_node_ip_address="127.0.0.1"`` into the machine's routable address (so that
    other nodes could join); its single-machine mode (the macOS/Windows default,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps 127.0.0.1.  That switch is read once,
    at import, into ``ray_constants.ENABLE_RAY_CLUSTER``: it is set here for the driver
    and, through the environment, for the processes ``ray.init`` starts, then restored,
    so a later ``RAY_ADDRESS`` run in this process joins its cluster as documented.
    """
    import ray._private.ray_constants as ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environment({ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def cluster_hosts() -> set[str]:
    """The addresses of the Ray cluster's live nodes (one on a single machine, also
    under ``ray.cluster_utils.Cluster``, whose nodes share this host's address)."""
    return {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}


def check_tracking_store(uri: str) -> None:
    """Refuse an MLflow store in a local file when the cluster spans several hosts."""
    from freetf.tracking import check_store_shared_by

    check_store_shared_by(uri, cluster_hosts())


class _StoppableTrainer(ray.train.torch.TorchTrainer):
    """A ``TorchTrainer`` that leaves SIGINT to :func:`freetf.training.stop.stop_on_signals`
    (the workers finish their step and checkpoint): Ray Train's own handler (Ray 2.60's
    ``_register_sigint_handler``, set in ``fit``) aborts the workers at once instead."""

    def _register_sigint_handler(self, controller) -> None:
        return None


def build_trainer(cfg: Config, run_id: str | None = None, resume: str | None = None,
                  callbacks: list | None = None, storage_path: str | None = None,
                  controller_failure_limit: int = -1, quiet_stops: bool = False,
                  stop_key: str | None = None):
    """A ``TorchTrainer`` for ``cfg`` (scaling, checkpoints and failures from config).

    ``controller_failure_limit``: worker-group start-ups that may fail (e.g. time out for
    lack of CPUs) before the run fails; -1 (Ray's default) retries forever.
    ``quiet_stops``: a non-finite stop ends the run normally, its last report carrying
    ``stopped/nonfinite_steps`` and a checkpoint; a stop asked by a signal and a failed
    checkpoint write end it too, told by rank 0's return value (what ``run_training``
    reads).  ``stop_key``: the workers stop when the driver publishes it
    (:func:`freetf.training.ray_context.publish_stop`); SIGINT is then left to the driver.
    """
    sc = cfg.scaling
    use_gpu = sc.use_gpu
    backend = sc.backend if sc.backend != "auto" else ("nccl" if use_gpu else "gloo")
    resources = {"CPU": sc.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=cfg.checkpoint.keep,
        checkpoint_score_attribute=cfg.checkpoint.metric,
        checkpoint_score_order=cfg.checkpoint.mode)
    run_config = ray.train.RunConfig(
        name=run_name(cfg),
        storage_path=storage_path or absolute_storage(sc.storage_path),
        checkpoint_config=checkpoint_config,
        failure_config=ray.train.FailureConfig(
            max_failures=sc.max_failures, controller_failure_limit=controller_failure_limit),
        callbacks=callbacks)
    trainer = _StoppableTrainer if stop_key else ray.train.torch.TorchTrainer
    return trainer(
        _worker_loop,
        train_loop_config={"config": cfg.to_dict(), "run_id": run_id, "resume": resume,
                           "quiet_stops": quiet_stops, "stop_key": stop_key},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=sc.placement_strategy),
        torch_config=ray.train.torch.TorchConfig(backend=backend),
        run_config=run_config)


def run_training(cfg: Config, resume: str | None = None, *, fresh: bool = False,
                 console: TrainConsole | None = None) -> RunSummary:
    """Train ``cfg`` through Ray Train with an MLflow run; in-process if ``use_ray`` is off.

    Before Ray or any worker starts, :func:`~freetf.training.run_folder.plan_run` checks
    the outputs and the data and decides the run's folder: the run continues the latest
    checkpoint there if it is of the same model (``fresh``: a new folder beside it).
    ``console``: shows the run's progress (under Ray read back from MLflow) and starts Ray
    quietly unless the console is verbose.
    """
    from freetf.tracking import CURVE_METRICS, make_tracker, metric_history, plot_training_curves

    start = time.perf_counter()
    plan = plan_run(cfg, resume, fresh)
    cfg, resume = plan.cfg, plan.resume
    if console is not None:
        console.start(plan)
    if cfg.scaling.use_ray:
        init_ray(quiet=console is not None and not console.verbose)
        if cfg.tracking.mlflow.enabled:
            check_tracking_store(cfg.tracking.mlflow.tracking_uri)
    # the MLflow run is named after the run's folder (tiny, tiny-2 ...) unless named
    name = cfg.tracking.mlflow.run_name or plan.folder.name
    tracker = make_tracker(cfg, rank=0, run_name=name) if cfg.tracking.mlflow.enabled else None
    run_id = tracker.run_id if tracker is not None else None
    error: BaseException | None = None
    metrics: dict[str, Any] = {}
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = []
    # SIGTERM / SIGINT: the loop stops at its next step with a checkpoint (stop.py); under
    # Ray the workers hear of it through Ray's key-value store.  (Installed after
    # ray.init, whose own SIGTERM handler exits at once.)
    stop_key = f"stop-{uuid.uuid4().hex}" if cfg.scaling.use_ray else None
    try:
        with stop_on_signals(functools.partial(publish_stop, stop_key) if stop_key else None):
            if cfg.scaling.use_ray:
                with _progress(console, tracker):
                    result = build_trainer(cfg, run_id, resume, quiet_stops=True,
                                           stop_key=stop_key).fit()
                metrics = dict(result.metrics or {})
                checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
                error = result.error or _worker_outcome(result.return_value, checkpoint)
                if NONFINITE_STOP_KEY in metrics:
                    error = NonFiniteLossError(int(metrics[NONFINITE_STOP_KEY]),
                                               int(metrics["step"]))
                # Ray's results are thinned (report_interval_s); MLflow has every log step.
                if tracker is not None and tracker.client is not None:
                    history = metric_history(tracker.client, run_id, CURVE_METRICS)
                elif result.metrics_dataframe is not None:
                    history = result.metrics_dataframe.to_dict("records")
            else:
                context = TrainContext(resume_from=resume, listener=console.report
                                       if console is not None else None)
                res = train_loop(cfg, context, tracker=tracker)
                metrics = res.metrics | {"step": res.step}  # as Ray's reports have it
                checkpoint, history = res.checkpoint, res.history
    except (NonFiniteLossError, TrainingStopped) as err:
        error, checkpoint = err, err.checkpoint  # the in-process loop's last checkpoint
    except BaseException as err:  # noqa: BLE001 - closed below, re-raised by the caller
        error = err
    finally:
        if tracker is not None:
            log_run_artifacts(tracker, metrics, checkpoint, history, plot_training_curves)
            tracker.finish("FINISHED" if error is None else
                           "KILLED" if isinstance(error, KeyboardInterrupt | TrainingStopped)
                           else "FAILED")
    return RunSummary(metrics, checkpoint, run_id, error, time.perf_counter() - start)


def _progress(console: TrainConsole | None, tracker) -> contextlib.AbstractContextManager:
    """Under Ray: the console's progress, read from the run's MLflow metrics."""
    if console is None or tracker is None or tracker.client is None:
        return contextlib.nullcontext()
    return MlflowProgress(tracker.client, tracker.run_id, console)


def log_run_artifacts(tracker, metrics, checkpoint, history, plot) -> None:
    from freetf.tracking import tags

    samples = metrics.get("eval/samples")
    if samples:
        tracker.log_text("\n".join(samples) + "\n", "samples.txt")
    if checkpoint is not None:
        tracker.log_text(f"{checkpoint}\n", "checkpoint_path.txt")
        tracker.set_tags({tags.CHECKPOINT: str(checkpoint)})
    if metrics.get("eval/verdict"):
        from freetf.tracking import log_verdict

        log_verdict(tracker, metrics["eval/verdict"], step=metrics.get("step"))
    points = [h for h in history if "train/loss" in h]
    if points:
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifact(plot(points, Path(tmp) / "training_curves.png"))
