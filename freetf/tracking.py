"""Experiment tracking: MLflow runs, with optional TensorBoard and W&B mirrors.

This is the only module in freetf that imports MLflow (TensorBoard and W&B are imported
lazily, only when enabled).  Every other module talks to a :class:`Tracker`:

    tracker = make_tracker(cfg, rank=ctx.rank)          # NullTracker on rank != 0
    tracker.log_metrics({"train/loss": 2.1}, step=10)
    tracker.finish("FINISHED")

MLflow is driven through an explicit :class:`mlflow.MlflowClient` bound to the resolved
tracking URI (no fluent global state), so several trackers can coexist in one process
(e.g. a sweep's parent run and its trials).

Failure policy: an unusable tracking backend at start is a :class:`TrackingError` before
any training happens.  Once a run is going, a failed ``log_*`` call never raises into the
training loop: it logs a warning, keeps the data in a bounded buffer and retries it on the
next call (and at :meth:`Tracker.finish`).
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from freetf.config import Config, flatten

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
# Over HTTP, MLflow's default of 7 retries with backoff stalls each failing call ~4 min;
# tracking must not stall training that long. Used only when the user has not set these.
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
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


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; raised at start, before any training."""


# ----------------------------------------------------------------------------- URIs


def resolve_tracking_uri(cfg: Config) -> str:
    """``tracking.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db.

    Local stores are made absolute against the current directory, since Ray workers
    run in other directories: ``sqlite:///<abs cwd>/mlflow.db`` by default.
    """
    uri = cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    scheme = urlparse(uri).scheme
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db and db != ":memory:" and not db.startswith("/"):
            return f"sqlite:///{Path(db).resolve()}"
    elif scheme == "file":
        path = uri[len("file:"):]
        if not path.startswith("//"):  # file:relative/path
            return Path(path).resolve().as_uri()
    elif not scheme:  # a bare path is a file store to MLflow
        return Path(uri).resolve().as_uri()
    return uri


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`TrackingError` if an http(s) tracking server does not answer /health.

    A no-op for local stores (sqlite, file) and other schemes.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # reachable; credentials are the client's business
            return
        reason = f"GET {url} answered HTTP {err.code}; is this an MLflow tracking server?"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = f"GET {url} failed: {getattr(err, 'reason', err)}"
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}). Start it (e.g. "
        f"`mlflow server --host 127.0.0.1 --port 5000`), point tracking.mlflow.tracking_uri "
        f"or MLFLOW_TRACKING_URI at a running server or a sqlite:/// file, or set "
        f"tracking.mlflow.enabled=false.")


def mlflow_client(uri: str) -> mlflow.MlflowClient:
    """An MlflowClient for ``uri``, preparing local stores (sqlite folder, file opt-in)."""
    scheme = urlparse(uri).scheme
    if scheme == "file":
        # MLflow 3.x refuses file stores unless opted in; a file: URI is an explicit ask.
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            logger.info("using the file store %s: setting MLFLOW_ALLOW_FILE_STORE=true", uri)
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    elif uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db.startswith("/"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
    elif scheme in ("http", "https"):
        for name, value in HTTP_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return mlflow.MlflowClient(tracking_uri=uri)


# ----------------------------------------------------------------------------- sinks


class _Sink:
    """One tracking backend; every method is a no-op unless overridden."""

    run_id: str | None = None

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None) -> None: ...
    def log_text(self, text: str, filename: str) -> None: ...
    def log_figure(self, fig: Figure, filename: str) -> None: ...
    def finish(self, status: str) -> None: ...


class _MlflowSink(_Sink):
    """An MLflow run written with ``log_batch``; failed writes are buffered and retried."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str,
                 logged_params: dict[str, str] | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self._logged_params = dict(logged_params or {})
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._pending_metrics: deque[Metric] = deque()
        self._failing = False

    @classmethod
    def start(cls, cfg: Config, uri: str, *, run_id: str | None, parent_run_id: str | None,
              run_name: str | None, params: dict[str, str],
              tags: dict[str, str]) -> _MlflowSink:
        """Create (or resume) the run and log params, tags and config.yaml, or raise."""
        client = mlflow_client(uri)
        created = None
        try:
            if run_id is None:
                experiment_id = _experiment_id(client, cfg.tracking.mlflow.experiment, uri)
                created = client.create_run(experiment_id, run_name=run_name).info.run_id
                sink = cls(client, created)
            else:
                run = client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                sink = cls(client, run_id, run.data.params)
            if parent_run_id:
                tags = {**tags, "mlflow.parentRunId": parent_run_id}
            sink.set_tags(tags, strict=True)
            sink.log_params(params, strict=True)
            client.log_text(sink.run_id, cfg.to_yaml(), "config.yaml")
        except Exception as err:
            if created is not None:
                _quietly(client.set_terminated, created, "FAILED")
            raise TrackingError(f"cannot start an MLflow run at {uri}: {err}") from err
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
            logger.warning("MLflow metric buffer full (%d points): dropped the oldest %d",
                           MAX_BUFFERED_METRICS, overflow)
        self._flush()

    def log_artifact(self, path: Path, artifact_path: str | None) -> None:
        self._try(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, filename: str) -> None:
        self._try(self.client.log_text, self.run_id, text, filename)

    def log_figure(self, fig: Figure, filename: str) -> None:
        self._try(self.client.log_figure, self.run_id, fig, filename)

    def finish(self, status: str) -> None:
        if not self._flush():
            logger.warning("MLflow run %s finished with %d metric points, %d params and %d "
                           "tags unsent", self.run_id, len(self._pending_metrics),
                           len(self._pending_params), len(self._pending_tags))
        self._try(self.client.set_terminated, self.run_id, status)

    @property
    def pending_metrics(self) -> int:
        return len(self._pending_metrics)

    # -- internals

    def _flush(self, strict: bool = False) -> bool:
        """Send all pending params, tags, metrics; False if some stay buffered."""
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
        if self._failing:
            logger.warning("MLflow logging for run %s recovered; buffered data sent",
                           self.run_id)
            self._failing = False
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
            if not self._failing:
                logger.warning("MLflow logging for run %s failed (%s: %s); buffering and "
                               "retrying on the next call", self.run_id,
                               type(err).__name__, err)
            self._failing = True
            return False

    def _try(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:
            logger.warning("MLflow %s for run %s failed: %s", fn.__name__, self.run_id, err)


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


# ----------------------------------------------------------------------------- tracker


class Tracker:
    """Fans each call out to the enabled backends; never raises into the training loop.

    Not thread-safe: one training process (rank 0) owns it.  Usable as a context
    manager, which finishes the run as FINISHED, FAILED (exception) or KILLED (Ctrl-C).
    """

    def __init__(self, sinks: list[_Sink]) -> None:
        self._sinks = sinks
        self._mlflow = next((s for s in sinks if isinstance(s, _MlflowSink)), None)
        self._finished = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None without an MLflow run."""
        return self._mlflow.run_id if self._mlflow else None

    @property
    def client(self) -> mlflow.MlflowClient | None:
        """The MLflow client bound to this run's tracking URI, or None."""
        return self._mlflow.client if self._mlflow else None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; nested dicts are flattened to dotted keys, values stringified."""
        self._each("log_params", _param_strings(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at ``step``; values that are not numbers are skipped."""
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                logger.warning("metric %s=%r is not a number; not logged", key, value)
        if values:
            self._each("log_metrics", values, int(step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (values stringified)."""
        self._each("set_tags", {k: str(v)[:MAX_TAG_VALUE_CHARS] for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file into the run's artifacts (under ``artifact_path``)."""
        self._each("log_artifact", Path(path), artifact_path)

    def log_text(self, text: str, filename: str) -> None:
        """Store ``text`` as the artifact ``filename``."""
        self._each("log_text", text, filename)

    def log_figure(self, fig: Figure, filename: str) -> None:
        """Store a matplotlib figure as the artifact ``filename`` (e.g. ``curves.png``)."""
        self._each("log_figure", fig, filename)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush buffered data and end the run; later calls are no-ops."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status={status!r} must be one of {', '.join(RUN_STATUSES)}")
        if self._finished:
            return
        self._finished = True
        self._each("finish", status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _each(self, method: str, *args: Any) -> None:
        for sink in self._sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as err:
                logger.warning("%s.%s failed: %s", type(sink).__name__.strip("_"), method, err)


class NullTracker(Tracker):
    """A tracker that does nothing: non-zero ranks, or tracking disabled."""

    def __init__(self) -> None:
        super().__init__([])


def make_tracker(cfg: Config, *, rank: int = 0, run_id: str | None = None,
                 parent_run_id: str | None = None, run_name: str | None = None,
                 tags: dict[str, Any] | None = None) -> Tracker:
    """Start (or resume, given ``run_id``) a tracked run for ``cfg`` on rank 0.

    MLflow (if enabled) gets the flattened config as params, the freetf tags and the
    resolved config as ``config.yaml``; ``parent_run_id`` nests the run under a parent.
    Raises :class:`TrackingError` if a backend cannot be used, before any training.
    """
    if rank != 0:
        return NullTracker()
    tracking = cfg.tracking
    run_name = run_name or tracking.mlflow.run_name
    params = _param_strings(cfg.to_dict())
    all_tags = {"freetf.model_kind": "free_transformer" if cfg.model.has_latent else "baseline",
                "freetf.latent_bits": str(cfg.model.latent_bits)}
    commit = _git_commit()
    if commit:
        all_tags.update({"git.commit": commit, "mlflow.source.git.commit": commit})
    all_tags.update({k: str(v)[:MAX_TAG_VALUE_CHARS] for k, v in (tags or {}).items()})

    sinks: list[_Sink] = []
    if tracking.mlflow.enabled:
        uri = resolve_tracking_uri(cfg)
        check_tracking_server(uri)
        sinks.append(_MlflowSink.start(cfg, uri, run_id=run_id, parent_run_id=parent_run_id,
                                       run_name=run_name, params=params, tags=all_tags))
    mlflow_run_id = sinks[0].run_id if sinks else run_id
    try:
        if tracking.tensorboard.enabled:
            name = "-".join(filter(None, [run_name, (mlflow_run_id or "")[:8]]))
            log_dir = Path(tracking.tensorboard.log_dir).resolve() / (
                name or time.strftime("%Y%m%d-%H%M%S"))
            sinks.append(_TensorBoardSink(log_dir))
        if tracking.wandb.enabled:
            sinks.append(_WandbSink(cfg, run_name, mlflow_run_id, params))
    except Exception:
        for sink in sinks:
            _quietly(sink.finish, "FAILED")
        raise
    if not sinks:
        return NullTracker()
    tracker = Tracker(sinks)
    for sink in sinks:
        if not isinstance(sink, _MlflowSink):
            sink.log_params(params)
            sink.set_tags(all_tags)
    return tracker


# ----------------------------------------------------------------------------- plots


CURVE_METRICS = ("train/loss", "train/ce_nats", "train/kl_nats", "train/free_bits_nats")


def metric_history(client, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """One dict per logged step (with ``step``) of the metrics ``keys`` of a run."""
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            rows.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return [rows[s] for s in sorted(rows)]


def plot_training_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Save loss / reconstruction and raw KL (nats per token) against step as a PNG.

    ``history`` holds one dict of metrics per logged step, with a ``step`` key (the
    list index otherwise); missing keys are skipped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(row.get("step", i), row[key]) for i, row in enumerate(history) if key in row]
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_kl = fig.subplots(1, 2)
    for key, label in (("train/loss", "total loss"), ("train/ce_nats", "reconstruction")):
        steps, values = series(key)
        if steps:
            ax_loss.plot(steps, values, label=label)
    ax_loss.set(xlabel="step", ylabel="nats per token", title="Loss")
    steps, values = series("train/kl_nats")
    if steps:
        ax_kl.plot(steps, values, label="raw KL")
    steps, values = series("train/free_bits_nats")
    if steps:
        ax_kl.plot(steps, values, "--", label="free-bits threshold")
    ax_kl.set(xlabel="step", ylabel="nats per token", title="KL(Q(Z|S) || P(Z))")
    for ax in (ax_loss, ax_kl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- helpers


def _experiment_id(client: mlflow.MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, creating it (or restoring it if deleted)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri))
        except MlflowException as err:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise err from None
    if experiment.lifecycle_stage == "deleted":
        logger.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (not under the cwd)."""
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):].startswith("/"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def _param_strings(params: dict[str, Any]) -> dict[str, str]:
    """Flatten to dotted keys; values as strings (lists as repr), cut to MLflow's limit."""
    out = {}
    for key, value in flatten(params).items():
        text = repr(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_VALUE_CHARS:
            logger.warning("param %s is %d chars; truncated to %d", key, len(text),
                           MAX_PARAM_VALUE_CHARS)
            text = text[:MAX_PARAM_VALUE_CHARS]
        out[key] = text
    return out


def _git_commit() -> str | None:
    """HEAD of the git checkout holding freetf's source, or None."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _with_aliases(metrics: dict[str, float], aliases: dict[str, str]) -> dict[str, float]:
    return {**metrics, **{aliases[k]: v for k, v in metrics.items() if k in aliases}}


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as err:
        logger.debug("ignored during cleanup: %s", err)


# ----------------------------------------------------------------------------- sweeps


def log_sweep_analysis(client, parent_run_id: str, parent: dict[str, dict[str, Any]],
                       children: dict[str, dict[str, dict[str, Any]]]) -> None:
    """A sweep's analysis into MLflow: ``parent`` = {"metrics", "params", "tags"} on the
    sweep's parent run (the boundaries: sortable in the runs table), ``children`` =
    {run_id: {"metrics", "tags"}} on its trial runs (their seed-calibrated verdicts).
    Metrics are logged at step 0; a failed write is logged, never raised."""
    now = int(time.time() * 1000)

    def entities(values: dict[str, dict[str, Any]]) -> dict[str, list]:
        return {"metrics": [Metric(k, float(v), now, 0)
                            for k, v in values.get("metrics", {}).items()],
                "params": [Param(k, str(v)) for k, v in values.get("params", {}).items()],
                "tags": [RunTag(k, str(v)[:MAX_TAG_VALUE_CHARS])
                         for k, v in values.get("tags", {}).items()]}
    for run_id, values in [(parent_run_id, parent), *children.items()]:
        try:
            client.log_batch(run_id, **entities(values))
        except MlflowException as err:
            logger.warning("could not log the sweep analysis to run %s: %s", run_id, err)
