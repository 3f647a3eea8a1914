"""Ray Train wiring: run :func:`freetf.train.train_loop` under ``TorchTrainer``.

Ray touches the loop at four points (Ray's own pattern): the device, ``prepare_model``
(DDP: gloo on CPU, NCCL on GPU), ``ray.train.report`` for metrics and checkpoints, and
``ray.train.get_checkpoint`` to resume after a worker failure.  Everything else is the
same loop that runs in-process.

The driver owns the MLflow run: it checks the tracking server before any training,
creates the run, hands its id to the workers (rank 0 logs metrics into it), and after
``fit`` logs the artifacts and closes the run with the right status.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed

from freetf.config import Config, from_dict
from freetf.logs import setup_logging
from freetf.training.checkpoint import CheckpointError, resolve_checkpoint
from freetf.training.loop import TrainContext, train_loop

log = logging.getLogger(__name__)

# A small object store: this project moves no datasets through it.
OBJECT_STORE_BYTES = 256 * 1024 ** 2


class RayTrainContext(TrainContext):
    """The loop's view of a Ray Train worker."""

    def __init__(self, resume_from: str | None = None, report_interval_s: float = 0.0) -> None:
        ctx = ray.train.get_context()
        super().__init__(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                         device=ray.train.torch.get_device(), resume_from=resume_from)
        self._tmp = Path(tempfile.mkdtemp(prefix="freetf-ckpt-"))
        self.report_interval_s = report_interval_s
        self._last_report = -math.inf
        self.marks["process_start"] = psutil.Process().create_time()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def _report_due(self) -> bool:
        """Has ``report_interval_s`` passed since the last report?  Rank 0's clock decides
        for all: ``ray.train.report`` is a collective, so every rank must call it alike."""
        if self.report_interval_s <= 0:
            return True
        due = time.monotonic() - self._last_report >= self.report_interval_s
        if self.world_size > 1:
            flag = torch.tensor([float(due)], device=self.device)  # CUDA under NCCL
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # fresh start, or --resume from a stopped run
            return Path(self.resume_from) if self.resume_from else None
        local = checkpoint.to_directory(str(self._tmp / "restore"))
        return Path(local)

    def checkpoint_root(self, cfg: Config) -> Path:
        return self._tmp / "out"  # Ray persists what is reported into storage_path

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None,
               essential: bool = True) -> None:
        """``ray.train.report``, thinned to one metric-only report per ``report_interval_s``.

        Ray Train (2.60, v2) hands each result to the controller through a one-slot queue
        that the controller drains when it polls the workers (every
        ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default): a second report within
        that interval blocks the training thread until the next poll.  Reporting every
        log step capped training at one log interval per poll (0.70x the in-process
        tokens/s in bench/ray_overhead.py; 0.92-0.99x with this thinning).  The skipped
        points are not lost: rank 0 logs every log step to MLflow, which the plots read.
        """
        self.history.append(dict(metrics))
        if not essential and not self._report_due():
            return
        self._last_report = time.monotonic()
        checkpoint = (ray.train.Checkpoint.from_directory(str(checkpoint_dir))
                      if checkpoint_dir is not None else None)
        ray.train.report({**metrics, **self.timeline()}, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    setup_logging()
    cfg = from_dict(loop_config["config"])
    ctx = RayTrainContext(loop_config.get("resume"), cfg.scaling.report_interval_s)
    tracker = None
    if ctx.is_main and loop_config.get("run_id"):
        from freetf.tracking import make_tracker

        tracker = make_tracker(cfg, rank=0, run_id=loop_config["run_id"])
    train_loop(cfg, ctx, tracker=tracker)


@dataclass
class RunSummary:
    """What a finished (or failed) training run left behind."""

    metrics: dict[str, Any]
    checkpoint: Path | None
    run_id: str | None
    error: BaseException | None
    wall_s: float


def init_ray(num_cpus: float | None = None, quiet: bool = False) -> None:
    """Join ``RAY_ADDRESS`` (or the job's cluster) if set, else start a new local Ray.

    ``ray.init()`` alone would join any Ray that another process runs on this machine.
    And Ray Train's placement-group cleaner asks the dashboard of the most recently
    started Ray on the machine whether its controller is alive: with another Ray
    running, it asks the wrong one, hears "dead", and removes live workers.  Pinning
    the dashboard port and exporting ``RAY_API_SERVER_ADDRESS`` to the Ray processes
    (they inherit this environment) points it at the right one.  The dashboard
    (ray[default]) also lets Ray clean up the placement groups of stopped runs.
    ``quiet``: Ray's own log lines only from ERROR up, and the Ray processes' output
    not printed here (it stays in their log files).
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
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES,
             include_dashboard=True, dashboard_port=port, **settings)


def build_trainer(cfg: Config, run_id: str | None = None, resume: str | None = None,
                  callbacks: list | None = None, storage_path: str | None = None,
                  controller_failure_limit: int = -1):
    """A ``TorchTrainer`` for ``cfg`` (scaling, checkpoints and failures from config).

    ``controller_failure_limit``: worker-group start-ups that may fail (e.g. time out for
    lack of CPUs) before the run fails; -1 (Ray's default) retries forever.
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
        name=sc.run_name or cfg.tracking.mlflow.run_name or "freetf",
        storage_path=storage_path or _absolute_storage(sc.storage_path),
        checkpoint_config=checkpoint_config,
        failure_config=ray.train.FailureConfig(
            max_failures=sc.max_failures, controller_failure_limit=controller_failure_limit),
        callbacks=callbacks)
    return ray.train.torch.TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.to_dict(), "run_id": run_id, "resume": resume},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=ray.train.torch.TorchConfig(backend=backend),
        run_config=run_config)


def run_training(cfg: Config, resume: str | None = None) -> RunSummary:
    """Train ``cfg`` through Ray Train with an MLflow run; in-process if ``use_ray`` is off."""
    from freetf.tracking import CURVE_METRICS, make_tracker, metric_history, plot_training_curves

    if resume is not None:
        try:
            resume = str(resolve_checkpoint(resume).resolve())
        except CheckpointError as err:
            raise CheckpointError(f"--resume: {err}") from None
    start = time.perf_counter()
    cfg = absolute_paths(cfg)
    tracker = make_tracker(cfg, rank=0) if cfg.tracking.mlflow.enabled else None
    run_id = tracker.run_id if tracker is not None else None
    error: BaseException | None = None
    metrics: dict[str, Any] = {}
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = []
    try:
        if cfg.scaling.use_ray:
            init_ray()
            result = build_trainer(cfg, run_id, resume).fit()
            error = result.error
            metrics = dict(result.metrics or {})
            # Ray's results are thinned (report_interval_s); MLflow has every log step.
            if tracker is not None and tracker.client is not None:
                history = metric_history(tracker.client, run_id, CURVE_METRICS)
            elif result.metrics_dataframe is not None:
                history = result.metrics_dataframe.to_dict("records")
            checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
        else:
            res = train_loop(cfg, TrainContext(resume_from=resume), tracker=tracker)
            metrics, checkpoint, history = res.metrics, res.checkpoint, res.history
    except BaseException as err:  # noqa: BLE001 - closed below, re-raised by the caller
        error = err
    finally:
        if tracker is not None:
            log_run_artifacts(tracker, metrics, checkpoint, history, plot_training_curves)
            tracker.finish("FAILED" if error is not None else "FINISHED")
    return RunSummary(metrics, checkpoint, run_id, error, time.perf_counter() - start)


def log_run_artifacts(tracker, metrics, checkpoint, history, plot) -> None:
    samples = metrics.get("eval/samples")
    if samples:
        tracker.log_text("\n".join(samples) + "\n", "samples.txt")
    if checkpoint is not None:
        tracker.log_text(f"{checkpoint}\n", "checkpoint_path.txt")
        tracker.set_tags({"freetf.checkpoint": str(checkpoint)})
    if metrics.get("eval/verdict"):
        tracker.set_tags({"freetf.verdict": metrics["eval/verdict"]})
    points = [h for h in history if "train/loss" in h]
    if points:
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifact(plot(points, Path(tmp) / "training_curves.png"))


def absolute_paths(cfg: Config) -> Config:
    """Resolve every relative path and the tracking URI before workers chdir away."""
    from freetf.tracking import resolve_tracking_uri

    overrides: dict[str, Any] = {
        "checkpoint.dir": str(Path(cfg.checkpoint.dir).expanduser().resolve()),
        "scaling.storage_path": _absolute_storage(cfg.scaling.storage_path),
    }
    if cfg.tracking.mlflow.enabled:
        overrides["tracking.mlflow.tracking_uri"] = resolve_tracking_uri(cfg)
    if cfg.data.path:
        overrides["data.path"] = str(Path(cfg.data.path).expanduser().resolve())
    if cfg.tracking.tensorboard.enabled:
        overrides["tracking.tensorboard.log_dir"] = str(
            Path(cfg.tracking.tensorboard.log_dir).expanduser().resolve())
    return cfg.replace(overrides)


def _absolute_storage(path: str) -> str:
    """Workers chdir into the Ray session folder: resolve local paths before launch."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())
