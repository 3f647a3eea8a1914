"""A sweep's MLflow bookkeeping: verdicts as numbers, the parent run's params and summary.

- The latent verdict of a trial is the tag ``freetf.verdict`` (a word, for filters such as
  ``tags.`freetf.verdict` = 'leaking'``) and the metric ``eval/verdict_code`` (a number,
  for compare plots to sort and colour by): :data:`VERDICT_CODES`.
- The parent run's params are the search space (``space.<short name>``), not the base
  config's values, which would read as the sweep's; its metrics count the trials per
  verdict (``sweep/trials_<verdict>``); its figures overlay what MLflow's charts cannot.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from freetf.tracking.params import format_value, searched_names
from freetf.tracking.sinks import MAX_TAG_VALUE_CHARS

logger = logging.getLogger(__name__)

VERDICT_TAG = "freetf.verdict"
VERDICT_METRIC = "eval/verdict_code"
# collapsed < used < leaking: the order of increasing use of Z.  "active" is the older
# name of "used".  Every other verdict (baseline, diverged, failed, interrupted,
# unknown) says nothing about the latent's use: NO_VERDICT_CODE.
VERDICT_CODES = {"collapsed": 0, "used": 1, "active": 1, "leaking": 2}
NO_VERDICT_CODE = -1
# The verdicts counted on the parent, under these names, even when no trial has them.
COUNTED_VERDICTS = ("collapsed", "used", "leaking")


def verdict_code(verdict: str | None) -> int:
    """``eval/verdict_code`` of a verdict: collapsed 0, used (active) 1, leaking 2, else -1."""
    return VERDICT_CODES.get(verdict or "", NO_VERDICT_CODE)


def log_verdict(tracker, verdict: str, step: int | None = None) -> None:
    """Tag a tracked run with ``verdict`` and log its code at ``step`` (0 if None)."""
    tracker.set_tags({VERDICT_TAG: verdict})
    tracker.log_metrics({VERDICT_METRIC: verdict_code(verdict)}, step=int(step or 0))


def set_verdict(client, run_id: str, verdict: str, step: int | None = None) -> None:
    """:func:`log_verdict` for a run that no tracker holds (the sweep driver's view)."""
    client.set_tag(run_id, VERDICT_TAG, verdict)
    client.log_metric(run_id, VERDICT_METRIC, verdict_code(verdict), step=int(step or 0))


def space_params(sweep) -> dict[str, str]:
    """The parent run's params: each searched key's domain under ``space.<name>``, with
    the name its trials log it under (``space.free_bits_bits = grid [0.015625, 1, 4]``),
    and the search settings."""
    names = searched_names([d.key for d in sweep.space])
    params = {}
    for dim in sweep.space:
        values = ", ".join(format_value(v) for v in dim.values)
        params[f"space.{names[dim.key]}"] = f"{dim.kind} [{values}]"
    params.update({"sweep.method": sweep.search.method, "sweep.metric": sweep.search.metric,
                   "sweep.trials": str(sweep.expected_trials),
                   "sweep.keys": ",".join(d.key for d in sweep.space)})
    if sweep.search.method != "grid":
        params["sweep.num_samples"] = str(sweep.search.num_samples)
    return params


def verdict_counts(runs) -> dict[str, float]:
    """``sweep/trials`` and ``sweep/trials_<verdict>`` of a :func:`collect_runs` frame
    (``active`` counted as ``used``), and ``sweep/trials_stopped_early``."""
    verdicts = [{"active": "used"}.get(v, v) for v in runs["verdict"]] if len(runs) else []
    counts: dict[str, float] = {"sweep/trials": float(len(verdicts))}
    for verdict in dict.fromkeys([*COUNTED_VERDICTS, *verdicts]):
        counts[f"sweep/trials_{verdict}"] = float(verdicts.count(verdict))
    if len(runs):
        counts["sweep/trials_stopped_early"] = float(runs["stopped_early"].sum())
    return counts


def log_sweep_summary(tracker, client, runs, out_dir: str | Path | None = None) -> dict:
    """Log the parent run's summary: verdict counts as metrics, and the sweep figures
    (:func:`freetf.tracking.figures.plot_kl_vs_kappa`, :func:`plot_sweep_curves`) under
    ``report/``.  Writes the figures to ``out_dir`` (a temporary folder if None) and
    returns their paths."""
    from freetf.tracking.figures import plot_kl_vs_kappa, plot_sweep_curves

    tracker.log_metrics(verdict_counts(runs), step=0)
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        try:
            paths["kl_vs_kappa"] = plot_kl_vs_kappa(runs, out / "kl_vs_kappa.png")
            paths["trial_curves"] = plot_sweep_curves(client, runs, out / "trial_curves.png")
        except Exception as err:  # a figure must never fail the sweep
            logger.warning("sweep figures failed: %s", err)
        for path in paths.values():
            tracker.log_artifact(path, "report")
    return paths if out_dir is not None else {}


def log_sweep_analysis(client, parent_run_id: str, parent: dict[str, dict[str, Any]],
                       children: dict[str, dict[str, dict[str, Any]]]) -> None:
    """A sweep's analysis into MLflow: ``parent`` = {"metrics", "params", "tags"} on the
    sweep's parent run (the boundaries: sortable in the runs table), ``children`` =
    {run_id: {"metrics", "tags"}} on its trial runs (their verdicts).  Metrics are
    logged at step 0, but the parent's optional ``"steps"``: (key, value, step) triples,
    e.g. the boundaries at every evaluation; a failed write is logged, never raised."""
    now = int(time.time() * 1000)

    def entities(values: dict[str, dict[str, Any]]) -> dict[str, list]:
        return {"metrics": [Metric(k, float(v), now, 0)
                            for k, v in values.get("metrics", {}).items()],
                "params": [Param(k, str(v)) for k, v in values.get("params", {}).items()],
                "tags": [RunTag(k, str(v)[:MAX_TAG_VALUE_CHARS])
                         for k, v in values.get("tags", {}).items()]}
    steps = [Metric(k, float(v), now, int(step)) for k, v, step in parent.get("steps", [])]
    for run_id, values in [(parent_run_id, parent), *children.items()]:
        try:
            client.log_batch(run_id, **entities(values))
            if run_id == parent_run_id and steps:  # metrics with a history (kappa(t))
                for start in range(0, len(steps), 1000):
                    client.log_batch(run_id, metrics=steps[start:start + 1000])
        except MlflowException as err:
            logger.warning("could not log the sweep analysis to run %s: %s", run_id, err)


def run_artifact_text(client, run_id: str, path: str) -> str | None:
    """The text of artifact ``path`` of run ``run_id``, or None if it cannot be read."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run_id, path, tmp)).read_text()
        except (MlflowException, OSError) as err:
            logger.info("artifact %s of run %s not readable: %s", path, run_id, err)
            return None


def log_files_to_run(client, run_id: str, paths, artifact_path: str = "report") -> None:
    """Files as artifacts of an existing run (a sweep's parent), its status untouched."""
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
