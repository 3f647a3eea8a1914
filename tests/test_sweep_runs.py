"""A sweep's runs in MLflow from the driver (freetf/sweeps/runs.py), against a recording
stand-in for MLflow's client; tests/test_tracking_sweep_runs.py runs them on a real store."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from freetf.sweeps.runs import (
    close_open_runs,
    ended_trial_keys,
    ended_trials,
    run_ended,
    space_params,
)
from freetf.sweeps.spec import load_sweep
from freetf.sweeps.trainable import trial_key
from freetf.tracking import verdict_code

pytestmark = pytest.mark.timeout(60)

PARENT, EXPERIMENT = "parent", "7"
KEYS = ("training.seed",)


def _run(run_id: str, seed: int | None, status: str = "RUNNING", metrics=None, **extra_tags):
    tags = {"mlflow.parentRunId": PARENT, **extra_tags}
    if seed is not None:
        sampled = {"training.seed": seed}
        tags.update({"freetf.trial_key": trial_key(sampled),
                     "freetf.sampled": json.dumps(sampled)})
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status),
                           data=SimpleNamespace(tags=tags, metrics=metrics or {}))


class Client:
    """MLflow's client as the sweep's driver uses it: the parent's children, and what is
    written to them, in order."""

    def __init__(self, runs) -> None:
        self.runs = runs
        self.calls: list[tuple] = []

    def get_run(self, run_id):
        assert run_id == PARENT
        return SimpleNamespace(info=SimpleNamespace(experiment_id=EXPERIMENT))

    def search_runs(self, experiment_ids, filter_string, max_results):
        assert experiment_ids == [EXPERIMENT]
        assert filter_string == f"tags.`mlflow.parentRunId` = '{PARENT}'"
        return list(self.runs)

    def set_tag(self, run_id, key, value):
        self.calls.append(("tag", run_id, key, value))

    def log_metric(self, run_id, key, value, step):
        self.calls.append(("metric", run_id, key, value, step))

    def set_terminated(self, run_id, status):
        self.calls.append(("end", run_id, status))


def _result(seed, step=None, error=None, verdict=None, config=True):
    metrics = {**({"step": step} if step is not None else {}),
               **({"eval/verdict": verdict} if verdict else {})}
    return SimpleNamespace(config={"training.seed": seed} if config else {}, error=error,
                           metrics=metrics or None)


def _context(max_steps: int = 100):
    # max_steps of the trial's sampled values, as the driver's TrialContext gives it
    return SimpleNamespace(parent_run_id=PARENT, keys=KEYS,
                           max_steps=lambda sampled: max_steps + sampled.get("training.seed", 0))


def test_a_run_has_ended_when_finished_or_stopped_early():
    assert run_ended(_run("a", 0, "FINISHED"))
    assert run_ended(_run("a", 0, "KILLED", **{"freetf.stopped_early": "true"}))
    assert not run_ended(_run("a", 0, "RUNNING", **{"freetf.stopped_early": "false"}))
    assert not run_ended(_run("a", 0, "FAILED"))
    client = Client([_run("a", 0, "FINISHED"), _run("b", 1, "RUNNING"),
                     _run("c", 2, "KILLED", **{"freetf.stopped_early": "true"})])
    assert ended_trial_keys(client, PARENT) == {trial_key({"training.seed": 0}),
                                                trial_key({"training.seed": 2})}


def test_ended_trials_counts_each_ended_one_once():
    results = [_result(0, step=3), _result(1, step=3), _result(2, step=3, config=False)]
    mlflow_ended = {trial_key({"training.seed": 1}), trial_key({"training.seed": None})}
    assert ended_trials(results, KEYS, mlflow_ended) == 1  # a result without config: not it
    results.append(SimpleNamespace(config={}, error=RuntimeError("x"), metrics=None))
    assert ended_trials(results, KEYS, set()) == 1


def test_a_trained_run_left_open_is_finished_with_its_last_verdict():
    """Trained to its own max_steps (100 + seed here): FINISHED, with the verdict of its last
    report unless the run has one; the step falls back to the run's train/steps_done."""
    runs = [_run("r0", 0), _run("r1", 1, **{"freetf.verdict": "collapsed"}),
            _run("r2", 2, metrics={"train/steps_done": 102}),
            _run("r3", 3, metrics={"train/steps_done": 102})]
    results = [_result(0, step=100, verdict="used"), _result(1, step=101, verdict="used")]
    client = Client(runs)
    close_open_runs(client, _context(), results, interrupted=False)
    assert client.calls == [
        ("tag", "r0", "freetf.verdict", "used"),
        ("metric", "r0", "eval/verdict_code", verdict_code("used"), 100),
        ("tag", "r0", "freetf.outcome", "finished"), ("end", "r0", "FINISHED"),
        ("tag", "r1", "freetf.outcome", "finished"), ("end", "r1", "FINISHED"),
        ("tag", "r2", "freetf.outcome", "finished"), ("end", "r2", "FINISHED"),
        ("tag", "r3", "freetf.outcome", "unknown"), ("end", "r3", "KILLED")]


def test_a_run_cut_off_is_killed_and_a_failed_one_stays_failed():
    runs = [_run("done", 0, "FINISHED"), _run("asha", 1, **{"freetf.stopped_early": "true"}),
            _run("cut", 2), _run("failed", 3), _run("marked", 4, "FAILED"),
            _run("unknown", 5), _run("untagged", None)]
    error = RuntimeError("boom")
    results = [_result(0, step=3), _result(1, step=3), _result(2, step=50),
               _result(2, step=101, config=False), _result(3, step=50, error=error),
               _result(4, step=50, error=error)]
    client = Client(runs)
    close_open_runs(client, _context(), results, interrupted=True)
    assert client.calls == [
        ("tag", "cut", "freetf.outcome", "interrupted"), ("end", "cut", "KILLED"),
        ("tag", "failed", "freetf.outcome", "failed"), ("end", "failed", "FAILED"),
        ("tag", "unknown", "freetf.outcome", "interrupted"), ("end", "unknown", "KILLED"),
        ("tag", "untagged", "freetf.outcome", "interrupted"), ("end", "untagged", "KILLED")]


def test_the_last_result_of_a_trial_is_the_one_read():
    client = Client([_run("r0", 0)])
    results = [_result(0, step=100, verdict="used"), _result(0, step=60)]
    close_open_runs(client, _context(), results, interrupted=False)
    assert client.calls == [("tag", "r0", "freetf.outcome", "unknown"), ("end", "r0", "KILLED")]
    client = Client([_run("r0", 0)])  # one step to train, none reported: not trained
    close_open_runs(client, _context(max_steps=1), [], interrupted=False)
    assert client.calls == [("tag", "r0", "freetf.outcome", "unknown"), ("end", "r0", "KILLED")]
    client = Client([_run("r0", 0)])
    close_open_runs(client, _context(), None, interrupted=True)
    assert client.calls == [("tag", "r0", "freetf.outcome", "interrupted"),
                            ("end", "r0", "KILLED")]


def test_a_random_search_records_its_number_of_samples():
    sweep = load_sweep("search_kl_smoke", [
        "search.method=random", "search.num_samples=3", "search.metric=eval/kl_bits",
        "space.training.free_bits_bits={loguniform: [0.015625, 4.0]}"])
    assert space_params(sweep) == {
        "space.free_bits_bits": "loguniform [0.015625, 4]", "space.kl_weight": "grid [1]",
        "sweep.method": "random", "sweep.metric": "eval/kl_bits", "sweep.trials": "3",
        "sweep.keys": "training.free_bits_bits,training.kl_weight", "sweep.num_samples": "3"}
