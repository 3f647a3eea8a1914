"""A sweep's runs in MLflow, from the driver: the parent's params (the search space, not
the base config's values, which would read as the sweep's), the trials that ended, and
the runs that Tune left open (stopped, failed or cut off), closed."""

from __future__ import annotations

import json

from freetf.sweeps.trainable import (
    TAG_KEY,
    TrialContext,
    child_runs,
    trial_key,
)
from freetf.tracking import tags
from freetf.tracking.params import format_value, searched_names


def ended_trials(results, keys: tuple[str, ...], ended_in_mlflow: set[str]) -> int:
    """Trials that ended: failed, done by Tune's account, or ended by MLflow's."""
    def ended(result) -> bool:
        if result.error is not None or (result.metrics or {}).get("done"):
            return True
        return bool(result.config) and \
            trial_key({k: result.config.get(k) for k in keys}) in ended_in_mlflow
    return sum(1 for result in results if ended(result))


def run_ended(run) -> bool:
    """A trial's MLflow run says it ended: FINISHED, or stopped early by ASHA / the stopper."""
    return run.info.status == "FINISHED" or run.data.tags.get(tags.STOPPED_EARLY) == "true"


def ended_trial_keys(client, parent_run_id: str) -> set[str]:
    """Trial keys whose MLflow run says they ended."""
    return {run.data.tags.get(TAG_KEY) for run in child_runs(client, parent_run_id)
            if run_ended(run)}


def close_open_runs(client, context: TrialContext, results, interrupted: bool) -> None:
    """End the child runs that Tune left open: trials stopped before closing their run,
    and trials that Ctrl-C cut off (KILLED, outcome ``interrupted``: --resume reattaches
    them).  A trial's own except-clause may have marked a cut-off run FAILED: Tune
    knows better, so only a trial that Tune saw fail stays FAILED."""
    from freetf.tracking import run_verdict, set_outcome, set_verdict

    last = {}
    for result in results or []:
        if result.config:
            last[trial_key({k: result.config.get(k) for k in context.keys})] = result
    for run in child_runs(client, context.parent_run_id):
        run_tags = run.data.tags
        if run_ended(run):
            continue
        result = last.get(run_tags.get(TAG_KEY))
        metrics = dict(result.metrics or {}) if result is not None else {}
        sampled = json.loads(run_tags.get(tags.SAMPLED, "{}"))
        step = metrics.get("step", run.data.metrics.get("train/steps_done", 0))
        run_id = run.info.run_id
        if step >= context.max_steps(sampled):  # trained; stopped before closing its run
            if not run_verdict(run_tags) and metrics.get("eval/verdict"):
                set_verdict(client, run_id, metrics["eval/verdict"], step)
            set_outcome(client, run_id, "finished")
            client.set_terminated(run_id, "FINISHED")
        elif result is not None and result.error is not None:
            if run.info.status == "RUNNING":
                set_outcome(client, run_id, "failed")
                client.set_terminated(run_id, "FAILED")
        else:
            set_outcome(client, run_id, "interrupted" if interrupted else "unknown")
            client.set_terminated(run_id, "KILLED")


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
