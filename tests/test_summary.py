"""Tests for freetf.results.summary with stand-ins for the tracker, MLflow's client and the
figures: the view's columns and filter, the verdict counts, what the parent's summary logs
and where.  The same against a real MLflow store: tests/test_tracking_sweep_runs.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

import freetf.tracking
from freetf.results import summary, sweep_figures

pytestmark = pytest.mark.timeout(120)


def test_the_view_filters_the_sweeps_trials_and_shows_the_compared_columns(monkeypatch):
    saved = []
    monkeypatch.setattr(freetf.tracking, "save_runs_view",
                        lambda *args, **kwargs: saved.append((args, kwargs)) or "id")
    client = object()
    assert summary.save_sweep_view(client, "7", "my sweep", ("training.free_bits_bits",
                                                            "training.weight_decay")) == "id"
    ((args, kwargs),) = saved
    assert args == (
        client, "7", "freetf-" + hashlib.sha1(b"my sweep").hexdigest()[:12], "my sweep: trials",
        ["tags.`freetf.verdict`", "params.`free_bits_bits`", "params.`weight_decay`",
         "metrics.`eval/use_nats`", "metrics.`eval/kl_bits`", "metrics.`eval/ce_prior_nats`",
         "metrics.`eval/valid_rate`", "metrics.`eval/verdict_code`"],
        "tags.`freetf.role` = 'trial' and tags.`freetf.sweep` = 'my sweep'")
    assert kwargs == {"group_by_tag": "freetf.verdict"}


def test_verdict_counts_of_no_trials_count_the_usual_verdicts_as_zero():
    assert summary.verdict_counts(pd.DataFrame()) == {
        "sweep/trials": 0.0, "sweep/trials_collapsed": 0.0, "sweep/trials_used": 0.0,
        "sweep/trials_leaking": 0.0}


def test_verdict_counts_by_verdict_else_by_outcome_and_the_trials_stopped_early():
    runs = pd.DataFrame({"verdict": ["active", "", "baseline", "used", "leaking"],
                         "outcome": ["finished", "interrupted", "finished", "stopped", ""],
                         "stopped_early": [False, True, False, True, True]})
    counts = summary.verdict_counts(runs)
    assert counts == {"sweep/trials": 5.0, "sweep/trials_collapsed": 0.0,
                      "sweep/trials_used": 2.0, "sweep/trials_leaking": 1.0,
                      "sweep/trials_interrupted": 1.0, "sweep/trials_baseline": 1.0,
                      "sweep/trials_stopped_early": 3.0}
    assert list(counts)[:4] == ["sweep/trials", "sweep/trials_collapsed", "sweep/trials_used",
                                "sweep/trials_leaking"]


class _Tracker:
    def __init__(self):
        self.metrics, self.artifacts = [], []

    def log_metrics(self, metrics, step):
        self.metrics.append((metrics, step))

    def log_artifact(self, path, folder):
        assert Path(path).exists()  # logged while the figure is still there
        self.artifacts.append((Path(path).name, folder))


def _figures(monkeypatch, fail: str | None = None):
    calls = []

    def figure(name):
        def plot(*args):
            calls.append((name, args))
            if name == fail:
                raise RuntimeError("no figure")
            Path(args[-1]).parent.mkdir(parents=True, exist_ok=True)  # as save_figure does
            Path(args[-1]).write_bytes(b"png")
            return Path(args[-1])
        return plot

    monkeypatch.setattr(sweep_figures, "plot_kl_vs_kappa", figure("kl"))
    monkeypatch.setattr(sweep_figures, "plot_sweep_curves", figure("curves"))
    return calls


def _runs():
    return pd.DataFrame({"verdict": ["collapsed", "used"], "stopped_early": [True, False]})


def test_the_summary_logs_the_counts_at_step_0_and_the_figures_under_report(
        monkeypatch, tmp_path):
    calls = _figures(monkeypatch)
    tracker, client, runs = _Tracker(), object(), _runs()
    paths = summary.log_sweep_summary(tracker, client, runs, str(tmp_path / "out"))
    assert tracker.metrics == [(summary.verdict_counts(runs), 0)]
    assert paths == {"kl_vs_kappa": tmp_path / "out" / "kl_vs_kappa.png",
                     "trial_curves": tmp_path / "out" / "trial_curves.png"}
    assert all(path.exists() for path in paths.values())
    assert [(name, args[:-1]) for name, args in calls] == [("kl", (runs,)),
                                                          ("curves", (client, runs))]
    assert tracker.artifacts == [("kl_vs_kappa.png", "report"),
                                 ("trial_curves.png", "report")]


def test_without_a_folder_the_figures_go_to_a_temporary_one_and_nothing_is_returned(
        monkeypatch, tmp_path):
    calls = _figures(monkeypatch)
    tracker = _Tracker()
    assert summary.log_sweep_summary(tracker, object(), _runs()) == {}
    assert tracker.artifacts == [("kl_vs_kappa.png", "report"),
                                 ("trial_curves.png", "report")]
    written = [Path(args[-1]) for _, args in calls]
    assert written[0].parent == written[1].parent
    assert not written[0].parent.exists()  # removed with the temporary folder


@pytest.mark.parametrize("fail, logged", [("kl", []), ("curves", ["kl_vs_kappa.png"])])
def test_a_failing_figure_does_not_fail_the_summary(monkeypatch, tmp_path, fail, logged):
    _figures(monkeypatch, fail=fail)
    tracker = _Tracker()
    paths = summary.log_sweep_summary(tracker, object(), _runs(), tmp_path)
    assert sorted(p.name for p in paths.values()) == logged
    assert [name for name, _ in tracker.artifacts] == logged
    assert tracker.metrics[0][0]["sweep/trials_collapsed"] == 1.0
