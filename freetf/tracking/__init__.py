"""Experiment tracking: MLflow runs, with optional TensorBoard and W&B mirrors.

This is the only package in freetf that imports MLflow (TensorBoard and W&B are imported
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

Modules: :mod:`~freetf.tracking.store` (URIs, client, experiments),
:mod:`~freetf.tracking.sinks` (the MLflow, TensorBoard and W&B backends),
:mod:`~freetf.tracking.tracker` (:class:`Tracker`, :func:`make_tracker`),
:mod:`~freetf.tracking.params` (the params a run logs, the config tag),
:mod:`~freetf.tracking.runs` (runs no tracker holds: verdict tags and codes, batches,
artifacts, a sweep's parent), :mod:`~freetf.tracking.tags` (every tag name freetf writes)
and :mod:`~freetf.tracking.figures` (overlays of logged metrics).  What is particular to
sweeps lives with them (:mod:`freetf.sweeps`, :mod:`freetf.results`).
"""

from __future__ import annotations

import mlflow  # noqa: F401 - tests patch freetf.tracking.mlflow.MlflowClient

from freetf.tracking.figures import (
    CURVE_METRICS,
    metric_history,
    plot_training_curves,
)
from freetf.tracking.params import CONFIG_TAG, run_config, run_params
from freetf.tracking.runs import (
    OUTCOME_TAG,
    OUTCOMES,
    VERDICT_CODES,
    VERDICT_METRIC,
    VERDICT_TAG,
    find_parent,
    log_files_to_run,
    log_sweep_analysis,
    log_verdict,
    run_artifact_text,
    run_outcome,
    run_verdict,
    set_outcome,
    set_verdict,
    verdict_code,
)
from freetf.tracking.sinks import (
    MAX_BUFFERED_METRICS,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE_CHARS,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE_CHARS,
    TENSORBOARD_ALIASES,
    WANDB_ALIASES,
)
from freetf.tracking.store import (
    EXPERIMENT_KIND_TAG,
    HTTP_CLIENT_DEFAULTS,
    MODEL_TRAINING_KIND,
    TrackingError,
    check_store_shared_by,
    check_tracking_server,
    end_active_run,
    mlflow_client,
    preload_store_modules,
    resolve_tracking_uri,
    runs_column,
    runs_page_url,
    save_runs_view,
)
from freetf.tracking.tracker import (
    RUN_STATUSES,
    NullTracker,
    SkipLoggedSteps,
    Tracker,
    _param_strings,
    last_logged_step,
    make_tracker,
)

__all__ = [
    "CONFIG_TAG", "CURVE_METRICS", "EXPERIMENT_KIND_TAG", "HTTP_CLIENT_DEFAULTS",
    "MAX_BUFFERED_METRICS", "MAX_METRICS_PER_BATCH", "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE_CHARS", "MAX_TAG_VALUE_CHARS", "MODEL_TRAINING_KIND", "OUTCOMES",
    "OUTCOME_TAG", "RUN_STATUSES",
    "TENSORBOARD_ALIASES", "VERDICT_CODES", "VERDICT_METRIC", "VERDICT_TAG", "WANDB_ALIASES",
    "NullTracker", "SkipLoggedSteps", "Tracker", "TrackingError", "_param_strings",
    "check_store_shared_by", "check_tracking_server", "end_active_run", "last_logged_step",
    "find_parent", "log_files_to_run", "log_sweep_analysis", "log_verdict",
    "make_tracker", "metric_history", "mlflow_client", "preload_store_modules",
    "run_artifact_text", "run_outcome", "run_verdict", "set_outcome",
    "plot_training_curves", "resolve_tracking_uri",
    "run_config", "run_params", "runs_column", "runs_page_url", "save_runs_view",
    "set_verdict", "verdict_code",
]
