"""Tests for freetf.sweeps.trainable: the in-trial runner, process reuse and retries."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from freetf import load_config
from freetf.sweeps.spec import load_sweep
from freetf.sweeps.sweep import run_sweep
from freetf.sweeps.trainable import reset_process_state
from freetf.training.checkpoint import load_model

pytestmark = pytest.mark.timeout(600)

SMOKE = Path(__file__).resolve().parent.parent / "freetf" / "configs" / "search_kl_smoke.yaml"


KAPPA, KL, SEED, LATENT, LR = ("training.free_bits_bits", "training.kl_weight", "training.seed",
                               "model.latent_dim", "training.learning_rate")
BOUNDARY = (KAPPA, SEED)  # the boundary search's named keys (a kl_weight of one value)


@pytest.mark.parametrize("sampled, shown, name", [
    # kappa in bits: a fraction where exact, else 3 significant digits
    ({KAPPA: 0.25, KL: 1.0, SEED: 1, LATENT: 8}, BOUNDARY, "kappa=1/4 s1"),
    ({KAPPA: 0.015625, KL: 1.0, SEED: 0, LATENT: 8}, BOUNDARY, "kappa=1/64 s0"),
    ({KAPPA: 0.375, SEED: 2}, BOUNDARY, "kappa=3/8 s2"),
    ({KAPPA: 2 ** -10, SEED: 2}, BOUNDARY, "kappa=1/1024 s2"),
    ({KAPPA: 2 ** -11, SEED: 2}, BOUNDARY, "kappa=0.000488 s2"),  # past 1/1024: digits
    ({KAPPA: 2 ** -2.5, SEED: 2}, BOUNDARY, "kappa=0.177 s2"),  # an adaptive probe
    ({KAPPA: 0.1, SEED: 0}, BOUNDARY, "kappa=0.1 s0"),  # not a binary fraction
    ({KAPPA: 1.0, SEED: 0}, BOUNDARY, "kappa=1 s0"),
    ({KAPPA: 4.0, SEED: 5}, BOUNDARY, "kappa=4 s5"),
    ({KAPPA: 2 ** 1.5, SEED: 0}, BOUNDARY, "kappa=2.83 s0"),
    ({KAPPA: np.float64(0.25), SEED: np.int64(1)}, BOUNDARY, "kappa=1/4 s1"),  # Tune's types
    # baselines: what changes a model without latent, then the seed
    ({KAPPA: 0.5, KL: 1.0, SEED: 2, LATENT: 0}, BOUNDARY, "baseline s2"),
    ({KAPPA: 0.5, KL: 0.1, LR: 1e-3, SEED: 0, LATENT: 0}, (KAPPA, KL, LR, SEED),
     "baseline learning_rate=0.001 s0"),
    # other searched keys by their param names, after kappa
    ({KAPPA: 0.25, KL: 0.1, SEED: 1, LATENT: 8}, (KAPPA, KL, SEED), "kappa=1/4 kl_weight=0.1 s1"),
    ({KAPPA: 0.25, KL: 0.1}, None, "kappa=1/4 kl_weight=0.1"),  # default: every key
    ({KL: 0.1, "training.kl_annealing.type": "linear"}, None, "kl_annealing=linear kl_weight=0.1"),
    ({KAPPA: 1.0, LATENT: 16}, (KAPPA, LATENT), "kappa=1 latent_dim=16"),
    ({KAPPA: 1.0, LATENT: 0}, (KAPPA, LATENT), "baseline"),
    ({"training.free_bits": 0.0108}, None, "free_bits_nats=0.0108"),
    # by param name, not by dotted key; a float to 3 significant digits; kappa past 1
    ({KAPPA: 1.5, KL: 0.123456, "optimizer.weight_decay": 0.01}, None,
     "kappa=1.5 kl_weight=0.123 weight_decay=0.01"),
])
def test_run_names_start_with_what_tells_the_trials_apart(sampled, shown, name):
    from freetf.sweeps.trainable import trial_run_name

    assert trial_run_name(sampled, shown) == name


def test_a_run_name_with_nothing_to_show_is_the_trials_key():
    from freetf.sweeps.trainable import trial_key, trial_run_name

    sampled = {KL: 1.0}
    assert trial_run_name(sampled, ()) == f"trial {trial_key(sampled)}"


def test_reset_process_state_gives_every_trial_a_fresh_process_state(tmp_path, monkeypatch):
    cfg = load_config("freetf/configs/tiny.yaml", ["training.seed=3", "scaling.cpus_per_worker=2"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    random.random(), np.random.rand(), torch.rand(3)  # a previous trial drew from each
    torch.set_num_threads(1)
    mlflow.start_run()  # ... and left a fluent run open
    reset_process_state(cfg)
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    assert mlflow.active_run() is None
    assert torch.get_num_threads() == 2  # a Ray Train worker holding 2 CPUs
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    fresh = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[:2] == fresh[:2] and torch.equal(drawn[2], fresh[2])


def _sweep(tmp: Path, name: str, *settings: str):
    return load_sweep(SMOKE, [
        f"storage_path={tmp / 'ray_results'}", f"report_dir={tmp / 'reports'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"mlflow.sweep_name={name}",
        "search.method=grid", "resources.trial_runner=in_trial", "search.max_concurrent_trials=1",
        "asha.enabled=false", "stopper.enabled=false", "training.max_steps=6",
        "training.log_every=2", "training.eval_every=3",
        "space.training.free_bits_bits={grid: [0.015625]}",  # the hinge is active: kl_weight
        "space.training.kl_weight={grid: [0.1, 1.0]}", *settings])  # changes the trajectory


def _children(sweep) -> dict[str, object]:
    client = MlflowClient(tracking_uri=sweep.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.base().tracking.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`freetf.sweep` = '{sweep.name}' "
                              f"and tags.`freetf.role` = 'trial'")
    return {run.data.tags["freetf.trial_key"]: run for run in runs}


def _process_starts(sweep) -> set[float]:
    """The trial processes' start times, from Tune's last result of each trial."""
    starts = set()
    for path in (Path(sweep.storage_path) / sweep.name).glob("trial-*/result.json"):
        last = json.loads(path.read_text().splitlines()[-1])
        starts.add(last["timeline/process_start"])
    return starts


@pytest.mark.ray
def test_trials_in_a_reused_process_equal_trials_in_fresh_ones(local_ray, tmp_path):
    reused = _sweep(tmp_path, "reused", "resources.reuse_actors=true")
    fresh = _sweep(tmp_path, "fresh", "resources.reuse_actors=false")
    for sweep in (reused, fresh):
        assert not run_sweep(sweep).interrupted
    assert len(_process_starts(reused)) == 1  # both trials ran in one process ...
    assert len(_process_starts(fresh)) == 2  # ... here each in its own
    reused_runs, fresh_runs = _children(reused), _children(fresh)
    assert set(reused_runs) == set(fresh_runs) and len(reused_runs) == 2
    losses = set()
    for key, run in reused_runs.items():
        assert run.info.status == "FINISHED"
        metrics, reference = run.data.metrics, fresh_runs[key].data.metrics
        for name in ("train/loss", "train/kl_nats", "eval/ce_prior_nats", "eval/kl_nats"):
            assert metrics[name] == reference[name], (key, name)
        losses.add(metrics["train/loss"])
    assert len(losses) == 2  # the two trials differ, so a leak between them would show


@pytest.mark.ray
def test_a_failed_in_trial_run_is_retried_from_its_checkpoint_in_the_same_mlflow_run(
        local_ray, tmp_path):
    sweep = _sweep(tmp_path, "retry", "training.fail_at_step=5", "checkpoint.every_steps=2",
                   "resources.max_trial_failures=1",
                   "space.training.kl_weight={grid: [1.0]}")
    result = run_sweep(sweep)
    assert not result.interrupted
    (run,) = _children(sweep).values()
    assert run.info.status == "FINISHED" and run.data.tags["freetf.outcome"] == "finished"
    assert "freetf.error" not in run.data.tags
    client = MlflowClient(tracking_uri=sweep.mlflow.tracking_uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    # steps 2, 3 (eval) and 4 logged, step 5 failed; the retry resumed at the step-4
    # checkpoint (a retry from scratch would log 2 and 3 again)
    assert sorted(steps) == [2, 3, 4, 6]
    checkpoint = Path(run.data.tags["freetf.checkpoint"])  # persisted by Tune
    assert checkpoint.is_relative_to(sweep.sweep_dir)
    _, cfg, state = load_model(checkpoint)  # self-describing, loads without Ray
    assert state["step"] == 6 and cfg.training.kl_weight == 1.0


PRELOAD_PROBE = """
import sys
from freetf import load_config
from freetf.sweeps.trainable import _finish_trial_run, preload_trial_libraries
if sys.argv[1] == "preload":
    preload_trial_libraries()
from freetf.tracking import make_tracker, mlflow_client
from freetf.training.context import TrainContext
from freetf.training.loop import train_loop
before = set(sys.modules)
cfg = load_config("freetf/configs/tiny.yaml", ["training.max_steps=2", "training.log_every=1",
                  "training.eval_every=2", "checkpoint.dir=" + sys.argv[2] + "/ckpt",
                  "tracking.mlflow.tracking_uri=sqlite:///" + sys.argv[2] + "/mlflow.db"])
client = mlflow_client(cfg.tracking.mlflow.tracking_uri)
tracker = make_tracker(cfg, run_name="probe")
context = TrainContext()
result = train_loop(cfg, context, tracker=tracker)
_finish_trial_run(tracker, client, result.metrics, None, context.history)
print("\\n".join(sorted(set(sys.modules) - before)))
"""
HEAVY = ("torch._dynamo", "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.orm",
         "alembic", "matplotlib.figure", "matplotlib.backends.backend_agg")


@pytest.mark.timeout(180)
def test_preloaded_trial_processes_import_nothing_heavy_during_a_trial(tmp_path):
    """What ``preload_trial_libraries`` loads when a worker starts is all a trial's
    tracking, optimizer and figures import: a trial right after it imports none of it
    (the same trial in a cold process does, so the probe sees the imports)."""
    import subprocess
    import sys

    def imported_during_trial(mode: str) -> set[str]:
        (tmp_path / mode).mkdir()  # the driver has made the store: tables and migrations
        MlflowClient(f"sqlite:///{tmp_path / mode}/mlflow.db").search_experiments()
        out = subprocess.run([sys.executable, "-c", PRELOAD_PROBE, mode, str(tmp_path / mode)],
                             capture_output=True, text=True, check=True, timeout=150)
        return set(out.stdout.split())

    cold, warm = imported_during_trial("cold"), imported_during_trial("preload")
    assert set(HEAVY) <= cold
    assert not {name for name in warm if name.startswith(HEAVY)}
