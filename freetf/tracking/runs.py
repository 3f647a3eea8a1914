"""Writing to runs that exist (no tracker holds them) and reading their artifacts:
verdicts as tags and numbers, batches of values, files.

The latent verdict of a run is the tag ``freetf.verdict`` (a word, for filters such as
``tags.`freetf.verdict` = 'leaking'``) and the metric ``eval/verdict_code`` (a number, for
compare plots to sort and colour by): :data:`VERDICT_CODES`.  How a sweep's trial ended is
another tag, ``freetf.outcome`` (:data:`OUTCOMES`): a trial that failed or was cut off
has an outcome and no verdict.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from freetf.tracking import tags
from freetf.tracking.sinks import MAX_TAG_VALUE_CHARS

logger = logging.getLogger(__name__)

VERDICT_TAG, VERDICT_METRIC, OUTCOME_TAG = tags.VERDICT, tags.VERDICT_METRIC, tags.OUTCOME
# collapsed < used < leaking: the order of increasing use of Z.  "active" is the older
# name of "used".  The other verdicts (baseline, unconverged) say nothing about the
# latent's use: NO_VERDICT_CODE.
VERDICT_CODES = {"collapsed": 0, "used": 1, "active": 1, "leaking": 2}
NO_VERDICT_CODE = -1
# How a sweep trial ended: ran to its last step; stopped early by the stopper or ASHA
# (tag freetf.stop_reason says which); failed (an error, retries spent); cut off by
# Ctrl-C or SIGTERM (--resume continues it); or the driver could not tell.
OUTCOMES = ("finished", "stopped", "failed", "interrupted", "unknown")
# Sweeps before the outcome tag wrote these into freetf.verdict (diverged: the stopper).
_OLD_OUTCOME_VERDICTS = {"failed": "failed", "interrupted": "interrupted",
                         "unknown": "unknown", "diverged": "stopped"}


def verdict_code(verdict: str | None) -> int:
    """``eval/verdict_code`` of a verdict: collapsed 0, used (active) 1, leaking 2, else -1."""
    return VERDICT_CODES.get(verdict or "", NO_VERDICT_CODE)


def run_verdict(run_tags: dict[str, str]) -> str:
    """A run's latent verdict, "" if it has none (older runs' lifecycle words dropped)."""
    verdict = run_tags.get(VERDICT_TAG, "")
    return "" if verdict in _OLD_OUTCOME_VERDICTS else verdict


def run_outcome(run_tags: dict[str, str], status: str) -> str:
    """How a trial run ended (:data:`OUTCOMES`): its tag, else what an older run's verdict
    tag or its MLflow status says (RUNNING: ``unknown``)."""
    outcome = run_tags.get(OUTCOME_TAG) or _OLD_OUTCOME_VERDICTS.get(
        run_tags.get(VERDICT_TAG, ""))
    if outcome:
        return outcome
    if run_tags.get(tags.STOPPED_EARLY) == "true":
        return "stopped"
    return {"FINISHED": "finished", "FAILED": "failed", "KILLED": "interrupted"}.get(
        status, "unknown")


def set_outcome(client, run_id: str, outcome: str) -> None:
    """Tag a run with how it ended (:data:`OUTCOMES`)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    client.set_tag(run_id, OUTCOME_TAG, outcome)


def log_verdict(tracker, verdict: str, step: int | None = None) -> None:
    """Tag a tracked run with ``verdict`` and log its code at ``step`` (0 if None)."""
    _check_verdict(verdict)
    tracker.set_tags({VERDICT_TAG: verdict})
    tracker.log_metrics({VERDICT_METRIC: verdict_code(verdict)}, step=int(step or 0))


def set_verdict(client, run_id: str, verdict: str, step: int | None = None) -> None:
    """:func:`log_verdict` for a run that no tracker holds (the sweep driver's view)."""
    _check_verdict(verdict)
    client.set_tag(run_id, VERDICT_TAG, verdict)
    client.log_metric(run_id, VERDICT_METRIC, verdict_code(verdict), step=int(step or 0))


def _check_verdict(verdict: str) -> None:
    if verdict in OUTCOMES or verdict in _OLD_OUTCOME_VERDICTS:
        raise ValueError(f"{verdict!r} is how a run ended, not a verdict: set_outcome")


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


def find_parent(client, experiment: str, name: str):
    """The parent run of sweep ``name`` in ``experiment`` (its first, if resumed runs made
    several), or None."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=10,
                              filter_string=f"tags.`{tags.SWEEP}` = '{name}' "
                                            f"and tags.`{tags.ROLE}` = 'sweep'")
    return min(runs, key=lambda r: r.info.start_time) if runs else None
