"""Tracking backends (sinks): MLflow, TensorBoard and W&B, behind one interface."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from freetf.config import Config
from freetf.tracking.store import (
    TrackingError,
    _experiment_id,
    _quietly,
    mlflow_client,
    root_cause,
    sqlite_file,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

# MLflow's log_batch limits (mlflow.utils.validation): 100 params/tags, 1000 metrics.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_CHARS = 5000
# Metric points kept while the backend is unreachable; the oldest are dropped beyond this.
MAX_BUFFERED_METRICS = 10_000
# While the store fails, the buffer is sent again at the next call, then after 1, 2, 4 ...
# up to this many seconds: a store that stays down (a full disk) costs a few attempts a
# minute, not one per log step.
MAX_RETRY_INTERVAL_S = 60.0

# MLflow error codes that retrying cannot fix: the data is dropped with an error log.
_PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_STATE",
    "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED",
    "UNAUTHENTICATED",
})
# The training guide's names (TensorBoard / W&B), mirrored beside the namespaced keys.
TENSORBOARD_ALIASES = {"train/ce_nats": "Loss/Reconstruction", "train/kl_hinged_nats": "Loss/KL",
                       "train/loss": "Loss/Total", "train/lr": "Learning_Rate"}
WANDB_ALIASES = {"train/ce_nats": "loss/reconstruction", "train/kl_hinged_nats": "loss/kl",
                 "train/loss": "loss/total", "train/lr": "learning_rate"}



class _Sink:
    """One tracking backend; every method is a no-op unless overridden."""

    run_id: str | None = None

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None) -> None: ...
    def log_text(self, text: str, filename: str) -> None: ...
    def log_figure(self, fig: Figure, filename: str) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str) -> None: ...


class _MlflowSink(_Sink):
    """An MLflow run written with ``log_batch``; failed writes are buffered and retried.

    A store that fails mid-run (a full disk, a server gone) is one warning when it starts
    failing, saying what is kept (the metrics, in memory, up to ``MAX_BUFFERED_METRICS``
    points) and how it is retried (backing off to ``MAX_RETRY_INTERVAL_S``), and one at
    :meth:`finish` if it never recovered: what was not recorded, and whether the run could
    be ended (else how to end it).
    """

    def __init__(self, client: mlflow.MlflowClient, run_id: str,
                 logged_params: dict[str, str] | None = None, uri: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self._logged_params = dict(logged_params or {})
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._pending_metrics: deque[Metric] = deque()
        self._failures = 0  # failed sends in a row
        self._retry_at = 0.0  # time.monotonic() of the next attempt while failing
        self._cause = ""  # the store's error, in one line
        self._dropped = 0  # metric points dropped from the full buffer
        self._lost: list[str] = []  # what failed while the store was failing

    @classmethod
    def start(cls, cfg: Config, uri: str, *, run_id: str | None, parent_run_id: str | None,
              run_name: str | None, params: dict[str, str],
              tags: dict[str, str]) -> _MlflowSink:
        """Create (or resume) the run and log params, tags and config.yaml, or raise
        :class:`TrackingError` in one line (removing an empty sqlite file it made)."""
        client = created = None
        db = sqlite_file(uri)
        new_db = db is not None and not db.exists()
        try:
            client = mlflow_client(uri)
            if run_id is None:
                experiment_id = _experiment_id(client, cfg.tracking.mlflow.experiment, uri)
                created = client.create_run(experiment_id, run_name=run_name).info.run_id
                sink = cls(client, created, uri=uri)
            else:
                run = client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                sink = cls(client, run_id, run.data.params, uri=uri)
            if parent_run_id:
                tags = {**tags, "mlflow.parentRunId": parent_run_id}
            sink.set_tags(tags, strict=True)
            sink.log_params(params, strict=True)
            client.log_text(sink.run_id, cfg.to_yaml(), "config.yaml")
        except Exception as err:
            if created is not None:
                _quietly(client.set_terminated, created, "FAILED")
            if new_db and db.is_file() and db.stat().st_size == 0:  # a full disk's leftover
                db.unlink(missing_ok=True)
            raise TrackingError(f"cannot start an MLflow run at {uri}: {root_cause(err)}"
                                ) from err
        logger.info("MLflow run %s at %s", sink.run_id, uri)
        return sink

    def log_params(self, params: dict[str, str], strict: bool = False) -> None:
        for key, value in params.items():
            old = self._logged_params.get(key)
            if old is not None and old != value:
                logger.warning("param %s=%r differs from the run's %r; MLflow params are "
                               "immutable, keeping %r", key, value, old, old)
            elif old is None:
                self._pending_params[key] = value
        self._flush(strict)

    def set_tags(self, tags: dict[str, str], strict: bool = False) -> None:
        self._pending_tags.update(tags)
        self._flush(strict)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp_ms = int(time.time() * 1000)
        self._pending_metrics.extend(Metric(k, v, timestamp_ms, step) for k, v in metrics.items())
        overflow = len(self._pending_metrics) - MAX_BUFFERED_METRICS
        if overflow > 0:
            for _ in range(overflow):
                self._pending_metrics.popleft()
            if not self._dropped:
                logger.warning("MLflow metric buffer full (%d points): dropped the oldest %d "
                               "(and so on, counted at the end)", MAX_BUFFERED_METRICS, overflow)
            self._dropped += overflow
        self._flush()

    def log_artifact(self, path: Path, artifact_path: str | None) -> None:
        self._try(self.client.log_artifact, path.name, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, filename: str) -> None:
        self._try(self.client.log_text, filename, self.run_id, text, filename)

    def log_figure(self, fig: Figure, filename: str) -> None:
        self._try(self.client.log_figure, filename, self.run_id, fig, filename)

    def flush(self) -> None:
        """Send what is buffered now; if the store still fails, say what is lost (a Ray
        worker's tracker, which ends with its process; the driver ends the run)."""
        if not self._flush(force=True):
            logger.warning("MLflow run %s at %s: %s not recorded (%s)", self.run_id,
                           self.uri, self._unsent(), self._cause)
            self._pending_metrics.clear()  # said once: the run's end does not repeat it

    def finish(self, status: str) -> None:
        self._flush(force=True)
        error = self._call(self.client.set_terminated, self.run_id, status)
        unsent = self._unsent()
        if error is None and not unsent:
            return
        said = [f"{unsent} not recorded ({self._cause})"] if unsent else []
        said.append(f"the run is marked {status}" if error is None else
                    f"the run could not be ended ({root_cause(error)}) and shows RUNNING: "
                    f"end it with MlflowClient({self.uri!r}).set_terminated("
                    f"{self.run_id!r}, {status!r})")
        logger.warning("MLflow run %s at %s: %s", self.run_id, self.uri, "; ".join(said))

    @property
    def pending_metrics(self) -> int:
        return len(self._pending_metrics)

    # -- internals

    def _flush(self, strict: bool = False, force: bool = False) -> bool:
        """Send all pending params, tags, metrics; False if some stay buffered.  While the
        store fails, only every so often (``_retry_at``) unless ``force``."""
        if self._failures and not force and time.monotonic() < self._retry_at:
            return False
        while self._pending_params:
            keys = list(itertools.islice(self._pending_params, MAX_PARAMS_PER_BATCH))
            sent = self._send(strict, params=[Param(k, self._pending_params[k]) for k in keys])
            if sent is False:
                return False
            for key in keys:
                value = self._pending_params.pop(key)
                if sent:
                    self._logged_params[key] = value
        while self._pending_tags:
            keys = list(itertools.islice(self._pending_tags, MAX_PARAMS_PER_BATCH))
            if self._send(strict, tags=[RunTag(k, self._pending_tags[k]) for k in keys]) is False:
                return False
            for key in keys:
                del self._pending_tags[key]
        while self._pending_metrics:
            chunk = list(itertools.islice(self._pending_metrics, MAX_METRICS_PER_BATCH))
            if self._send(strict, metrics=chunk) is False:
                return False
            for _ in chunk:
                self._pending_metrics.popleft()
        if self._failures:
            logger.warning("MLflow logging for run %s recovered; buffered data sent",
                           self.run_id)
            self._failures = 0
        return True

    def _send(self, strict: bool, **entities: list) -> bool | None:
        """One log_batch: True sent, False transient failure (keep), None rejected (drop)."""
        try:
            self.client.log_batch(self.run_id, **entities)
            return True
        except Exception as err:
            if strict:
                raise
            what = ", ".join(f"{len(v)} {k}" for k, v in entities.items())
            if isinstance(err, MlflowException) and err.error_code in _PERMANENT_ERROR_CODES:
                logger.error("MLflow rejected %s for run %s; dropping them: %s",
                             what, self.run_id, err)
                return None
            self._failures += 1
            self._retry_at = time.monotonic() + (0.0 if self._failures == 1 else min(
                MAX_RETRY_INTERVAL_S, 2.0 ** (self._failures - 2)))
            if self._failures == 1:
                self._cause = root_cause(err)
                logger.warning("MLflow logging for run %s at %s failed (%s); buffering its "
                               "metrics in memory (at most %d points) and retrying, at most "
                               "every %.0f s; training and its checkpoints go on", self.run_id,
                               self.uri, self._cause, MAX_BUFFERED_METRICS,
                               MAX_RETRY_INTERVAL_S)
            return False

    def _try(self, fn: Any, what: str, *args: Any) -> None:
        """An artifact upload: a warning if it fails, counted in the end's warning instead
        while the store is failing."""
        error = self._call(fn, *args)
        if error is None:
            return
        if not self._failures and not self._lost:
            logger.warning("MLflow %s for run %s failed: %s (what else fails is counted "
                           "when the run ends)", fn.__name__, self.run_id, root_cause(error))
        self._cause = self._cause or root_cause(error)
        self._lost.append(what)

    @staticmethod
    def _call(fn: Any, *args: Any) -> Exception | None:
        try:
            fn(*args)
        except Exception as err:
            return err
        return None

    def _unsent(self) -> str:
        """What the store does not hold, in words."""
        parts = []
        if self._pending_metrics:
            steps = [m.step for m in self._pending_metrics]
            parts.append(f"{len(steps)} metric points (steps {min(steps)} to {max(steps)})")
        if self._dropped:
            parts.append(f"{self._dropped} older points dropped from the full buffer")
        for count, what in ((len(self._pending_params), "params"),
                            (len(self._pending_tags), "tags")):
            if count:
                parts.append(f"{count} {what}")
        if self._lost:
            parts.append(f"the artifacts {', '.join(self._lost)}")
        return ", ".join(parts)


class _TensorBoardSink(_Sink):
    """A ``SummaryWriter`` log dir; metrics also under the training guide's names."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise TrackingError("tracking.tensorboard.enabled=true needs TensorBoard: "
                                "pip install 'freetf[tensorboard]'") from err
        self.writer = SummaryWriter(log_dir=str(log_dir))
        logger.info("TensorBoard logs in %s", log_dir)

    def log_params(self, params: dict[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("params", "| param | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in _with_aliases(metrics, TENSORBOARD_ALIASES).items():
            self.writer.add_scalar(key, value, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", "\n".join(f"{k}: {v}  " for k, v in tags.items()))

    def log_text(self, text: str, filename: str) -> None:
        self.writer.add_text(filename, text)

    def log_figure(self, fig: Figure, filename: str) -> None:
        self.writer.add_figure(filename, fig, close=False)

    def finish(self, status: str) -> None:
        self.writer.close()


class _WandbSink(_Sink):
    """A W&B run (``mode=offline`` needs no network); metrics also under the guide's names."""

    def __init__(self, cfg: Config, run_name: str | None, run_id: str | None,
                 params: dict[str, str]) -> None:
        try:
            import wandb
        except ImportError as err:
            raise TrackingError("tracking.wandb.enabled=true needs wandb: "
                                "pip install 'freetf[wandb]'") from err
        self.run = wandb.init(project=cfg.tracking.wandb.project, mode=cfg.tracking.wandb.mode,
                              name=run_name, id=run_id, resume="allow" if run_id else None,
                              config=params)
        logger.info("W&B run in project %s (mode=%s)", cfg.tracking.wandb.project,
                    cfg.tracking.wandb.mode)

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(_with_aliases(metrics, WANDB_ALIASES), step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.config.update({f"tags.{k}": v for k, v in tags.items()},
                               allow_val_change=True)

    def log_artifact(self, path: Path, artifact_path: str | None) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def _with_aliases(metrics: dict[str, float], aliases: dict[str, str]) -> dict[str, float]:
    return {**metrics, **{aliases[k]: v for k, v in metrics.items() if k in aliases}}

