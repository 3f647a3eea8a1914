"""freetf.sweeps.trainable without Ray or a training run: the trial's config and key, what
``run_trial`` reports to Tune and writes on its MLflow child run (finished, failed,
interrupted, stopped early, a reused run), the in-trial context's reports and checkpoints,
and the search for a trial's run.  ``ray.tune``'s functions, MLflow's client, the tracker,
the loop and the trainer are stand-ins that record their calls; tests/test_trainable.py
runs the same code inside real Tune trials.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import ray.tune

import freetf.logs
import freetf.tracking
import freetf.training.ray_train
from freetf import load_config
from freetf.sweeps import trainable
from freetf.sweeps.trainable import TrialContext, TuneTrialContext, trial_key
from freetf.tracking import tags
from freetf.training.context import TrainResult

pytestmark = pytest.mark.timeout(60)

KAPPA, KL, SEED = "training.free_bits_bits", "training.kl_weight", "training.seed"
SAMPLED = {KAPPA: 0.25, KL: 0.1, SEED: 1}
# the first 10 hex digits of the SHA-1 of SAMPLED as sorted JSON, pinned: a sweep resumed
# by a later version must find its runs again
KEY = "ca3ef15273"


@pytest.fixture(scope="module")
def base() -> dict:
    return load_config("freetf/configs/tiny.yaml", ["training.max_steps=40"]).to_dict()


def _context(base, **changes) -> TrialContext:
    fields = dict(sweep_name="sw", parent_run_id="parent", tracking_uri="sqlite:///x.db",
                  base=base, keys=(KAPPA, KL, SEED), train_storage="/storage/train",
                  controller_failure_limit=3, runner="in_trial", named_keys=(KAPPA, SEED))
    return TrialContext(**{**fields, **changes})


# ----------------------------------------------------------------------------- trials


def test_a_trials_key_is_pinned_and_does_not_depend_on_order_or_number_types():
    assert trial_key(SAMPLED) == KEY
    assert trial_key(dict(reversed(list(SAMPLED.items())))) == KEY
    assert trial_key({KAPPA: np.float64(0.25), KL: np.float64(0.1), SEED: np.int64(1)}) == KEY
    assert trial_key({**SAMPLED, SEED: 2}) != KEY
    # a value JSON cannot write is keyed by its text
    assert trial_key({"data.path": Path("a/b")}) == trial_key({"data.path": "a/b"})
    # nor on the order of a value's own keys
    assert trial_key({"x": {"b": 1, "a": 2}}) == trial_key({"x": {"a": 2, "b": 1}})


def test_a_trials_config_is_the_base_with_its_values_and_names(base):
    cfg = _context(base).trial_config(SAMPLED)
    assert (cfg.training.free_bits_bits, cfg.training.kl_weight, cfg.training.seed) == (
        0.25, 0.1, 1)
    assert cfg.training.max_steps == 40  # the rest is the base's
    assert cfg.tracking.mlflow.run_name == "kappa=1/4 s1"  # the named keys only
    assert cfg.scaling.run_name == f"trial-{KEY}"
    # a context pickled before named_keys: every searched key is named
    cfg = _context(base, named_keys=None).trial_config(SAMPLED)
    assert cfg.tracking.mlflow.run_name == "kappa=1/4 kl_weight=0.1 s1"


def test_a_trials_steps_are_its_own_else_the_bases(base):
    context = _context(base)
    assert context.max_steps({"training.max_steps": np.int64(12)}) == 12
    assert type(context.max_steps({"training.max_steps": 12.0})) is int
    assert context.max_steps(SAMPLED) == 40
    assert context.max_steps({"training.max_steps": None}) == 40


def test_a_context_runs_trials_under_a_trainer_unless_told():
    context = TrialContext("sw", "parent", "uri", {}, (), "/s", 3)
    assert context.runner == "train" and context.named_keys is None


# ----------------------------------------------------------------------------- stand-ins


class FakeTracker:
    def __init__(self, run_id="child"):
        self.run_id = run_id
        self.tags: list[dict] = []
        self.finished: list[str] = []

    def set_tags(self, values):
        self.tags.append(dict(values))

    def finish(self, status):
        self.finished.append(status)


def _run(run_id="child", status="RUNNING", run_tags=None, metrics=None, start_time=0,
         experiment_id="7"):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, status=status, start_time=start_time,
                             experiment_id=experiment_id),
        data=SimpleNamespace(tags=dict(run_tags or {}), metrics=dict(metrics or {})))


class FakeClient:
    """MLflow's client: ``found`` are the runs any search returns; ``runs`` by id."""

    def __init__(self, found=(), runs=None):
        self.found = list(found)
        self.runs = {"parent": _run("parent"), **(runs or {})}
        self.searches: list[tuple] = []
        self.deleted: list[tuple] = []

    def get_run(self, run_id):
        return self.runs.get(run_id) or _run(run_id)

    def search_runs(self, experiment_ids, filter_string, max_results):
        self.searches.append((experiment_ids, filter_string, max_results))
        return iter(self.found)

    def delete_tag(self, run_id, key):
        self.deleted.append((run_id, key))


class Trial:
    """What run_trial's world records: Tune's reports, the tracker made, the artifacts."""

    def __init__(self, monkeypatch, tmp_path, client):
        self.client, self.tmp_path = client, tmp_path
        self.reports: list[tuple[dict, object]] = []
        self.trackers: list[tuple[tuple, dict]] = []
        self.artifacts: list[tuple] = []
        self.histories: list[tuple] = []
        self.uris: list[str] = []
        self.tracker = FakeTracker()
        self.persisted = tmp_path / "trial" / "checkpoint_000000"
        self.restored = None  # Tune's checkpoint for a retried trial
        self.persisted_yet = False
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        self.scratch = tmp

        def report(metrics, checkpoint=None):
            if checkpoint is not None:  # Tune copies it into the trial's folder
                self.persisted.mkdir(parents=True)
                (self.persisted / "state.pt").write_bytes(
                    (Path(checkpoint.path) / "state.pt").read_bytes())
                self.persisted_yet = True
            self.reports.append((dict(metrics), checkpoint))

        def get_checkpoint():
            if self.persisted_yet:
                return ray.tune.Checkpoint.from_directory(str(self.persisted))
            return self.restored

        def make_tracker(*args, **kwargs):
            self.trackers.append((args, kwargs))
            return self.tracker

        def mlflow_client(uri):
            self.uris.append(uri)
            return client

        def metric_history(client_, run_id, keys):
            self.histories.append((client_, run_id, keys))
            return [{"step": 1, "train/loss": 9.0}]

        monkeypatch.setattr(ray.tune, "report", report)
        monkeypatch.setattr(ray.tune, "get_checkpoint", get_checkpoint)
        monkeypatch.setattr(ray, "get_runtime_context",
                            lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
        monkeypatch.setattr(freetf.logs, "setup_logging", lambda: None)
        monkeypatch.setattr(freetf.tracking, "make_tracker", make_tracker)
        monkeypatch.setattr(freetf.tracking, "mlflow_client", mlflow_client)
        monkeypatch.setattr(freetf.tracking, "metric_history", metric_history)
        monkeypatch.setattr(freetf.training.ray_train, "log_run_artifacts",
                            lambda *args: self.artifacts.append(args))
        self.reset: list = []
        monkeypatch.setattr(trainable, "reset_process_state", self.reset.append)


def _loop(trial: Trial, fail: BaseException | None = None):
    """A stand-in train_loop: a plain report, a checkpointed one, then the final one."""
    def train_loop(cfg, ctx, tracker):
        assert tracker is trial.tracker and ctx.report_interval_s == 0.5
        assert cfg.scaling.run_name == f"trial-{KEY}"  # the trial's own config
        trial.ctx, trial.scratch_out = ctx, ctx.checkpoint_root(cfg)
        ctx.latest_checkpoint()
        ctx.report({"step": 1, "train/loss": 3.0}, essential=False)
        staged = ctx.checkpoint_root(cfg) / "step_000002"
        staged.mkdir(parents=True)
        (staged / "state.pt").write_bytes(b"weights")
        ctx.report({"step": 2, "train/loss": 2.0}, checkpoint_dir=staged)
        if fail is not None:
            raise fail
        ctx.report({"step": 2, "eval/verdict": "uses"})
        return TrainResult(step=2, metrics={"step": 2, "train/loss": 2.0}, history=[],
                           checkpoint=None, nonfinite_steps=0)
    return train_loop


# ----------------------------------------------------------------------------- run_trial


@pytest.fixture
def in_trial_base(base):
    return {**base, "scaling": {**base["scaling"], "report_interval_s": 0.5}}


def test_a_new_in_trial_run_trains_reports_and_finishes_its_child_run(
        monkeypatch, tmp_path, in_trial_base):
    client = FakeClient()
    trial = Trial(monkeypatch, tmp_path, client)
    monkeypatch.setattr(trainable, "train_loop", _loop(trial))
    context = _context(in_trial_base)
    tune_config = {KAPPA: np.float64(0.25), KL: np.float64(0.1), SEED: np.int64(1),
                   "not.searched": 5}
    trainable.run_trial(tune_config, context)

    assert trial.uris == ["sqlite:///x.db"]
    # the search for an earlier run of this trial
    assert client.searches == [(["7"], "tags.`mlflow.parentRunId` = 'parent' and "
                                f"tags.`freetf.trial_key` = '{KEY}'", 10_000)]
    ((args, kwargs),) = trial.trackers
    (cfg,) = args
    assert cfg.training.kl_weight == 0.1 and cfg.scaling.run_name == f"trial-{KEY}"
    assert kwargs == {
        "run_id": None, "parent_run_id": "parent", "run_name": "kappa=1/4 s1",
        "tags": {tags.SWEEP: "sw", tags.ROLE: "trial", tags.TRIAL_KEY: KEY,
                 tags.SAMPLED: json.dumps(SAMPLED), tags.STOPPED_EARLY: "false",
                 tags.RAY_NODE: "node-1"},
        "searched": (KAPPA, KL, SEED)}
    assert type(json.loads(kwargs["tags"][tags.SAMPLED])[SEED]) is int  # numpy's made plain
    assert client.deleted == []
    assert [c.training.seed for c in trial.reset] == [1]  # the process reset first

    # every report goes to Tune (the plain one too: the first is never thinned), with the
    # timeline; the checkpointed one with its staged folder, which Tune persisted
    assert [({k: v for k, v in m.items() if not k.startswith("timeline/")},
             None if c is None else c.path) for m, c in trial.reports] == [
        ({"step": 1, "train/loss": 3.0}, None),
        ({"step": 2, "train/loss": 2.0}, str(trial.scratch_out / "step_000002")),
        ({"step": 2, "eval/verdict": "uses"}, None)]
    marks = trial.reports[0][0]
    assert {k for k in marks if k.startswith("timeline/")} == {
        "timeline/trial_start", "timeline/imports", "timeline/mlflow_run",
        "timeline/process_start"}
    assert marks["timeline/trial_start"] <= marks["timeline/imports"] <= marks[
        "timeline/mlflow_run"]

    # the run is finished with the loop's metrics, Tune's copy of the checkpoint and the
    # trial's own history
    ((tracker, final, checkpoint, history, plot),) = trial.artifacts
    assert tracker is trial.tracker and final == {"step": 2, "train/loss": 2.0}
    assert checkpoint == trial.persisted
    assert history == [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0},
                       {"step": 2, "eval/verdict": "uses"}]
    assert plot is freetf.tracking.plot_training_curves
    assert trial.histories == []  # not read back from MLflow
    assert trial.tracker.tags == [{tags.OUTCOME: "finished"}]
    assert trial.tracker.finished == ["FINISHED"]
    # the context staged in its scratch folder, <tmp>/freetf-trial-*/out, now gone
    assert trial.scratch_out.parent.parent == trial.scratch
    assert trial.scratch_out.name == "out"
    assert trial.scratch_out.parent.name.startswith("freetf-trial-")
    assert list(trial.scratch.iterdir()) == []


def test_a_trial_already_finished_in_mlflow_reports_its_metrics_and_is_not_rerun(
        monkeypatch, tmp_path, base):
    done = _run("done", "FINISHED", {tags.VERDICT: "uses", tags.TRIAL_KEY: KEY},
                {"train/loss": 1.5, "train/steps_done": 30.0})
    trial = Trial(monkeypatch, tmp_path, FakeClient([done]))
    monkeypatch.setattr(trainable, "train_loop", _loop(trial))
    trainable.run_trial(dict(SAMPLED), _context(base))
    assert trial.reports == [({"train/loss": 1.5, "train/steps_done": 30.0, "step": 30.0,
                               "eval/verdict": "uses"}, None)]
    assert trial.trackers == [] and trial.reset == [] and trial.artifacts == []
    # one without its steps or a verdict (cut off before its last eval)
    trial.client.found = [_run("done", "FINISHED", {}, {"train/loss": 1.5})]
    trainable.run_trial(dict(SAMPLED), _context(base))
    assert trial.reports[1] == ({"train/loss": 1.5, "step": 0, "eval/verdict": ""}, None)


@pytest.mark.parametrize("error_tag", [True, False])
def test_a_trial_retried_after_a_cut_off_try_goes_on_in_its_run(monkeypatch, tmp_path,
                                                                  in_trial_base, error_tag):
    cut = _run("child", "RUNNING", {tags.ERROR: "OSError: gone"} if error_tag else {})
    trial = Trial(monkeypatch, tmp_path, FakeClient([cut]))
    monkeypatch.setattr(trainable, "train_loop", _loop(trial))
    trainable.run_trial(dict(SAMPLED), _context(in_trial_base))
    ((_, kwargs),) = trial.trackers
    assert kwargs["run_id"] == "child"
    assert trial.client.deleted == ([("child", tags.ERROR)] if error_tag else [])
    assert trial.tracker.finished == ["FINISHED"]


@pytest.mark.parametrize("error, outcome, status", [
    (ValueError("boom"), "failed", "FAILED"),
    (KeyboardInterrupt("cut"), "interrupted", "KILLED"),
])
def test_a_failed_or_interrupted_trial_says_why_on_its_run_and_raises(
        monkeypatch, tmp_path, in_trial_base, error, outcome, status):
    trial = Trial(monkeypatch, tmp_path, FakeClient())
    monkeypatch.setattr(trainable, "train_loop", _loop(trial, fail=error))
    with pytest.raises(type(error)):
        trainable.run_trial(dict(SAMPLED), _context(in_trial_base))
    assert trial.tracker.tags == [{tags.ERROR: f"{type(error).__name__}: {error}",
                                   tags.OUTCOME: outcome}]
    assert trial.tracker.finished == [status]
    assert trial.artifacts == []
    assert list(trial.scratch.iterdir()) == []  # the scratch folder goes all the same


def test_a_trial_stopped_early_by_the_driver_leaves_its_run_as_the_driver_closed_it(
        monkeypatch, tmp_path, in_trial_base):
    client = FakeClient(runs={"child": _run("child", "KILLED", {tags.STOPPED_EARLY: "true"})})
    trial = Trial(monkeypatch, tmp_path, client)
    monkeypatch.setattr(trainable, "train_loop", _loop(trial, fail=SystemExit(1)))
    with pytest.raises(SystemExit):
        trainable.run_trial(dict(SAMPLED), _context(in_trial_base))
    assert trial.tracker.tags == [] and trial.tracker.finished == []


def test_a_retried_in_trial_run_reads_its_history_back_from_mlflow(monkeypatch, tmp_path,
                                                                     in_trial_base):
    trial = Trial(monkeypatch, tmp_path, FakeClient())
    saved = tmp_path / "earlier" / "checkpoint_000000"
    saved.mkdir(parents=True)
    (saved / "state.pt").write_bytes(b"earlier")
    trial.restored = ray.tune.Checkpoint.from_directory(str(saved))
    monkeypatch.setattr(trainable, "train_loop", _loop(trial))
    trainable.run_trial(dict(SAMPLED), _context(in_trial_base))
    assert trial.ctx.resumed
    assert trial.histories == [(trial.client, "child", freetf.tracking.CURVE_METRICS)]
    ((_, _, checkpoint, history, _),) = trial.artifacts
    assert history == [{"step": 1, "train/loss": 9.0}] and checkpoint == trial.persisted


class FakeTrainer:
    def __init__(self, result):
        self.result = result

    def fit(self):
        return self.result


@pytest.mark.parametrize("checkpoint, metrics", [("ckpt", {"step": 4}), (None, None)])
def test_a_train_runner_trial_fits_a_trainer_that_reports_to_tune(
        monkeypatch, tmp_path, base, checkpoint, metrics):
    import ray.tune.integration.ray_train

    class TuneReportCallback:  # Ray's wants a Tune session
        pass

    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback",
                        TuneReportCallback)
    trial = Trial(monkeypatch, tmp_path, FakeClient())
    built = []
    path = tmp_path / "ckpt"
    result = SimpleNamespace(metrics=metrics,
                             checkpoint=checkpoint and SimpleNamespace(path=str(path)))

    def build_trainer(cfg, **kwargs):
        built.append((cfg, kwargs))
        return FakeTrainer(result)

    monkeypatch.setattr(freetf.training.ray_train, "build_trainer", build_trainer)
    trainable.run_trial(dict(SAMPLED), _context(base, runner="train"))
    ((cfg, kwargs),) = built
    assert cfg.scaling.run_name == f"trial-{KEY}"
    (callback,) = kwargs.pop("callbacks")
    assert isinstance(callback, TuneReportCallback)
    assert kwargs == {"run_id": "child", "storage_path": "/storage/train",
                      "controller_failure_limit": 3}
    assert trial.reset == []  # the workers reset nothing: they are fresh processes
    # history: every logged step, from MLflow (the trainer's reports are thinned)
    assert trial.histories == [(trial.client, "child", freetf.tracking.CURVE_METRICS)]
    ((_, final, persisted, history, _),) = trial.artifacts
    assert final == (metrics or {}) and history == [{"step": 1, "train/loss": 9.0}]
    assert persisted == (path if checkpoint else None)
    assert trial.tracker.finished == ["FINISHED"]


# ----------------------------------------------------------------------------- the context


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def tune_world(tmp_path, monkeypatch):
    """Tune's report and checkpoint functions, and a scratch dir, for one context."""
    world = SimpleNamespace(reports=[], persisted=None, gets=0, clock=Clock())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    world.tmp = tmp

    def get_checkpoint():
        world.gets += 1
        return world.persisted

    monkeypatch.setattr(ray.tune, "report", lambda metrics, checkpoint=None:
                        world.reports.append((metrics, checkpoint)))
    monkeypatch.setattr(ray.tune, "get_checkpoint", get_checkpoint)
    monkeypatch.setattr(trainable.time, "monotonic", world.clock)
    return world


def test_plain_reports_are_thinned_to_one_per_interval_essential_ones_never(tune_world):
    ctx = TuneTrialContext(report_interval_s=10.0)
    ctx.marks.clear()
    sent = []
    for t, step, essential in [(0.0, 1, False), (5.0, 2, False), (8.0, 3, True),
                               (17.5, 4, False), (18.0, 5, False), (18.0, 6, True),
                               (18.0, 7, None)]:
        tune_world.clock.now = t
        if essential is None:
            ctx.report({"step": step})  # essential unless told
        else:
            ctx.report({"step": step}, essential=essential)
        sent.append(step)
    assert [m["step"] for m, _ in tune_world.reports] == [1, 3, 5, 6, 7]
    assert [h["step"] for h in ctx.history] == sent  # the history keeps every point
    ctx.close()


def test_without_an_interval_every_report_goes_to_tune(tune_world):
    ctx = TuneTrialContext()
    assert ctx.report_interval_s == 0.0
    for step in range(3):
        ctx.report({"step": step}, essential=False)  # all at one instant
    assert [m["step"] for m, _ in tune_world.reports] == [0, 1, 2]
    ctx.close()


def test_a_report_carries_the_timeline_and_a_checkpoint_that_tune_persists(tune_world,
                                                                            tmp_path):
    ctx = TuneTrialContext()
    ctx.marks = {"process_start": 1.0, "first_step": 2.0}
    metrics = {"step": 1, "train/loss": 2.0}
    ctx.report(metrics)
    assert tune_world.reports == [({"step": 1, "train/loss": 2.0, "timeline/process_start": 1.0,
                                    "timeline/first_step": 2.0}, None)]
    assert ctx.last_checkpoint is None and tune_world.gets == 0
    staged = ctx.checkpoint_root(None) / "step_000002"
    staged.mkdir(parents=True)
    tune_world.persisted = SimpleNamespace(path=str(tmp_path / "trial" / "checkpoint_000000"))
    ctx.report({"step": 2}, checkpoint_dir=staged)
    (_, checkpoint) = tune_world.reports[1]
    assert isinstance(checkpoint, ray.tune.Checkpoint) and checkpoint.path == str(staged)
    assert ctx.last_checkpoint == tmp_path / "trial" / "checkpoint_000000"
    assert not staged.exists()  # Tune has its copy
    metrics["step"] = 9
    assert ctx.history == [{"step": 1, "train/loss": 2.0}, {"step": 2}]
    ctx.close()


def test_a_staged_checkpoint_already_gone_is_no_error(tune_world, tmp_path, monkeypatch):
    ctx = TuneTrialContext()
    staged = ctx.checkpoint_root(None) / "step_000002"
    staged.mkdir(parents=True)
    tune_world.persisted = SimpleNamespace(path=str(tmp_path / "persisted"))
    real_report = ray.tune.report

    def moving_report(metrics, checkpoint=None):  # Tune moves the folder, not copies it
        real_report(metrics, checkpoint)
        import shutil
        shutil.rmtree(checkpoint.path)

    monkeypatch.setattr(ray.tune, "report", moving_report)
    ctx.report({"step": 2}, checkpoint_dir=staged)
    assert ctx.last_checkpoint == tmp_path / "persisted"
    ctx.close()


def test_a_context_resumes_from_tunes_checkpoint_in_its_scratch_folder(tune_world, tmp_path):
    import psutil

    ctx = TuneTrialContext()
    assert ctx.marks == {"process_start": psutil.Process().create_time()}
    assert ctx.latest_checkpoint() is None and ctx.resumed is False
    saved = tmp_path / "trial" / "checkpoint_000001"
    saved.mkdir(parents=True)
    (saved / "state.pt").write_bytes(b"x" * 100)
    tune_world.persisted = ray.tune.Checkpoint.from_directory(str(saved))
    restored = ctx.latest_checkpoint()
    assert ctx.resumed
    (scratch,) = tune_world.tmp.iterdir()
    assert scratch.name.startswith("freetf-trial-")
    assert restored == scratch / "restore"
    assert (restored / "state.pt").read_bytes() == b"x" * 100
    assert ctx.checkpoint_root(None) == scratch / "out"
    assert ctx.last_checkpoint is None
    ctx.close()
    assert list(tune_world.tmp.iterdir()) == []
    assert (saved / "state.pt").is_file()  # Tune's own copy is never touched


# ----------------------------------------------------------------------------- MLflow runs


def test_a_trials_run_is_its_oldest_child_run_of_its_key():
    runs = [_run("b", start_time=20), _run("a", start_time=10), _run("c", start_time=30)]
    client = FakeClient(runs, {"parent": _run("parent", experiment_id="42")})
    assert trainable.find_trial_run(client, "parent", "k1").info.run_id == "a"
    assert client.searches == [(["42"], "tags.`mlflow.parentRunId` = 'parent' and "
                                "tags.`freetf.trial_key` = 'k1'", 10_000)]
    client.found = []
    assert trainable.find_trial_run(client, "parent", "k1") is None


@pytest.mark.parametrize("found, warned", [(1, False), (2, True), (3, True)])
def test_several_runs_of_one_trial_are_told(caplog, found, warned):
    client = FakeClient([_run(f"r{i}", start_time=i) for i in range(found)])
    with caplog.at_level("WARNING", logger="freetf.sweeps.trainable"):
        assert trainable.find_trial_run(client, "parent", "k1").info.run_id == "r0"
    assert [r.getMessage() for r in caplog.records] == (
        [f"{found} MLflow runs for trial k1; using the oldest"] if warned else [])


def test_a_sweeps_child_runs_are_every_run_under_its_parent():
    runs = [_run("a"), _run("b")]
    client = FakeClient(runs, {"p1": _run("p1", experiment_id="3")})
    assert trainable.child_runs(client, "p1") == runs
    assert client.searches == [(["3"], "tags.`mlflow.parentRunId` = 'p1'", 10_000)]


# ----------------------------------------------------------------------------- process


def test_preloading_a_trial_process_prepares_the_stores_modules(monkeypatch):
    calls = []
    monkeypatch.setattr(freetf.tracking, "preload_store_modules", lambda: calls.append(1))
    trainable.preload_trial_libraries()
    assert calls == [1]


@pytest.mark.parametrize("cpus, threads", [(0.5, 1), (2.7, 2), (1.0, 1)])
def test_a_trial_process_takes_the_threads_of_its_whole_cpus(monkeypatch, cpus, threads):
    import torch

    cfg = load_config("freetf/configs/tiny.yaml", [f"scaling.cpus_per_worker={cpus}"])
    ended = []
    monkeypatch.setattr(freetf.tracking, "end_active_run", lambda: ended.append(1))
    before = torch.get_num_threads()
    try:
        trainable.reset_process_state(cfg)
        assert torch.get_num_threads() == threads and ended == [1]
    finally:
        torch.set_num_threads(before)


def test_a_trial_process_draws_from_its_seed_in_every_generator(monkeypatch):
    import random

    import torch

    monkeypatch.setattr(freetf.tracking, "end_active_run", lambda: None)
    before = torch.get_num_threads()
    cfg = load_config("freetf/configs/tiny.yaml", ["training.seed=5"])
    random.random(), np.random.rand(), torch.rand(2)  # an earlier trial drew from each
    try:
        trainable.reset_process_state(cfg)
        drawn = (random.random(), np.random.rand(), torch.rand(2))
    finally:
        torch.set_num_threads(before)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    fresh = (random.random(), np.random.rand(), torch.rand(2))
    assert drawn[:2] == fresh[:2] and torch.equal(drawn[2], fresh[2])
