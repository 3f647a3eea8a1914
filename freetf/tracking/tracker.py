"""The :class:`Tracker` that fans calls out to the sinks, and :func:`make_tracker`."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

from freetf.config import Config, flatten
from freetf.tracking.params import CONFIG_TAG, config_tag, run_params
from freetf.tracking.sinks import (
    MAX_PARAM_VALUE_CHARS,
    MAX_TAG_VALUE_CHARS,
    _MlflowSink,
    _Sink,
    _TensorBoardSink,
    _WandbSink,
)
from freetf.tracking.store import _quietly, check_tracking_server, resolve_tracking_uri
from freetf.tracking.tags import LATENT_BITS, MODEL_KIND

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


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

    def flush(self) -> None:
        """Send buffered data now (a process that ends without ending the run)."""
        self._each("flush")

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
                 tags: dict[str, Any] | None = None, searched: tuple[str, ...] = (),
                 params: dict[str, Any] | None = None) -> Tracker:
    """Start (or resume, given ``run_id``) a tracked run for ``cfg`` on rank 0.

    MLflow (if enabled) gets the params a reader compares (:func:`run_params`: a few
    config keys and the ``searched`` keys of a sweep, by short names) or ``params`` if
    given, the freetf tags (the whole dotted config as JSON in ``freetf.config``) and the
    resolved config as ``config.yaml``; ``parent_run_id`` nests the run under a parent.
    Raises :class:`TrackingError` if a backend cannot be used, before any training.
    """
    if rank != 0:
        return NullTracker()
    tracking = cfg.tracking
    run_name = run_name or tracking.mlflow.run_name
    params = run_params(cfg, searched) if params is None else _param_strings(params)
    all_tags = {MODEL_KIND: "free_transformer" if cfg.model.has_latent else "baseline",
                LATENT_BITS: str(cfg.model.latent_bits),
                CONFIG_TAG: config_tag(cfg, MAX_TAG_VALUE_CHARS)}
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
            sinks.append(_WandbSink(cfg, run_name, mlflow_run_id,
                                    _param_strings(cfg.to_dict())))
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


class SkipLoggedSteps:
    """A tracker that drops metric points at steps the run has already logged.

    A restarted worker resumes from the last checkpoint and recomputes the steps after
    it, which the failed worker had logged: MLflow cannot overwrite a point, so the
    replayed steps are not logged again (resume reproduces them; tests/test_train.py).
    """

    def __init__(self, tracker: Any, through_step: int) -> None:
        self.tracker, self.through_step = tracker, through_step

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.through_step:
            self.tracker.log_metrics(metrics, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracker, name)


def last_logged_step(tracker: Any) -> int:
    """The highest step the tracker's MLflow run holds a metric for (0 if none)."""
    from freetf.tracking.figures import metric_history

    if tracker.client is None:
        return 0
    # Every logged step carries train/steps_done (the loop logs it beside each point).
    history = metric_history(tracker.client, tracker.run_id, ("train/steps_done",))
    return max((int(row["step"]) for row in history), default=0)
