"""Tests for freetf.tracking.runs, freetf.tracking.figures and a sweep's summary
(freetf.results.summary, freetf.results.sweep_figures, freetf.sweeps.runs.space_params):
verdict codes, the sweep parent's params and summary, the overlay figures (real sqlite
MLflow store, no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from freetf.config import load_config
from freetf.results.report import runs_frame
from freetf.results.summary import log_sweep_summary, save_sweep_view, verdict_counts
from freetf.results.sweep_figures import kl_vs_kappa_figure, sweep_curves_figure
from freetf.sweeps.runs import close_open_runs, space_params
from freetf.sweeps.spec import load_sweep
from freetf.tracking import (
    OUTCOMES,
    VERDICT_METRIC,
    log_files_to_run,
    log_verdict,
    make_tracker,
    set_outcome,
    set_verdict,
    verdict_code,
)
from freetf.tracking.figures import training_curves_figure

pytestmark = pytest.mark.timeout(120)

CONFIGS = Path(__file__).resolve().parent.parent / "freetf" / "configs"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _tracker(uri: str, **kwargs):
    cfg = load_config(overrides={"tracking.mlflow.tracking_uri": uri,
                                 "tracking.mlflow.experiment": "unit"})
    return make_tracker(cfg, **kwargs)


def test_verdict_codes_order_the_use_of_z() -> None:
    assert [verdict_code(v) for v in ("collapsed", "used", "active", "leaking")] == [0, 1, 1, 2]
    for other in ("baseline", "failed", "diverged", "interrupted", "unknown", "", None):
        assert verdict_code(other) == -1


def test_verdict_is_a_tag_and_a_metric(sqlite_uri: str) -> None:
    tracker = _tracker(sqlite_uri)
    log_verdict(tracker, "leaking", step=40)
    tracker.finish()
    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.tags["freetf.verdict"] == "leaking"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id,
                                                                  VERDICT_METRIC)] == [(40, 2)]
    set_verdict(client, tracker.run_id, "collapsed", 50)  # the driver's correction
    run = client.get_run(tracker.run_id)
    assert run.data.tags["freetf.verdict"] == "collapsed"
    assert run.data.metrics[VERDICT_METRIC] == 0


def test_how_a_run_ended_is_a_tag_of_its_own_not_a_verdict(sqlite_uri: str) -> None:
    """freetf.verdict holds what the run says about Z; freetf.outcome how it ended."""
    tracker = _tracker(sqlite_uri)
    client = MlflowClient(sqlite_uri)
    for word in ("failed", "interrupted", "unknown", "stopped", "diverged", "finished"):
        with pytest.raises(ValueError, match="set_outcome"):
            set_verdict(client, tracker.run_id, word)
        with pytest.raises(ValueError, match="set_outcome"):
            log_verdict(tracker, word)
    with pytest.raises(ValueError, match="not one of"):
        set_outcome(client, tracker.run_id, "collapsed")
    for outcome in OUTCOMES:
        set_outcome(client, tracker.run_id, outcome)
        assert client.get_run(tracker.run_id).data.tags["freetf.outcome"] == outcome
    tracker.finish()
    assert "freetf.verdict" not in client.get_run(tracker.run_id).data.tags


def test_the_runs_table_reads_verdict_and_outcome_apart(sqlite_uri: str) -> None:
    """Runs of today and runs that wrote the lifecycle word into freetf.verdict."""
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("e")
    cases = {  # name: (tags, status, expected verdict, expected outcome)
        "new failed": ({"freetf.outcome": "failed"}, "FAILED", "", "failed"),
        "new stopped": ({"freetf.outcome": "stopped", "freetf.stopped_early": "true",
                         "freetf.verdict": "collapsed"}, "KILLED", "collapsed", "stopped"),
        "old failed": ({"freetf.verdict": "failed"}, "FAILED", "", "failed"),
        "old diverged": ({"freetf.verdict": "diverged", "freetf.stopped_early": "true"},
                         "KILLED", "", "stopped"),
        "old interrupted": ({"freetf.verdict": "interrupted"}, "KILLED", "", "interrupted"),
        "old finished": ({"freetf.verdict": "active"}, "FINISHED", "active", "finished"),
        "old cut, no tag": ({}, "KILLED", "", "interrupted"),
        "old stopped, no tag": ({"freetf.stopped_early": "true"}, "KILLED", "", "stopped"),
        "running": ({}, "RUNNING", "", "unknown"),
    }
    for name, (run_tags, status, _, _) in cases.items():
        run = client.create_run(experiment, run_name=name, tags=run_tags)
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
    frame = runs_frame(client.search_runs([experiment])).set_index("run_name")
    for name, (_, _, verdict, outcome) in cases.items():
        assert (frame.loc[name, "verdict"], frame.loc[name, "outcome"]) == (verdict, outcome), \
            name


def test_closing_the_runs_tune_left_open_writes_outcomes_not_verdicts(sqlite_uri) -> None:
    """A trained trial keeps its evaluation's verdict; a failed or cut-off one gets an
    outcome and no verdict (they were tagged freetf.verdict = failed / interrupted)."""
    from types import SimpleNamespace

    from freetf.sweeps.trainable import trial_key

    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("e")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    keys = ("training.seed",)
    context = SimpleNamespace(parent_run_id=parent, keys=keys, max_steps=lambda sampled: 100)
    results, run_ids = [], {}
    for seed, step, error in ((0, 100, None), (1, 40, RuntimeError("boom")), (2, 40, None)):
        sampled = {"training.seed": seed}
        run_ids[seed] = client.create_run(experiment, tags={
            "mlflow.parentRunId": parent, "freetf.trial_key": trial_key(sampled),
            "freetf.sampled": json.dumps(sampled)}).info.run_id
        results.append(SimpleNamespace(config=sampled, error=error,
                                       metrics={"step": step, "eval/verdict": "used"}))
    close_open_runs(client, context, results, interrupted=True)
    ended = {seed: client.get_run(run_id) for seed, run_id in run_ids.items()}
    assert [(r.info.status, r.data.tags.get("freetf.outcome"), r.data.tags.get("freetf.verdict"))
            for r in ended.values()] == [("FINISHED", "finished", "used"),
                                         ("FAILED", "failed", None),
                                         ("KILLED", "interrupted", None)]


def test_artifacts_reach_an_ended_run_and_leave_its_status(sqlite_uri: str,
                                                          tmp_path: Path) -> None:
    tracker = _tracker(sqlite_uri)
    tracker.finish("KILLED")
    files = [tmp_path / "a.md", tmp_path / "b.csv"]
    for i, path in enumerate(files):
        path.write_text(f"file {i}")
    client = MlflowClient(sqlite_uri)
    log_files_to_run(client, tracker.run_id, files, "report")
    assert [a.path for a in client.list_artifacts(tracker.run_id, "report")] == [
        "report/a.md", "report/b.csv"]
    assert client.get_run(tracker.run_id).info.status == "KILLED"


def test_parent_params_are_the_search_space() -> None:
    sweep = load_sweep(CONFIGS / "search_kl_smoke.yaml", [
        "search.method=grid", "space.training.free_bits_bits={grid: [0.015625, 1.0, 4.0]}",
        "space.training.kl_annealing.type={grid: [constant, linear]}"])
    assert space_params(sweep) == {
        "space.free_bits_bits": "grid [0.015625, 1, 4]", "space.kl_weight": "grid [1]",
        "space.kl_annealing": "grid [constant, linear]",
        "sweep.method": "grid", "sweep.metric": "eval/ce_prior_nats", "sweep.trials": "6",
        "sweep.keys": "training.free_bits_bits,training.kl_weight,training.kl_annealing.type"}


def _frame(rows: list[dict]) -> pd.DataFrame:
    base = {"stopped_early": False, "eval/kl_bits": 1.0, "eval/ce_gap_nats": 0.1,
            "eval/ce_prior_nats": 1.5, "free_bits_bits": 1.0, "run_name": "s/x"}
    return pd.DataFrame([{**base, **row} for row in rows])


def test_verdict_counts() -> None:
    runs = _frame([{"verdict": "collapsed", "stopped_early": True}, {"verdict": "active"},
                   {"verdict": "used"}, {"verdict": "", "outcome": "failed"}])
    assert verdict_counts(runs) == {
        "sweep/trials": 4.0, "sweep/trials_collapsed": 1.0, "sweep/trials_used": 2.0,
        "sweep/trials_leaking": 0.0, "sweep/trials_failed": 1.0,
        "sweep/trials_stopped_early": 1.0}


def _history(kappa_bits: float, steps: int = 4) -> list[dict[str, float]]:
    return [{"step": s, "train/loss": 3.0 - s * 0.1, "train/kl_bits": 0.5 * s,
             "train/free_bits_bits": kappa_bits, "eval/ce_prior_nats": 2.0 - 0.1 * s,
             "eval/ce_posterior_nats": 1.0 - 0.2 * s} for s in range(1, steps + 1)]


def _line(ax, label: str):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_training_curves_overlay_kl_on_kappa_and_ce_prior_on_posterior() -> None:
    fig = training_curves_figure(_history(kappa_bits=4.0))
    _, ax_kl, ax_ce = fig.axes[:3]
    assert list(_line(ax_kl, "raw KL").get_ydata()) == [0.5, 1.0, 1.5, 2.0]
    assert list(_line(ax_kl, "free bits kappa").get_ydata()) == [4.0] * 4
    assert list(_line(ax_ce, "CE, Z from prior").get_ydata()) == pytest.approx([1.9, 1.8, 1.7,
                                                                                1.6])
    assert list(_line(ax_ce, "CE, Z from posterior").get_ydata()) == pytest.approx(
        [0.8, 0.6, 0.4, 0.2])
    older = [{"step": 1, "train/kl_nats": math.log(2), "train/free_bits_nats": 2 * math.log(2)}]
    _, ax_kl, _ = training_curves_figure(older).axes[:3]  # runs that logged nats only
    assert list(_line(ax_kl, "raw KL").get_ydata()) == pytest.approx([1.0])
    assert list(_line(ax_kl, "free bits kappa").get_ydata()) == pytest.approx([2.0])


def test_kl_vs_kappa_places_each_trial() -> None:
    runs = _frame([{"verdict": "collapsed", "free_bits_bits": 0.25, "eval/kl_bits": 0.01},
                   {"verdict": "leaking", "free_bits_bits": 4.0, "eval/kl_bits": 6.0,
                    "eval/ce_gap_nats": 0.9},
                   {"verdict": "baseline", "free_bits_bits": math.nan}])
    ax_kl, ax_gap = kl_vs_kappa_figure(runs).axes[:2]
    points = {tuple(p) for c in ax_kl.collections for p in c.get_offsets().tolist()}
    assert points == {(0.25, 0.01), (4.0, 6.0)}  # the baseline has no kappa
    gaps = {tuple(p) for c in ax_gap.collections for p in c.get_offsets().tolist()}
    assert (4.0, 0.9) in gaps
    assert list(_line(ax_kl, "KL = kappa").get_ydata()) == [0.25, 4.0]


def test_sweep_summary_on_the_parent(sqlite_uri: str, tmp_path: Path) -> None:
    parent = _tracker(sqlite_uri, run_name="sweep")
    children = {}
    for verdict, kappa in (("collapsed", 0.25), ("leaking", 4.0), ("baseline", None)):
        child = _tracker(sqlite_uri, parent_run_id=parent.run_id)
        for row in _history(kappa or 0.0):
            child.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        child.finish()
        children[verdict] = child.run_id
    runs = _frame([{"run_id": run_id, "verdict": verdict, "run_name": f"s/{verdict}"}
                   for verdict, run_id in children.items()])
    runs.loc[runs["verdict"] == "baseline", "eval/ce_prior_nats"] = 1.25
    client = MlflowClient(sqlite_uri)
    fig = sweep_curves_figure(client, runs)
    ce_axes = [ax for ax in fig.axes if ax.get_ylabel() == "nats per token"]
    assert len(ce_axes) == 2  # one row per latent trial, the baseline is a line in each
    for ax in ce_axes:
        assert list(_line(ax, "baseline CE").get_ydata()) == [1.25, 1.25]
        assert list(_line(ax, "CE, Z from prior").get_ydata()) == pytest.approx(
            [1.9, 1.8, 1.7, 1.6])

    paths = log_sweep_summary(parent, client, runs, tmp_path / "report")
    parent.finish()
    assert {p.name for p in paths.values()} == {"kl_vs_kappa.png", "trial_curves.png"}
    assert all(p.read_bytes()[:8] == PNG for p in paths.values())
    run = client.get_run(parent.run_id)
    assert run.data.metrics["sweep/trials"] == 3
    assert run.data.metrics["sweep/trials_collapsed"] == 1
    assert run.data.metrics["sweep/trials_used"] == 0
    assert run.data.metrics["sweep/trials_baseline"] == 1
    logged = {Path(a.path).name for a in client.list_artifacts(parent.run_id, "report")}
    assert logged == {"kl_vs_kappa.png", "trial_curves.png"}


def test_a_sweeps_view_shows_its_trials_with_the_compared_columns(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("e")
    view = save_sweep_view(client, experiment, "search_kl", ["training.kl_weight"])
    assert view == save_sweep_view(client, experiment, "search_kl",  # the boundary search's
                                   ["training.free_bits_bits", "training.seed"])
    assert view != save_sweep_view(client, experiment, "other", ["training.kl_weight"])
    envelope = json.loads(client.get_experiment(experiment).tags[
        f"mlflow.sharedViewState.{view}"])
    state = json.loads(envelope["state"])  # the second save replaced the first
    assert envelope["name"] == "search_kl: trials"
    assert state["searchFilter"] == \
        "tags.`freetf.role` = 'trial' and tags.`freetf.sweep` = 'search_kl'"
    assert state["groupBy"] == "tag.average.freetf.verdict"  # trials by verdict, not nested
    assert state["selectedColumns"] == [
        "tags.`freetf.verdict`", "params.`free_bits_bits`", "params.`seed`",
        "metrics.`eval/use_nats`", "metrics.`eval/kl_bits`", "metrics.`eval/ce_prior_nats`",
        "metrics.`eval/valid_rate`", "metrics.`eval/verdict_code`"]
