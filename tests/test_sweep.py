"""Tests for freetf.sweep: the spec, the stopper, and real sweeps (Ray Tune + Ray Train +
a sqlite MLflow store): the smoke sweep end to end, and resume after a Ctrl-C."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow import MlflowClient

from freetf.evaluation.diagnostics import VERDICTS
from freetf.results import report
from freetf.sweeps import sweep as sweep_mod
from freetf.sweeps.runs import space_params
from freetf.sweeps.sweep import (
    CollapseStopper,
    StopperSpec,
    SweepError,
    TrialContext,
    ended_trials,
    load_sweep,
    run_sweep,
    trial_key,
    trial_run_name,
)
from freetf.sweeps.trainable import kappa_text
from freetf.tracking import verdict_code

pytestmark = pytest.mark.timeout(600)

CONFIGS = Path(__file__).resolve().parent.parent / "freetf" / "configs"
DEFAULT, SMOKE = CONFIGS / "search_kl.yaml", CONFIGS / "search_kl_smoke.yaml"
# The smoke file as a grid with ASHA and the stopper (it ships as a boundary search).
GRID = ["search.method=grid", "space.training.free_bits_bits={grid: [0.015625, 1.0, 4.0]}",
        "asha.enabled=true", "stopper.enabled=true", "resources.cpus_per_worker=0.99"]


# ----------------------------------------------------------------------------- spec


def test_shipped_sweeps_load():
    default = load_sweep(DEFAULT)
    assert default.search.method == "boundary" and default.boundary.seeds >= 3
    assert default.settings == [{"training.kl_weight": 1.0}]
    # one baseline per seed, then every probe with every seed
    assert default.expected_trials == default.boundary.seeds * (1 + default.boundary.probes)
    keys = {d.key for d in default.space}
    assert {"training.kl_weight", "training.free_bits_bits"} <= keys
    assert default.trial_keys[-2:] == ("training.seed", "model.latent_dim")
    smoke = load_sweep(SMOKE)
    assert smoke.search.method == "boundary" and smoke.expected_trials == 6
    grid = load_sweep(SMOKE, GRID)
    assert 2 <= grid.expected_trials <= 4 and grid.trial_keys == tuple(d.key for d in grid.space)
    assert smoke.base().training.max_steps <= 20


def test_resources_take_the_scaling_names_and_the_old_ones_still_work(tmp_path, caplog,
                                                                     monkeypatch):
    """``resources.cpus_per_worker`` overrides ``scaling.cpus_per_worker`` (it was
    ``worker_cpu``; ``trial_cpu`` and ``worker_gpu`` alike): an old name in ``--set``
    replaces the shipped file's value, in a file it is read, both in one file is refused."""
    # each old name is warned about once a process: forget those an earlier test named
    monkeypatch.setattr("freetf.config.tree._SAID", set())
    new = load_sweep(SMOKE, ["resources.cpus_per_worker=0.5", "resources.cpus_per_trial=0.02"])
    old = load_sweep(SMOKE, ["resources.worker_cpu=0.5", "resources.trial_cpu=0.02"])
    assert new.resources == old.resources and new.base().scaling.cpus_per_worker == 0.5
    assert load_sweep(SMOKE, ["resources.worker_gpu=0.25"]).resources.gpus_per_worker == 0.25
    assert "resources.worker_gpu is now called resources.gpus_per_worker" in caplog.text
    spec = tmp_path / "old.yaml"
    spec.write_text(f"base_config: {SMOKE.parent / 'tiny.yaml'}\n"
                    "space: {training.kl_weight: [1.0]}\nresources: {worker_cpu: 0.5}\n")
    assert load_sweep(spec).resources.cpus_per_worker == 0.5
    spec.write_text(spec.read_text().replace("{worker_cpu: 0.5}",
                                             "{worker_cpu: 0.5, cpus_per_worker: 0.5}"))
    with pytest.raises(SweepError, match="give only resources.cpus_per_worker"):
        load_sweep(spec)


@pytest.mark.parametrize("setting, message", [
    ("asha.enabled=true", "asha.enabled=false"),
    ("space.training.seed=[0, 1]", "space.training.seed: the boundary search sets it"),
    ("space.training.kl_weight={loguniform: [0.01, 1]}", "the other keys must be grids"),
    ("boundary.seeds=1", "boundary.seeds=1 must be >= 2"),
    ("boundary.key=training.kl_weight", "a range of values > 0"),
    ("model.latent_dim=0", "needs a Free Transformer"),
    ("boundary.targets=[leak, leak]", "boundary.targets=['leak', 'leak']: one or more of"),
    ("boundary.targets=[position, phase]", "collapse, leak, position, noise, broken"),
    ("boundary.targets=[]", "each once"),
])
def test_boundary_spec_errors_name_the_key(setting, message):
    with pytest.raises(SweepError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_sweep(SMOKE, [setting])


def test_set_routes_to_space_sweep_and_base():
    sweep = load_sweep(SMOKE, [*GRID, "space.training.seed={grid: [0, 1]}", "search.seed=3",
                               "training.max_steps=12", "asha.grace_period=5"])
    assert {d.key: d.values for d in sweep.space}["training.seed"] == (0, 1)
    assert sweep.search.seed == 3 and sweep.asha.grace_period == 5
    assert sweep.base().training.max_steps == 12
    assert sweep.expected_trials == 2 * load_sweep(SMOKE, GRID).expected_trials


@pytest.mark.parametrize("setting, message", [
    ("space.training.kl_wieght=[1.0]", "space.training.kl_wieght is not a config key"),
    ("space.training.kl_annealing.type=[none]", "training.kl_annealing.type='none'"),
    ("space.training.kl_weight={loguniform: [0, 1]}", "space.training.kl_weight"),
    ("space.training.kl_weight={normal: [0, 1]}", "space.training.kl_weight"),
    ("search.methd=random", "search.methd"),
    ("asha.grace_period=500", "asha.grace_period=500"),
    ("reports=x", "base config: unknown config key reports"),
    ("space.model.hidden_dim=[33]", "space.model.hidden_dim"),
    ("resources.num_workers=0", "num_workers >= 1"),
])
def test_spec_errors_name_the_key(setting, message):
    with pytest.raises(SweepError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_sweep(SMOKE, [*GRID, setting])


def test_unknown_top_level_key_in_the_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SMOKE.read_text().replace("base_config: tiny.yaml",
                                              f"base_config: {CONFIGS / 'tiny.yaml'}")
                    + "\nreports: x\n")
    with pytest.raises(SweepError, match="unknown sweep key reports"):
        load_sweep(path)


def test_grid_repeats_and_distributions_need_random_search():
    with pytest.raises(SweepError, match="put seeds in the space"):
        load_sweep(SMOKE, [*GRID, "search.num_samples=2"])
    with pytest.raises(SweepError, match="search.method=grid"):
        load_sweep(SMOKE, [*GRID, "space.training.kl_weight={loguniform: [0.01, 1]}"])
    sweep = load_sweep(SMOKE, [*GRID, "search.method=random", "search.num_samples=5",
                               "space.training.kl_weight={loguniform: [0.01, 1]}"])
    assert sweep.expected_trials == 5 * 3  # num_samples per free-bits grid point


def test_optuna_without_optuna_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(SweepError, match=r"pip install 'freetf\[optuna\]'"):
        load_sweep(SMOKE, [*GRID, "search.method=optuna", "search.num_samples=4"])


def test_searching_free_bits_in_nats_clears_the_bits_setting(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base_config: {CONFIGS / 'tiny.yaml'}\n"  # sets free_bits_bits: 0.5
                    "space:\n  training.free_bits: {grid: [0.1, 0.7]}\n")
    sweep = load_sweep(path)
    assert sweep.overrides["training.free_bits_bits"] is None
    cfg = sweep.base().replace({"training.free_bits": 0.1})
    assert cfg.training.free_bits_nats == pytest.approx(0.1)
    with pytest.raises(SweepError, match="both training.free_bits"):
        load_sweep(SMOKE, [*GRID, "space.training.free_bits=[0.1, 0.7]"])


def test_trial_keys_and_names_are_stable():
    a = {"training.kl_weight": np.float64(0.1), "training.free_bits_bits": 0.25}
    b = {"training.free_bits_bits": 0.25, "training.kl_weight": 0.1}
    assert trial_key(a) == trial_key(b)
    assert trial_key(a) != trial_key({**b, "training.kl_weight": 1.0})
    assert trial_run_name(a) == trial_run_name(b) == "kappa=1/4 kl_weight=0.1"


@pytest.mark.parametrize("spec, settings, named", [
    (DEFAULT, [], ("training.free_bits_bits", "training.seed")),  # kl_weight: one value
    (SMOKE, GRID, ("training.free_bits_bits",)),
    (SMOKE, [*GRID, "space.training.kl_weight={grid: [0.1, 1.0]}",
             "space.training.seed={grid: [0, 1]}"],
     ("training.free_bits_bits", "training.kl_weight", "training.seed")),
])
def test_run_names_show_the_keys_whose_values_differ(spec, settings, named):
    """SweepConfig.named_keys: what a trial's run name shows; the context carries them."""
    sweep = load_sweep(spec, settings)
    assert sweep.named_keys == named
    context = TrialContext(sweep_name="s", parent_run_id="p", tracking_uri="sqlite:///x",
                           base=sweep.base().to_dict(), keys=sweep.trial_keys,
                           train_storage="/tmp", controller_failure_limit=1,
                           named_keys=sweep.named_keys)
    sampled = {"training.free_bits_bits": 0.25, "training.kl_weight": 1.0, "training.seed": 1,
               "model.latent_dim": 4}
    sampled = {k: v for k, v in sampled.items() if k in sweep.trial_keys}
    name = context.trial_config(sampled).tracking.mlflow.run_name
    assert name == trial_run_name(sampled, named) and name.startswith("kappa=1/4")


def _context(max_steps: int = 100) -> TrialContext:
    return TrialContext(sweep_name="s", parent_run_id="p", tracking_uri="sqlite:///x",
                        base={"training": {"max_steps": max_steps}},
                        keys=("training.kl_weight",), train_storage="/tmp",
                        controller_failure_limit=1)


def test_a_store_that_refuses_the_view_does_not_fail_the_sweep(caplog):
    """The saved view is a convenience: a finished sweep prints the plain link instead."""
    from types import SimpleNamespace

    def refuse(*args):
        raise RuntimeError("tag value too long")

    client = SimpleNamespace(get_run=lambda run_id: SimpleNamespace(
        info=SimpleNamespace(experiment_id="1")), set_experiment_tag=refuse)
    assert sweep_mod._save_view(client, "p", load_sweep(SMOKE)) is None
    assert "could not save the sweep's MLflow view: tag value too long" in caplog.text


def test_stopper_stops_collapse_after_patience_and_divergence():
    spec = StopperSpec(collapse_after_steps=20, collapse_kl_nats=0.01, collapse_patience=2,
                       diverge_loss=10.0)
    stopper = CollapseStopper(spec, _context())
    config = {"training.kl_weight": 1.0}

    def report(trial, step, kl, loss=2.0):
        result = {"step": step, "train/kl_nats": kl, "train/loss": loss, "config": config}
        return stopper(trial, result), result.get(sweep_mod.STOP_REASON)

    assert report("a", 10, 0.0) == (False, None)  # too early
    assert report("a", 20, 0.001) == (False, None)  # 1 of 2
    assert report("a", 30, 0.5) == (False, None)  # resets
    assert report("a", 40, 0.001) == (False, None)
    assert report("a", 50, 0.001) == (True, "low_kl")
    assert report("b", 5, 0.5, loss=math.nan) == (True, "diverged")
    assert report("c", 5, 0.5, loss=11.0) == (True, "diverged")
    assert report("d", 100, 0.001, loss=math.inf) == (False, None)  # the final report
    assert not stopper.stop_all()


def test_concurrency_follows_the_cluster(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    base = load_sweep(SMOKE, GRID).base()
    for workers, cpus, expected in ((1, 0.49, 4), (1, 0.99, 2), (2, 0.99, 1), (1, 1.0, 1)):
        cfg = base.replace({"scaling.num_workers": workers, "scaling.cpus_per_worker": cpus})
        assert sweep_mod.max_concurrent_trials(cfg, cpus_per_trial=0.01) == expected


def test_concurrency_follows_the_gpus_shared_by_fractional_workers(monkeypatch):
    """resources.gpus_per_worker=0.25 puts four workers on a GPU: trials at once are
    min(CPUs / CPUs per trial, GPUs / GPUs per trial)."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    for workers, gpu, cpu, expected in ((1, 0.25, 1.0, 8), (2, 0.25, 1.0, 4), (2, 1, 1.0, 1),
                                        (1, 0.25, 3.0, 5), (1, 0.5, 0.5, 4)):
        sweep = load_sweep(SMOKE, [*GRID, f"resources.num_workers={workers}",
                                   f"resources.gpus_per_worker={gpu}",
                                   f"resources.cpus_per_worker={cpu}"])
        base = sweep.base()
        assert base.scaling.use_gpu and base.scaling.gpus_per_worker == gpu
        assert sweep.trial_runner(base) == "train"
        assert sweep_mod.max_concurrent_trials(base, cpus_per_trial=0.01) == expected, \
            (workers, gpu)
    for bad in ("0", "1.5"):
        with pytest.raises(SweepError, match="resources.gpus_per_worker"):
            load_sweep(SMOKE, [f"resources.gpus_per_worker={bad}"])


def test_fsdp_trials_run_under_a_torch_trainer():
    sweep = load_sweep(SMOKE, ["scaling.strategy=fsdp"])
    assert sweep.trial_runner(sweep.base()) == "train"
    with pytest.raises(SweepError, match="resources.trial_runner=train"):
        load_sweep(SMOKE, ["scaling.strategy=fsdp", "resources.trial_runner=in_trial"])


def test_trial_runner_auto_runs_one_cpu_worker_in_the_trial_and_more_under_train():
    one = load_sweep(SMOKE)
    assert one.trial_runner(one.base()) == "in_trial"
    # the trial runs the loop
    expected = one.resources.cpus_per_trial + one.resources.cpus_per_worker
    assert sweep_mod.trial_resources(one, one.base()) == {"cpu": pytest.approx(expected)}
    two = load_sweep(SMOKE, ["resources.num_workers=2", "resources.cpus_per_worker=0.5"])
    assert two.trial_runner(two.base()) == "train"
    assert sweep_mod.trial_resources(two, two.base()) == {"cpu": 0.01}
    gpu = load_sweep(SMOKE, ["scaling.use_gpu=true"])
    assert gpu.trial_runner(gpu.base()) == "train"
    forced = load_sweep(SMOKE, ["resources.trial_runner=train"])
    assert forced.trial_runner(forced.base()) == "train"
    forced_gpu = load_sweep(SMOKE, ["scaling.use_gpu=true", "resources.trial_runner=in_trial"])
    assert sweep_mod.trial_resources(forced_gpu, forced_gpu.base()) == {
        "cpu": pytest.approx(expected), "gpu": forced_gpu.base().scaling.gpus_per_worker}
    with pytest.raises(SweepError, match="trial_runner=in_trial runs one worker"):
        load_sweep(SMOKE, ["resources.num_workers=2", "resources.trial_runner=in_trial"])
    with pytest.raises(SweepError, match="resources.trial_runner"):
        load_sweep(SMOKE, ["resources.trial_runner=inside"])


# ----------------------------------------------------------------------------- end to end




def _smoke(tmp: Path, *extra: str):
    return load_sweep(SMOKE, [f"storage_path={tmp / 'ray_results'}",
                              f"report_dir={tmp / 'reports'}",
                              f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra])


def _runs(sweep) -> tuple[MlflowClient, object, list]:
    uri = sweep.mlflow.tracking_uri
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(sweep.base().tracking.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("freetf.role") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("freetf.role") == "trial"]
    return client, parents[0], children


def _interrupt_after_first_finished_trial(sweep, stop: threading.Event,
                                          signum=signal.SIGINT) -> None:
    """Ctrl-C (SIGINT to this process), or ``signum``, once one trial run has FINISHED."""
    client = MlflowClient(tracking_uri=sweep.mlflow.tracking_uri)
    experiment_name = sweep.base().tracking.mlflow.experiment
    while not stop.is_set():
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None and client.search_runs(
                [experiment.experiment_id],
                "tags.`freetf.role` = 'trial' and attributes.status = 'FINISHED'"):
            os.kill(os.getpid(), signum)
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def smoke_sweep(local_ray, tmp_path_factory):
    sweep = _smoke(tmp_path_factory.mktemp("smoke"), *GRID)
    start = time.perf_counter()
    result = run_sweep(sweep)
    return sweep, result, time.perf_counter() - start


@pytest.mark.ray
def test_smoke_sweep_end_to_end(smoke_sweep):
    sweep, result, wall_s = smoke_sweep
    print(f"smoke sweep: {wall_s:.0f} s\n{report.collapse_table(result.runs)}")
    assert not result.interrupted
    client, parent, children = _runs(sweep)
    assert parent.info.status == "FINISHED" and parent.info.run_name == sweep.name
    assert parent.info.run_id == result.parent_run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.yaml", "config.yaml", "report"} <= artifacts
    assert {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")} == \
        {"collapse_map.png", "kl_traces.png", "collapse_table.md", "trials.csv",
         "kl_vs_kappa.png", "trial_curves.png", "boundaries.md", "boundaries.json",
         "verdicts.csv", "phase_diagram.png"}
    assert not result.analysis.boundaries  # no baselines in a grid without them
    assert parent.data.params == space_params(sweep)  # the search space, not the base config
    assert parent.data.metrics["sweep/trials"] == sweep.expected_trials
    assert sum(v for k, v in parent.data.metrics.items() if k.startswith("sweep/trials_")
               and k != "sweep/trials_stopped_early") == sweep.expected_trials
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    assert len(children) == sweep.expected_trials
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["freetf.sweep"] == sweep.name
        if tags.get("freetf.stop_reason") != "low_kl":  # the stopper's KL test: no verdict
            assert tags["freetf.verdict"] in VERDICTS
        sampled = json.loads(tags["freetf.sampled"])  # the grid's only varying key: kappa
        assert child.info.run_name == f"kappa={kappa_text(sampled['training.free_bits_bits'])}"
        assert {"free_bits_bits", "log2_free_bits_bits", "kl_weight", "seed", "latent_dim",
                "max_steps"} <= set(params) and len(params) < 25  # not the whole config
        assert json.loads(tags["freetf.config"])["training.max_steps"] == \
            sweep.base().training.max_steps
        if "freetf.verdict" in tags:
            assert metrics["eval/verdict_code"] == verdict_code(tags["freetf.verdict"])
        assert {"train/loss", "train/kl_nats", "train/kl_weight", "eval/ce_prior_nats",
                "eval/ce_gap_nats", "eval/kl_nats", "eval/active_bits"} <= set(metrics)
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 2
        if tags["freetf.stopped_early"] == "true":
            assert child.info.status == "KILLED" and tags["freetf.outcome"] == "stopped"
            assert tags["freetf.stop_reason"] in ("low_kl", "diverged", "asha")
            assert int(tags["freetf.stopped_at_step"]) < sweep.base().training.max_steps
        else:
            assert child.info.status == "FINISHED", tags.get("freetf.error")
            assert tags["freetf.outcome"] == "finished"
            assert metrics["train/steps_done"] == sweep.base().training.max_steps
            assert "step" not in metrics
            assert "samples.txt" in {a.path for a in client.list_artifacts(child.info.run_id)}
    # The smoke grid holds kappa = 1/64 bit: the stopper ends it for its low KL at step 15,
    # before ASHA's rung; ASHA may stop others there.  The stopper's test is not a verdict.
    tiny = [c for c in children if c.data.params["free_bits_bits"] == "0.015625"]
    assert len(tiny) == 1
    assert tiny[0].data.tags["freetf.stopped_early"] == "true"
    assert tiny[0].data.tags["freetf.stop_reason"] == "low_kl"
    assert tiny[0].data.tags["freetf.outcome"] == "stopped"
    assert "freetf.verdict" not in tiny[0].data.tags

    assert len(result.runs) == len(children)
    assert set(result.runs["verdict"]) <= {*VERDICTS, ""}
    for name in ("map", "kl_traces", "table", "csv"):
        assert result.report[name].is_file()
    assert result.report["map"].parent == sweep.report_path


def test_run_sweep_leaves_the_environment_as_it_found_it(tmp_path, monkeypatch):
    """Tune's settings hold while the sweep runs, not in the calling process after it."""
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    monkeypatch.delenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", raising=False)
    seen = []
    monkeypatch.setattr(sweep_mod, "_run_sweep", lambda *a: seen.append(
        (os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING"),
         os.environ.get("RAY_AIR_NEW_OUTPUT"))) or "result")
    sweep = _smoke(tmp_path)
    assert run_sweep(sweep) == "result" and run_sweep(sweep, verbose=True) == "result"
    assert seen == [("1", "0"), ("1", "1")]
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert "TUNE_DISABLE_STRICT_METRIC_CHECKING" not in os.environ
    with pytest.raises(RuntimeError), sweep_mod.environment({"RAY_AIR_NEW_OUTPUT": "0"}):
        raise RuntimeError  # restored on the way out of an error too
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


@pytest.mark.ray
def test_a_finished_sweep_name_is_not_reused(smoke_sweep):
    sweep, _, _ = smoke_sweep
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(sweep)
    with pytest.raises(SweepError, match="nothing to resume"):
        run_sweep(dataclasses.replace(sweep, storage_path=str(Path(sweep.storage_path) / "x")),
                  resume=True)


@pytest.mark.ray
@pytest.mark.heavy  # a second sweep, run twice: about 2 minutes on 2 cores
@pytest.mark.parametrize("method", ["grid", "boundary"])
def test_resume_after_ctrl_c_does_not_duplicate_trials(local_ray, tmp_path, method,
                                                       signame="SIGINT"):
    """Both the variant generator and the boundary searcher (its saved state) resume.
    One trial at a time, long enough that the Ctrl-C lands while a later one runs."""
    sweep = _smoke(tmp_path, *(GRID if method == "grid" else []),
                   "search.max_concurrent_trials=1", "training.max_steps=200",
                   "asha.enabled=false")
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_after_first_finished_trial,
                               args=(sweep, stop, getattr(signal, signame)), daemon=True)
    watcher.start()
    try:
        first = run_sweep(sweep)
    finally:
        stop.set()
    assert first.interrupted, "the sweep ended before the Ctrl-C landed"
    assert first.terminated == (signame == "SIGTERM")
    _, parent, children = _runs(sweep)
    assert parent.info.status == "KILLED"
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    for child in children:  # cut off: how it ended, and no verdict
        if child.info.status == "KILLED" and child.data.tags["freetf.stopped_early"] != "true":
            assert child.data.tags["freetf.outcome"] == "interrupted"
            assert "freetf.verdict" not in child.data.tags
    before = {c.data.tags["freetf.trial_key"]: c.info.run_id for c in children}
    finished = {c.data.tags["freetf.trial_key"] for c in children
                if c.info.status == "FINISHED"}
    assert 1 <= len(finished) < sweep.expected_trials

    second = run_sweep(sweep, resume=True)
    assert not second.interrupted
    client, parent, children = _runs(sweep)
    assert parent.info.run_id == first.parent_run_id == second.parent_run_id
    assert parent.info.status == "FINISHED"
    keys = [c.data.tags["freetf.trial_key"] for c in children]
    assert len(keys) == len(set(keys)) == sweep.expected_trials
    for key, run_id in before.items():  # interrupted runs were reattached, not duplicated
        assert [c.info.run_id for c in children if c.data.tags["freetf.trial_key"] == key] \
            == [run_id]
    log_every, max_steps = sweep.base().training.log_every, sweep.base().training.max_steps
    for child in children:
        if child.data.tags.get("freetf.stop_reason") != "low_kl":
            assert child.data.tags["freetf.verdict"] in (*VERDICTS, "used")
        assert child.data.tags["freetf.outcome"] in ("finished", "stopped")
        assert child.info.status == ("KILLED" if child.data.tags["freetf.stopped_early"] == "true"
                                     else "FINISHED")
        if child.data.tags["freetf.trial_key"] in finished:  # not rerun, nothing relogged
            history = client.get_metric_history(child.info.run_id, "train/loss")
            assert sorted(m.step for m in history) == list(
                range(log_every, max_steps + 1, log_every))
    assert len(second.runs) == sweep.expected_trials


@pytest.mark.ray
@pytest.mark.heavy
def test_resume_after_sigterm_does_not_duplicate_trials(local_ray, tmp_path):
    """SIGTERM (a scheduler's stop) ends a sweep as Ctrl-C does: Tune saves its state,
    the runs are closed, and the resumed sweep reattaches them (before: Ray's SIGTERM
    handler ended the driver at once)."""
    test_resume_after_ctrl_c_does_not_duplicate_trials(local_ray, tmp_path, "grid", "SIGTERM")


@pytest.mark.ray
def test_boundary_smoke_sweep_has_baselines_verdicts_and_boundaries(local_ray, tmp_path):
    """The shipped smoke sweep (the default's boundary search, small) end to end."""
    sweep = _smoke(tmp_path)
    start = time.perf_counter()
    result = run_sweep(sweep)
    print(f"boundary smoke sweep: {time.perf_counter() - start:.0f} s")
    assert not result.interrupted
    client, parent, children = _runs(sweep)
    assert len(children) == sweep.expected_trials == 6
    baselines = [c for c in children if c.data.params["latent_dim"] == "0"]
    assert sorted(c.data.params["seed"] for c in baselines) == ["0", "1"]
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED", tags.get("freetf.error")
        assert "eval/valid_rate" in child.data.metrics  # the synthetic task
        if child in baselines:
            assert tags["freetf.verdict"] == "baseline"
        else:  # judged against its seed's baseline
            assert tags["freetf.verdict"] in ("collapsed", "used", "leaking")
            assert tags["freetf.verdict_fixed"] in VERDICTS
            assert "eval/cost_nats" in child.data.metrics
    (found,) = result.analysis.boundaries
    metrics = parent.data.metrics
    for name, fit in (("kappa_c", found.collapse), ("kappa_l", found.leak)):
        assert metrics[f"boundary/{name}_bits"] == pytest.approx(fit.bits[0])
        assert metrics[f"boundary/{name}_low_bits"] <= metrics[f"boundary/{name}_high_bits"]
        assert parent.data.tags[f"freetf.{name}"] == fit.text() + " [unconverged baselines]"
    assert metrics["boundary/converged"] == 0.0  # 20 steps: far above the task's floor
    assert not result.analysis.converged
    reports = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"phase_diagram.png", "boundaries.md", "boundaries.json"} <= reports
    assert (sweep.report_path / "phase_diagram.png").is_file()


def test_a_trial_counts_as_ended_if_tune_or_mlflow_says_so():
    """Ctrl-C can land between a trial closing its MLflow run and Tune seeing it end."""
    from types import SimpleNamespace

    def result(kl_weight, metrics=None, error=None):
        return SimpleNamespace(config={"training.kl_weight": kl_weight}, metrics=metrics,
                               error=error)

    keys = ("training.kl_weight",)
    results = [result(0.1, {"done": True}), result(0.2, error=RuntimeError("x")),
               result(0.3, {"step": 20}), result(0.4, {"step": 5}), result(0.5)]
    finished_in_mlflow = {trial_key({"training.kl_weight": 0.3})}
    assert ended_trials(results, keys, set()) == 2
    assert ended_trials(results, keys, finished_in_mlflow) == 3
