"""The sweep driver (freetf/sweeps/sweep.py) without Ray or MLflow: Tune's ``Tuner``, its
scheduler and configs, Ray's start, the MLflow store, the console and the report are
stand-ins that record what they are given (in order) and answer what the test sets.
What goes to Tune, what the driver logs and the result it builds are checked against
what the spec says.  (tests/test_sweep.py runs real sweeps.)"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from ray import tune

import freetf.sweeps
from freetf.results.over_training import HISTORY_METRICS
from freetf.sweeps import sweep as driver
from freetf.sweeps.runs import space_params
from freetf.sweeps.spec import SPEC_FILE, STOP_REASON, StopperSpec, SweepError, load_sweep
from freetf.sweeps.trainable import TrialContext, run_trial, trial_key
from freetf.tracking import verdict_code

pytestmark = pytest.mark.timeout(60)

# The smoke spec as a grid with ASHA and the stopper (as tests/test_sweep.py runs it).
GRID = ["search.method=grid", "space.training.free_bits_bits={grid: [0.015625, 1.0, 4.0]}",
        "asha.enabled=true", "stopper.enabled=true", "resources.cpus_per_worker=0.99"]
HOOK = "freetf.sweeps.trainable.preload_trial_libraries"


def _sweep(tmp: Path, *extra: str):
    return load_sweep("search_kl_smoke", [
        f"storage_path={tmp / 'new' / 'ray_results'}", f"report_dir={tmp / 'reports'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra])


class FakeTracker:
    def __init__(self, calls, run_id):
        self.calls, self.run_id = calls, run_id

    def log_text(self, text, name):
        self.calls.append(("log_text", text, name))

    def log_artifact(self, path, folder):
        self.calls.append(("log_artifact", path, folder))

    def finish(self, status):
        self.calls.append(("finish", status))


class Driven:
    """The stand-ins of one test: ``calls`` in order, and what they answer."""

    def __init__(self, tmp: Path):
        self.calls: list[tuple] = []
        self.restorable = False  # Tuner.can_restore
        self.parent = None  # find_parent's answer
        self.done = 3  # ended_trials' count
        self.terminated: list[int] = []  # sigterm_as's list
        self.fit_error: BaseException | None = None
        self.client = SimpleNamespace(name="client")
        self.results = SimpleNamespace(num_errors=1)
        self.found = SimpleNamespace(trials="TRIALS")
        self.records = ({"metrics": {"boundary/x": 1.0}}, {"r1": {"tags": {}}})
        self.report = {"map": tmp / "map.png", "csv": tmp / "trials.csv"}
        self.analysis = {"boundaries": tmp / "boundaries.md"}
        self.summary = {"kl_vs_kappa": tmp / "kl_vs_kappa.png"}
        self.env: dict[str, str | None] = {}

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def call(self, name: str) -> tuple:
        (found,) = [c[1:] for c in self.calls if c[0] == name]
        return found


@pytest.fixture
def driven(tmp_path, monkeypatch):
    """Replace Tune, Ray's start, MLflow, the console and the report by recorders."""
    import freetf.data.datasets
    import freetf.results.analysis
    import freetf.results.report
    import freetf.results.summary
    import freetf.tracking
    import freetf.training.ray_train

    d = Driven(tmp_path)
    rec = d.calls.append

    def recorder(name, answer=None):
        def record(*args, **kwargs):
            rec((name, *args, *([kwargs] if kwargs else [])))
            return answer(*args, **kwargs) if callable(answer) else answer
        return record

    class FakeTuner:
        def __init__(self, trainable, **kwargs):
            rec(("Tuner", trainable, kwargs))

        @staticmethod
        def can_restore(path):
            rec(("can_restore", path))
            return d.restorable

        @classmethod
        def restore(cls, path, **kwargs):
            rec(("restore", path, kwargs))
            return cls.__new__(cls)

        def fit(self):
            rec(("fit",))
            d.env = {k: os.environ.get(k) for k in ("TUNE_DISABLE_STRICT_METRIC_CHECKING",
                                                   "RAY_AIR_NEW_OUTPUT")}
            if d.fit_error is not None:
                raise d.fit_error
            return d.results

    @contextlib.contextmanager
    def sigterm_as(signum):
        rec(("sigterm_as", signum))
        yield d.terminated

    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.setattr(tune, "with_parameters",
                        lambda fn, **kw: ("with_parameters", fn, kw))
    monkeypatch.setattr(tune, "with_resources", lambda t, res: ("with_resources", t, res))
    def config(kind):
        return recorder(kind, lambda **kw: (kind, kw))

    for kind in ("TuneConfig", "RunConfig", "CheckpointConfig", "FailureConfig"):
        monkeypatch.setattr(tune, kind, config(kind))
    monkeypatch.setattr(tune.schedulers, "ASHAScheduler",
                        recorder("ASHAScheduler", lambda **kw: ("ASHA", kw)))
    monkeypatch.setattr(driver, "search_algorithm",
                        recorder("search_algorithm", ("ALG", {"k": "space"}, 7)))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(freetf.training.ray_train, "init_ray", recorder("init_ray"))
    monkeypatch.setattr(freetf.training.ray_train, "check_tracking_store",
                        recorder("check_tracking_store"))
    monkeypatch.setattr(freetf.data.datasets, "check_data", recorder("check_data"))
    monkeypatch.setattr(freetf.tracking, "mlflow_client", recorder("mlflow_client", d.client))
    monkeypatch.setattr(freetf.tracking, "find_parent",
                        recorder("find_parent", lambda *a: d.parent))
    monkeypatch.setattr(freetf.tracking, "make_tracker", recorder(
        "make_tracker", lambda base, **kw: FakeTracker(d.calls, kw["run_id"] or "run-new")))
    monkeypatch.setattr(freetf.tracking, "log_sweep_analysis", recorder("log_sweep_analysis"))
    monkeypatch.setattr(driver, "SweepConsole", recorder("SweepConsole", "CONSOLE"))
    monkeypatch.setattr(driver, "sigterm_as", sigterm_as)
    monkeypatch.setattr(driver, "ended_trial_keys", recorder("ended_trial_keys", {"k1"}))
    monkeypatch.setattr(driver, "ended_trials", recorder("ended_trials", lambda *a: d.done))
    monkeypatch.setattr(driver, "close_open_runs", recorder("close_open_runs"))
    monkeypatch.setattr(freetf.results.report, "collect_runs",
                        recorder("collect_runs", {"run_id": ["r1", "r2"]}))
    monkeypatch.setattr(freetf.results.report, "collect_histories",
                        recorder("collect_histories", "HISTORIES"))
    monkeypatch.setattr(freetf.results.analysis, "analyse_sweep",
                        recorder("analyse_sweep", d.found))
    monkeypatch.setattr(freetf.results.analysis, "mlflow_records",
                        recorder("mlflow_records", d.records))
    monkeypatch.setattr(freetf.results.report, "write_report",
                        recorder("write_report", lambda *a: dict(d.report)))
    monkeypatch.setattr(freetf.results.analysis, "write_analysis",
                        recorder("write_analysis", d.analysis))
    monkeypatch.setattr(freetf.results.summary, "log_sweep_summary",
                        recorder("log_sweep_summary", d.summary))
    monkeypatch.setattr(driver, "_save_view", recorder("_save_view", "http://view"))
    return d


BEFORE_FIT = ["can_restore", "check_data", "mlflow_client", "find_parent", "init_ray",
              "check_tracking_store", "make_tracker", "log_text", "SweepConsole",
              "sigterm_as"]
AFTER_FIT = ["ended_trial_keys", "ended_trials", "close_open_runs", "collect_runs",
             "collect_histories", "analyse_sweep", "mlflow_records", "log_sweep_analysis",
             "write_report", "write_analysis", "log_artifact", "log_artifact",
             "log_artifact", "log_sweep_summary", "_save_view", "finish"]


def _context(sweep, run_id="run-new") -> TrialContext:
    base = sweep.base()
    return TrialContext(
        sweep_name=sweep.name, parent_run_id=run_id, tracking_uri=sweep.mlflow.tracking_uri,
        base=base.to_dict(), keys=sweep.trial_keys, train_storage=str(sweep.train_dir),
        controller_failure_limit=sweep.resources.controller_failure_limit,
        runner=sweep.trial_runner(base), named_keys=sweep.named_keys)


def test_a_fresh_sweep_gives_tune_its_spec_and_reports_what_ended(driven, tmp_path, caplog):
    """The whole run of a grid with ASHA and the stopper: each stand-in called once, in
    order, with what the spec says; the result holds what the report gave."""
    sweep = _sweep(tmp_path, *GRID)
    base, uri = sweep.base(), sweep.mlflow.tracking_uri
    experiment = base.tracking.mlflow.experiment
    extra = object()
    with caplog.at_level(logging.INFO, "freetf.sweeps.sweep"):
        result = driver.run_sweep(sweep, callbacks=[extra])
    tuner_calls = ["search_algorithm", "TuneConfig", "CheckpointConfig", "FailureConfig",
                   "RunConfig", "Tuner", "fit"]
    assert driven.names() == [*BEFORE_FIT[:-1], "sigterm_as", "ASHAScheduler", *tuner_calls,
                              *AFTER_FIT]
    c = driven.client
    assert driven.call("can_restore") == (str(sweep.sweep_dir),)
    assert driven.call("check_data") == (base,)
    assert driven.call("mlflow_client") == (uri,)
    assert driven.call("find_parent") == (c, experiment, "search_kl_smoke")
    assert driven.call("init_ray") == ({"quiet": True, "setup_hook": HOOK},)
    assert driven.call("check_tracking_store") == (uri,)
    assert driven.call("make_tracker") == (base, {
        "run_id": None, "run_name": "search_kl_smoke", "params": space_params(sweep),
        "tags": {"freetf.sweep": "search_kl_smoke", "freetf.role": "sweep"}})
    assert driven.call("log_text") == (sweep.to_yaml(), "search_space.yaml")
    assert (sweep.sweep_dir / SPEC_FILE).read_text() == sweep.to_yaml()
    assert driven.call("SweepConsole") == (sweep, base, {"verbose": False})
    assert driven.call("sigterm_as") == (signal.SIGUSR1,)
    assert driven.env == {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "RAY_AIR_NEW_OUTPUT": "0"}

    context = _context(sweep)
    assert context.runner == "in_trial"
    assert driven.call("ASHAScheduler") == ({
        "time_attr": "step", "metric": "eval/ce_prior_nats", "mode": "min", "max_t": 19,
        "grace_period": 15, "reduction_factor": 2, "stop_last_trials": False},)
    # 2 CPUs, a trial 0.01 + one worker's 0.99
    assert driven.call("search_algorithm") == (sweep, base, 2)
    trainable, kwargs = driven.call("Tuner")
    assert trainable == ("with_resources", ("with_parameters", run_trial, {"context": context}),
                         {"cpu": pytest.approx(1.0)})
    run_config = kwargs.pop("run_config")
    assert kwargs == {"param_space": {"k": "space"}, "tune_config": ("TuneConfig", {
        "search_alg": "ALG", "scheduler": ("ASHA", driven.call("ASHAScheduler")[0]),
        "num_samples": 7, "trial_dirname_creator": driver._trial_dirname,
        "reuse_actors": True})}
    name, config = run_config
    stop, callbacks = config.pop("stop"), config.pop("callbacks")
    assert (name, config) == ("RunConfig", {
        "name": "search_kl_smoke", "storage_path": str(tmp_path / "new" / "ray_results"),
        "verbose": 0,
        "checkpoint_config": ("CheckpointConfig", {
            "num_to_keep": 1, "checkpoint_score_attribute": base.checkpoint.metric,
            "checkpoint_score_order": base.checkpoint.mode}),
        "failure_config": ("FailureConfig", {"max_failures": 1})})
    assert isinstance(stop, driver.CollapseStopper)
    assert (stop.spec, stop.context) == (sweep.stopper, context)
    recorder, *rest = callbacks
    assert isinstance(recorder, driver.EarlyStopRecorder) and recorder.context == context
    assert rest == ["CONSOLE", extra]

    assert driven.call("ended_trial_keys") == (c, "run-new")
    assert driven.call("ended_trials") == (driven.results, sweep.trial_keys, {"k1"})
    assert driven.call("close_open_runs") == (c, context, driven.results, False)
    assert driven.call("collect_runs") == (c, experiment, {"sweep": "search_kl_smoke"})
    assert driven.call("collect_histories") == (c, ["r1", "r2"], HISTORY_METRICS)
    assert driven.call("analyse_sweep") == ({"run_id": ["r1", "r2"]}, sweep, base, "HISTORIES")
    assert driven.call("mlflow_records") == (driven.found,)
    assert driven.call("log_sweep_analysis") == (c, "run-new", *driven.records)
    assert driven.call("write_report") == (c, "TRIALS", sweep.report_path)
    assert driven.call("write_analysis") == (driven.found, sweep.report_path)
    reported = {**driven.report, **driven.analysis}
    assert [call[1:] for call in driven.calls if call[0] == "log_artifact"] == [
        (path, "report") for path in reported.values()]
    tracker, client, trials, out = driven.call("log_sweep_summary")
    assert (tracker.run_id, client, trials, out) == ("run-new", c, "TRIALS", sweep.report_path)
    assert driven.call("_save_view") == (c, "run-new", sweep)
    assert driven.call("finish") == ("FINISHED",)
    assert result == driver.SweepResult(
        sweep, "run-new", uri, experiment, "TRIALS", {**reported, **driven.summary}, False,
        driven.found, "http://view", terminated=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"sweep search_kl_smoke: 3 trials, at most 2 at a time, Tune state in "
        f"{sweep.sweep_dir}",
        "sweep search_kl_smoke: 3 of 3 trials ended (1 errors)"]


def test_verbose_brings_back_tunes_output_and_a_set_concurrency_is_kept(driven, tmp_path,
                                                                       monkeypatch):
    """``verbose``: Ray's and Tune's own output; ``search.max_concurrent_trials`` is taken
    as given (the cluster is not asked); ``asha.metric`` over the search's."""
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    monkeypatch.setattr(ray, "cluster_resources", lambda: pytest.fail("cluster asked"))
    sweep = _sweep(tmp_path, *GRID, "search.max_concurrent_trials=5",
                   "asha.metric=eval/kl_nats", "search.mode=max")
    driver.run_sweep(sweep, verbose=True)
    assert driven.call("init_ray") == ({"quiet": False, "setup_hook": HOOK},)
    assert driven.call("SweepConsole") == (sweep, sweep.base(), {"verbose": True})
    assert driven.env == {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "RAY_AIR_NEW_OUTPUT": "1"}
    assert driven.call("search_algorithm")[2] == 5
    asha = driven.call("ASHAScheduler")[0]
    assert (asha["metric"], asha["mode"]) == ("eval/kl_nats", "max")
    assert driven.call("RunConfig")[0]["verbose"] == 1
    assert driven.call("RunConfig")[0]["callbacks"][1:] == ["CONSOLE"]
    assert driven.call("CheckpointConfig")[0]["checkpoint_score_order"] == \
        sweep.base().checkpoint.mode


@pytest.mark.parametrize("settings, runner, hook, reuse, cpu, at_once", [
    # two workers: under a TorchTrainer, which keeps its own checkpoints
    (["resources.num_workers=2", "resources.cpus_per_worker=0.5"], "train", None, False, 0.01,
     1),
    (["resources.preload=false", "resources.reuse_actors=false"], "in_trial", None, False,
     0.5, 4),
    (["resources.trial_runner=train", "resources.reuse_actors=true"], "train", None, False,
     0.01, 4),
])
def test_what_tune_gets_follows_the_trial_runner(driven, tmp_path, settings, runner, hook,
                                                 reuse, cpu, at_once):
    """The smoke spec as shipped (no ASHA, no stopper): no scheduler, no stopper; the
    preload hook and reused actors only for the loop in the trial, when asked."""
    sweep = _sweep(tmp_path, *settings)
    assert sweep.trial_runner(sweep.base()) == runner
    driver.run_sweep(sweep)
    assert "ASHAScheduler" not in driven.names()
    assert driven.call("init_ray") == ({"quiet": True, "setup_hook": hook},)
    tune_config = driven.call("TuneConfig")[0]
    assert (tune_config["scheduler"], tune_config["reuse_actors"]) == (None, reuse)
    run_config = driven.call("RunConfig")[0]
    assert run_config["stop"] is None
    assert ("CheckpointConfig" in driven.names()) == (runner == "in_trial")
    assert (run_config["checkpoint_config"] is None) == (runner == "train")
    trainable, _ = driven.call("Tuner")
    assert trainable[2] == {"cpu": pytest.approx(cpu)}
    assert trainable[1][2]["context"] == _context(sweep)
    # the cluster's 2 CPUs over (0.01 + workers x CPUs a worker)
    assert driven.call("search_algorithm")[2] == at_once


@pytest.mark.parametrize("done, terminated", [(2, []), (3, [signal.SIGTERM])])
def test_a_sweep_cut_short_ends_interrupted_and_says_how_to_go_on(driven, tmp_path, caplog,
                                                                  done, terminated):
    """Fewer trials ended than the spec has (Ctrl-C), or a SIGTERM came: the parent run
    is KILLED, the open runs closed as interrupted, the result says so."""
    driven.done, driven.terminated[:] = done, terminated
    sweep = _sweep(tmp_path, *GRID)
    with caplog.at_level(logging.INFO, "freetf.sweeps.sweep"):
        result = driver.run_sweep(sweep)
    assert driven.call("close_open_runs")[3] is True
    assert driven.call("finish") == ("KILLED",)
    assert result.interrupted and result.terminated == bool(terminated)
    assert caplog.records[-1].getMessage() == (
        f"sweep search_kl_smoke: {done} of 3 trials ended (1 errors); interrupted, "
        "continue it with --resume")


@pytest.mark.parametrize("error, status", [(RuntimeError("tune failed"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_a_sweep_whose_tune_fails_closes_its_runs_and_raises(driven, tmp_path, error, status):
    """A second Ctrl-C or Tune's own failure: the open trial runs closed as interrupted,
    the parent KILLED (Ctrl-C) or FAILED, the error raised on; no report."""
    driven.fit_error = error
    sweep = _sweep(tmp_path, *GRID)
    with pytest.raises(type(error)) as raised:
        driver.run_sweep(sweep)
    assert raised.value is error
    assert driven.names()[-3:] == ["fit", "close_open_runs", "finish"]
    assert driven.call("close_open_runs") == (driven.client, _context(sweep), None,
                                             {"interrupted": True})
    assert driven.call("finish") == (status,)


def test_resume_restores_tunes_state_with_the_spec_it_started_with(driven, tmp_path, caplog):
    """``resume``: the spec saved by the first run (a warning if another is given now),
    Tune's state restored (not a new Tuner), the parent run reattached."""
    first = _sweep(tmp_path, *GRID)
    first.sweep_dir.mkdir(parents=True)
    (first.sweep_dir / SPEC_FILE).write_text(first.to_yaml())
    now = _sweep(tmp_path, *GRID, "training.max_steps=18")
    driven.restorable = True
    driven.parent = SimpleNamespace(info=SimpleNamespace(run_id="parent-1"))
    with caplog.at_level(logging.INFO, "freetf.sweeps.sweep"):
        result = driver.run_sweep(now, resume=True)
    assert result.sweep == first and result.parent_run_id == "parent-1"
    base = first.base()
    assert base.training.max_steps == 20
    assert driven.call("check_data") == (base,)
    assert driven.call("make_tracker")[1]["run_id"] == "parent-1"
    assert "search_algorithm" not in driven.names() and "Tuner" not in driven.names()
    path, kwargs = driven.call("restore")
    assert path == str(first.sweep_dir)
    assert kwargs == {"trainable": ("with_resources",
                                    ("with_parameters", run_trial,
                                     {"context": _context(first, "parent-1")}),
                                    {"cpu": pytest.approx(1.0)})}
    assert (first.sweep_dir / SPEC_FILE).read_text() == first.to_yaml()
    assert [r.getMessage() for r in caplog.records][:2] == [
        f"--resume continues sweep search_kl_smoke with the spec it started with "
        f"({first.sweep_dir / SPEC_FILE}), not the one given now",
        f"resuming sweep search_kl_smoke from {first.sweep_dir}"]
    assert caplog.records[0].levelno == logging.WARNING


def test_resume_without_a_saved_spec_or_with_the_same_one_says_nothing_of_it(driven,
                                                                             tmp_path, caplog):
    sweep = _sweep(tmp_path, *GRID)
    driven.restorable = True
    with caplog.at_level(logging.INFO, "freetf.sweeps.sweep"):
        assert driver.run_sweep(sweep, resume=True).sweep == sweep  # no saved spec
        assert driver.run_sweep(sweep, resume=True).sweep == sweep  # the same one
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_sweep_is_refused_before_ray_starts_where_its_state_says_no(driven, tmp_path):
    """Nothing to resume; a name with Tune state, or with an MLflow parent run, run
    afresh: one SweepError that says what to do, before Ray or a run starts."""
    sweep = _sweep(tmp_path, *GRID)
    with pytest.raises(SweepError) as err:
        driver.run_sweep(sweep, resume=True)
    assert str(err.value) == (
        f"nothing to resume: no Tune state of sweep 'search_kl_smoke' in {sweep.sweep_dir}; "
        "run it without --resume")
    driven.restorable = True
    with pytest.raises(SweepError) as err:
        driver.run_sweep(sweep)
    assert str(err.value) == (
        f"sweep 'search_kl_smoke' already ran in {sweep.sweep_dir}: continue it with "
        "--resume, or start another with --set mlflow.sweep_name=NEW_NAME")
    assert driven.names() == ["can_restore", "can_restore"]
    driven.restorable, driven.parent = False, SimpleNamespace(info=SimpleNamespace(run_id="p9"))
    with pytest.raises(SweepError) as err:
        driver.run_sweep(sweep)
    uri = sweep.mlflow.tracking_uri
    assert str(err.value) == (
        f"MLflow experiment 'freetf-search-kl-smoke' at {uri} already has a sweep named "
        "'search_kl_smoke' (run p9); choose another with --set mlflow.sweep_name=NEW_NAME")
    assert driven.names()[2:] == ["can_restore", "check_data", "mlflow_client", "find_parent"]
    assert not sweep.sweep_dir.exists()


# ----------------------------------------------------------------------------- pieces


def _trial_context(max_steps=100, keys=("training.kl_weight",)) -> TrialContext:
    return TrialContext(sweep_name="s", parent_run_id="p", tracking_uri="sqlite:///x",
                        base={"training": {"max_steps": max_steps}}, keys=keys,
                        train_storage="/tmp", controller_failure_limit=1)


def test_the_stopper_at_its_edges():
    """Low KL: strictly under ``collapse_kl_nats``, from step ``collapse_after_steps`` on,
    ``collapse_patience`` reports in a row, counted per trial; diverged: strictly above
    ``diverge_loss``; never at the final report (a searched max_steps counts)."""
    spec = StopperSpec(collapse_after_steps=20, collapse_kl_nats=0.01, collapse_patience=2,
                       diverge_loss=10.0)
    stopper = driver.CollapseStopper(spec, _trial_context(
        keys=("training.kl_weight", "training.max_steps")))

    def report(trial, result):
        return stopper(trial, result), result.get(STOP_REASON)

    assert report("a", {"train/loss": math.nan}) == (False, None)  # no step
    assert report("a", {"step": 5, "train/loss": 10.0, "train/kl_nats": 0.0}) == (False, None)
    assert report("a", {"step": 5, "train/loss": 10.5}) == (True, "diverged")
    assert report("a", {"step": 5, "train/loss": -math.inf}) == (True, "diverged")
    assert report("a", {"step": 99, "train/loss": 11.0}) == (True, "diverged")  # no config
    assert report("a", {"step": 100, "train/loss": 11.0}) == (False, None)
    short = {"training.max_steps": 30, "training.kl_weight": 1.0, "training.seed": 99}
    assert report("a", {"step": 30, "train/loss": 11.0, "config": short}) == (False, None)
    assert report("a", {"step": 29, "train/loss": 11.0, "config": short}) == (True, "diverged")
    # seed 99 is not a searched key: the sampled values hold only the searched ones
    assert report("a", {"step": 25, "train/loss": 11.0,
                        "config": {"training.seed": 25}}) == (True, "diverged")
    assert report("b", {"step": 20, "train/kl_nats": 0.001}) == (False, None)  # 1 of 2
    assert report("c", {"step": 20, "train/kl_nats": 0.001}) == (False, None)  # its own count
    assert report("b", {"step": 30}) == (False, None)  # no KL: the count stays
    assert report("b", {"step": 40, "train/kl_nats": 0.001, "train/loss": None}) == \
        (True, "low_kl")
    assert report("d", {"step": 19, "train/kl_nats": 0.0}) == (False, None)  # too early
    assert report("d", {"step": 20, "train/kl_nats": 0.01}) == (False, None)  # not under
    assert report("d", {"step": 30, "train/kl_nats": 0.0}) == (False, None)  # 1 of 2 again
    assert stopper.stop_all() is False


class FakeClient:
    """An MLflow client: the trial runs it finds, the writes it gets."""

    def __init__(self, runs=(), fail=False):
        self.runs, self.fail, self.writes, self.searches = list(runs), fail, [], []

    def get_run(self, run_id):
        assert run_id == "p", run_id  # the parent run's, in experiment 7
        return SimpleNamespace(info=SimpleNamespace(experiment_id="7"))

    def search_runs(self, ids, filter_string, max_results):
        self.searches.append((ids, filter_string))
        return self.runs

    def set_tag(self, run_id, key, value):
        if self.fail:
            raise RuntimeError("store gone")
        self.writes.append(("tag", run_id, key, value))

    def log_metric(self, run_id, key, value, step):
        self.writes.append(("metric", run_id, key, value, step))

    def set_terminated(self, run_id, status):
        self.writes.append(("terminated", run_id, status))


def _recorder(monkeypatch, client, max_steps=100):
    import freetf.tracking

    opened = []
    monkeypatch.setattr(freetf.tracking, "mlflow_client",
                        lambda uri: opened.append(uri) or client)
    return driver.EarlyStopRecorder(_trial_context(max_steps)), opened


def _run(run_id):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, start_time=1))


def test_a_trial_stopped_early_has_its_run_closed_as_stopped(monkeypatch):
    """ASHA's stop: KILLED, stopped early at its step, with the last evaluation's verdict;
    the stopper's reasons carry no verdict.  One client for all the trials."""
    client = FakeClient([_run("r1")])
    recorder, opened = _recorder(monkeypatch, client)
    trial = SimpleNamespace(config={"training.kl_weight": np.float64(0.5)})
    recorder.on_trial_result(3, [], trial, {"done": True, "step": 40,
                                            "eval/verdict": "collapsed"})
    key = trial_key({"training.kl_weight": 0.5})
    assert client.searches == [(["7"], f"tags.`mlflow.parentRunId` = 'p' and "
                                       f"tags.`freetf.trial_key` = '{key}'")]
    assert client.writes == [
        ("tag", "r1", "freetf.stopped_early", "true"), ("tag", "r1", "freetf.stop_reason", "asha"),
        ("tag", "r1", "freetf.stopped_at_step", "40"), ("tag", "r1", "freetf.outcome", "stopped"),
        ("tag", "r1", "freetf.verdict", "collapsed"),
        ("metric", "r1", "eval/verdict_code", verdict_code("collapsed"), 40),
        ("terminated", "r1", "KILLED")]
    client.writes.clear()
    recorder.on_trial_result(4, [], trial, {"done": True, "step": 99, STOP_REASON: "low_kl",
                                            "eval/verdict": "collapsed"})
    assert client.writes == [
        ("tag", "r1", "freetf.stopped_early", "true"),
        ("tag", "r1", "freetf.stop_reason", "low_kl"),
        ("tag", "r1", "freetf.stopped_at_step", "99"), ("tag", "r1", "freetf.outcome", "stopped"),
        ("terminated", "r1", "KILLED")]
    client.writes.clear()
    recorder.on_trial_result(5, [], trial, {"done": True})  # stopped before any step
    assert client.writes[2] == ("tag", "r1", "freetf.stopped_at_step", "None")
    one_step, _ = _recorder(monkeypatch, client, max_steps=1)  # step 0 is before the end
    client.writes.clear()
    one_step.on_trial_result(6, [], trial, {"done": True})
    assert client.writes[-1] == ("terminated", "r1", "KILLED")
    assert opened == ["sqlite:///x"]
    state = recorder.__getstate__()
    assert state == {"context": recorder.context, "_client": None}  # no client in Tune's state
    assert pickle.loads(pickle.dumps(recorder)).__dict__ == state
    assert recorder._client is client


def test_only_a_trial_stopped_before_its_end_is_closed_and_bookkeeping_never_fails(
        monkeypatch, caplog):
    client = FakeClient([_run("r1")])
    recorder, opened = _recorder(monkeypatch, client)
    trial = SimpleNamespace(config={"training.kl_weight": 0.5})
    recorder.on_trial_result(1, [], trial, {"step": 40})  # not done
    recorder.on_trial_result(1, [], trial, {"done": False, "step": 40})
    recorder.on_trial_result(1, [], trial, {"done": True, "step": 100})  # ended on its own
    assert client.writes == [] and opened == []
    client.runs = []  # no run of the trial (yet)
    recorder.on_trial_result(1, [], trial, {"done": True, "step": 40})
    assert client.writes == [] and opened == ["sqlite:///x"]
    client.runs, client.fail = [_run("r1")], True
    with caplog.at_level(logging.WARNING, "freetf.sweeps.sweep"):
        recorder.on_trial_result(1, [], trial, {"done": True, "step": 40})
    assert caplog.records[-1].getMessage() == \
        f"could not close the MLflow run of stopped trial {trial}: store gone"


def test_the_saved_view_is_the_trials_of_the_parents_experiment(monkeypatch):
    import freetf.results.summary

    seen = []
    monkeypatch.setattr(freetf.results.summary, "save_sweep_view",
                        lambda *args: seen.append(args) or "http://ui/#view")
    sweep = load_sweep("search_kl_smoke", GRID)
    client = FakeClient()
    assert driver._save_view(client, "p", sweep) == "http://ui/#view"
    assert seen == [(client, "7", "search_kl_smoke", sweep.named_keys)]


def test_ray_starts_quiet_without_the_preload_unless_asked(monkeypatch):
    import freetf.training.ray_train

    calls = []
    monkeypatch.setattr(freetf.training.ray_train, "init_ray",
                        lambda **kw: calls.append(("init_ray", kw)))
    monkeypatch.setattr(freetf.training.ray_train, "check_tracking_store",
                        lambda uri: calls.append(("check", uri)))
    driver._init_ray(False, "sqlite:///a.db")
    driver._init_ray(True, "http://h:5000", preload=True)
    assert calls == [("init_ray", {"quiet": True, "setup_hook": None}),
                     ("check", "sqlite:///a.db"),
                     ("init_ray", {"quiet": False, "setup_hook": HOOK}),
                     ("check", "http://h:5000")]


def test_a_trials_folder_is_named_after_its_key():
    config = {"training.kl_weight": 0.5, "training.free_bits_bits": 1.0}
    assert driver._trial_dirname(SimpleNamespace(config=config)) == \
        f"trial-{trial_key(config)}"


def test_concurrency_when_the_cluster_leaves_a_resource_out(monkeypatch):
    """No CPU count: one CPU; GPU workers and no GPU count: none, so one trial; a
    quotient a rounding error under a whole number counts as that number."""
    base = load_sweep("search_kl_smoke", GRID).base()
    one = base.replace({"scaling.num_workers": 1, "scaling.cpus_per_worker": 0.49})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    assert driver.max_concurrent_trials(one, cpus_per_trial=0.01) == 2
    gpu = base.replace({"scaling.use_gpu": True, "scaling.gpus_per_worker": 0.25,
                        "scaling.cpus_per_worker": 0.49, "training.device": "cuda"})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert driver.max_concurrent_trials(gpu, cpus_per_trial=0.01) == 1
    assert 0.6 / (0.01 + 0.19) < 3
    tenth = base.replace({"scaling.num_workers": 1, "scaling.cpus_per_worker": 0.19})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.6})
    assert driver.max_concurrent_trials(tenth, cpus_per_trial=0.01) == 3


def test_the_package_hands_out_the_drivers_names_and_no_other():
    """``freetf.sweeps.run_sweep`` and ``SweepResult`` are the driver's (loaded when
    first asked for); any other missing name is the usual AttributeError."""
    assert freetf.sweeps.run_sweep is driver.run_sweep
    assert freetf.sweeps.SweepResult is driver.SweepResult
    with pytest.raises(AttributeError) as err:
        freetf.sweeps.run_sweeps  # noqa: B018
    assert str(err.value) == "module 'freetf.sweeps' has no attribute 'run_sweeps'"
    assert not hasattr(freetf.sweeps, "CollapseStopper")
