"""freetf.tracking.runs against recording fakes of MLflow's client: what each function
writes, where, and what it reads back from a run's tags and status."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException

from freetf.tracking import runs
from freetf.tracking.runs import (
    find_parent,
    log_files_to_run,
    log_sweep_analysis,
    log_verdict,
    run_artifact_text,
    run_outcome,
    run_verdict,
    set_outcome,
    set_verdict,
)

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """Any method call is recorded as (name, args, kwargs); ``fail`` maps a method name
    to the run ids it raises MlflowException for."""

    def __init__(self, fail: dict[str, set[str]] | None = None, **returns):
        self.calls: list[tuple] = []
        self.fail = fail or {}
        self.returns = returns

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if args and args[0] in self.fail.get(name, ()):
                raise MlflowException(f"no run {args[0]}")
            value = self.returns.get(name)
            return value(*args, **kwargs) if callable(value) else value
        return call


def test_a_runs_verdict_leaves_out_the_lifecycle_words_of_older_runs():
    assert run_verdict({}) == ""
    assert run_verdict({"freetf.verdict": "used"}) == "used"
    assert run_verdict({"freetf.verdict": "baseline"}) == "baseline"
    for old in ("failed", "interrupted", "unknown", "diverged"):
        assert run_verdict({"freetf.verdict": old}) == ""


@pytest.mark.parametrize("run_tags,status,outcome", [
    ({"freetf.outcome": "failed"}, "FINISHED", "failed"),
    ({"freetf.outcome": "", "freetf.verdict": "diverged"}, "FINISHED", "stopped"),
    ({"freetf.verdict": "interrupted"}, "FINISHED", "interrupted"),
    ({"freetf.verdict": "unknown"}, "FINISHED", "unknown"),
    ({"freetf.verdict": "failed"}, "FINISHED", "failed"),
    ({"freetf.verdict": "used", "freetf.stopped_early": "true"}, "FINISHED", "stopped"),
    ({"freetf.stopped_early": "false"}, "KILLED", "interrupted"),
    ({}, "FINISHED", "finished"),
    ({}, "FAILED", "failed"),
    ({}, "KILLED", "interrupted"),
    ({}, "RUNNING", "unknown"),
    ({}, "SCHEDULED", "unknown"),
])
def test_how_a_run_ended_from_its_tags_else_its_status(run_tags, status, outcome):
    assert run_outcome(run_tags, status) == outcome


def test_outcome_and_verdict_writes():
    client = Recorder()
    set_outcome(client, "r1", "stopped")
    set_verdict(client, "r1", "leaking", step=7.0)
    set_verdict(client, "r1", "baseline")
    assert client.calls == [
        ("set_tag", ("r1", "freetf.outcome", "stopped"), {}),
        ("set_tag", ("r1", "freetf.verdict", "leaking"), {}),
        ("log_metric", ("r1", "eval/verdict_code", 2), {"step": 7}),
        ("set_tag", ("r1", "freetf.verdict", "baseline"), {}),
        ("log_metric", ("r1", "eval/verdict_code", -1), {"step": 0})]
    assert type(client.calls[2][2]["step"]) is int
    tracker = Recorder()
    log_verdict(tracker, "used", step=3)
    log_verdict(tracker, "collapsed")
    assert tracker.calls == [
        ("set_tags", ({"freetf.verdict": "used"},), {}),
        ("log_metrics", ({"eval/verdict_code": 1},), {"step": 3}),
        ("set_tags", ({"freetf.verdict": "collapsed"},), {}),
        ("log_metrics", ({"eval/verdict_code": 0},), {"step": 0})]


def test_an_outcome_is_not_a_verdict_and_a_verdict_not_an_outcome():
    client = Recorder()
    with pytest.raises(ValueError) as err:
        set_outcome(client, "r1", "collapsed")
    assert str(err.value) == ("outcome 'collapsed' is not one of ('finished', 'stopped', "
                              "'failed', 'interrupted', 'unknown')")
    for word in ("finished", "stopped", "diverged"):
        with pytest.raises(ValueError) as err:
            set_verdict(client, "r1", word)
        assert str(err.value) == f"{word!r} is how a run ended, not a verdict: set_outcome"
    assert client.calls == []


def test_sweep_analysis_is_one_batch_per_run_and_the_steps_in_batches_of_1000(
        monkeypatch, caplog):
    monkeypatch.setattr(runs.time, "time", lambda: 12.3456)
    client = Recorder(fail={"log_batch": {"child2"}})
    steps = [("kappa_c", i / 2, i) for i in range(2001)]
    parent = {"metrics": {"kappa_c": 1}, "params": {"boundary": 0.5},
              "tags": {"freetf.regime": "x" * 6000}, "steps": steps}
    children = {"child1": {"metrics": {"eval/verdict_code": 2},
                           "tags": {"freetf.verdict": "leaking"}},
                "child2": {"tags": {"freetf.verdict": "used"}},
                "child3": {}}
    with caplog.at_level(logging.WARNING, logger="freetf.tracking.runs"):
        log_sweep_analysis(client, "parent", parent, children)
    calls = [(args[0], kwargs) for name, args, kwargs in client.calls]
    assert [run for run, _ in calls] == ["parent"] * 4 + ["child1", "child2", "child3"]
    first = calls[0][1]
    assert [(m.key, m.value, m.timestamp, m.step) for m in first["metrics"]] == [
        ("kappa_c", 1.0, 12345, 0)]
    assert [(p.key, p.value) for p in first["params"]] == [("boundary", "0.5")]
    assert [(t.key, t.value) for t in first["tags"]] == [("freetf.regime", "x" * 5000)]
    history = [kwargs["metrics"] for _, kwargs in calls[1:4]]
    assert [len(batch) for batch in history] == [1000, 1000, 1]
    assert [(m.key, m.value, m.timestamp, m.step) for m in history[2]] == [
        ("kappa_c", 1000.0, 12345, 2000)]
    assert [m.step for batch in history for m in batch] == list(range(2001))
    child1 = calls[4][1]
    assert [(m.key, m.value, m.step) for m in child1["metrics"]] == [
        ("eval/verdict_code", 2.0, 0)]
    assert child1["params"] == [] and calls[6][1] == {"metrics": [], "params": [], "tags": []}
    assert [(t.key, t.value) for t in child1["tags"]] == [("freetf.verdict", "leaking")]
    assert [r.getMessage() for r in caplog.records] == [
        "could not log the sweep analysis to run child2: no run child2"]


def test_a_parent_without_steps_is_one_batch():
    client = Recorder()
    log_sweep_analysis(client, "parent", {"metrics": {"a": 1}}, {})
    assert len(client.calls) == 1


def test_artifact_text_or_none(tmp_path):
    def download(run_id, path, folder):
        target = Path(folder) / path
        target.write_text(f"{run_id} {path}")
        return str(target)

    assert run_artifact_text(Recorder(download_artifacts=download), "r1", "a.json") \
        == "r1 a.json"
    assert run_artifact_text(Recorder(fail={"download_artifacts": {"r1"}}), "r1", "a") is None

    def unreadable(run_id, path, folder):
        return str(Path(folder) / "missing")

    assert run_artifact_text(Recorder(download_artifacts=unreadable), "r1", "a") is None


def test_files_go_under_the_artifact_path(tmp_path):
    client = Recorder()
    log_files_to_run(client, "r1", [tmp_path / "a.md", tmp_path / "b.csv"])
    log_files_to_run(client, "r1", [tmp_path / "c.png"], "figures")
    assert client.calls == [("log_artifact", ("r1", str(tmp_path / "a.md"), "report"), {}),
                            ("log_artifact", ("r1", str(tmp_path / "b.csv"), "report"), {}),
                            ("log_artifact", ("r1", str(tmp_path / "c.png"), "figures"), {})]


def test_the_parent_of_a_sweep_is_its_earliest_sweep_run():
    assert find_parent(Recorder(), "e", "s") is None  # no such experiment
    found = [SimpleNamespace(info=SimpleNamespace(start_time=t, run_id=f"r{t}"))
             for t in (30, 10, 20)]
    client = Recorder(get_experiment_by_name=SimpleNamespace(experiment_id="7"),
                      search_runs=found)
    assert find_parent(client, "e", "s").info.run_id == "r10"
    assert client.calls[0] == ("get_experiment_by_name", ("e",), {})
    assert client.calls[1] == ("search_runs", (["7"],), {
        "max_results": 10,
        "filter_string": "tags.`freetf.sweep` = 's' and tags.`freetf.role` = 'sweep'"})
    client = Recorder(get_experiment_by_name=SimpleNamespace(experiment_id="7"),
                      search_runs=[])
    assert find_parent(client, "e", "s") is None
