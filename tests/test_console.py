"""Tests for freetf.sweeps.console: what a sweep prints, and what it keeps quiet."""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from freetf.sweeps.console import QUIET_LOGGERS, SweepConsole, setup_console
from freetf.sweeps.spec import STOP_REASON, load_sweep

ROOT = Path(__file__).resolve().parent.parent
GRID8 = ROOT / "bench" / "search_kl_grid8.yaml"
SMOKE_BOUNDARY = ROOT / "freetf" / "configs" / "search_kl_smoke.yaml"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _console(verbose: bool = False, status_every_s: float = 60.0, *settings: str):
    sweep = load_sweep(GRID8, list(settings))
    stream, clock = io.StringIO(), Clock()
    console = SweepConsole(sweep, sweep.base(), verbose=verbose, stream=stream,
                           status_every_s=status_every_s, clock=clock)
    return console, stream, clock


def _trial(trial_id: str, kappa_bits: float, kl_weight: float):
    return SimpleNamespace(trial_id=trial_id, config={"training.free_bits_bits": kappa_bits,
                                                      "training.kl_weight": kl_weight})


def _run_grid(console: SweepConsole, clock: Clock) -> None:
    """The 8-trial grid, two at a time, 300 steps reported every 10 (2 s apart)."""
    points = [(k, w) for k in (0.015625, 0.25, 1.0, 4.0) for w in (0.1, 1.0)]
    for pair in range(0, 8, 2):
        trials = [_trial(f"t{pair + i}", *points[pair + i]) for i in range(2)]
        for trial in trials:
            console.on_trial_start(0, [], trial)
        for step in range(10, 301, 10):
            clock.now += 2.0
            for trial in trials:
                console.on_trial_result(0, [], trial, {
                    "step": step, "train/loss": 1.0, "train/grad_norm": 3.0, "train/lr": 1e-3,
                    "train/kl_bits": 0.5, **({"eval/use_nats": 0.25, "eval/kl_bits": 0.75,
                                              "eval/valid_rate": 0.9,
                                              "eval/verdict": "used"} if step % 50 == 0
                                             else {})})
        for trial in trials:
            console.on_trial_complete(0, [], trial)


def test_grid_sweep_prints_one_line_per_trial_and_tables_at_doubling_intervals():
    console, stream, clock = _console()
    _run_grid(console, clock)
    lines = stream.getvalue().splitlines()
    ended = [line for line in lines if line.startswith("[")]
    assert len(ended) == 8
    assert ended[0].startswith("[1/8 trials ended, ")
    # measurements, no verdict word (a verdict needs the baseline: the summary's)
    assert "kappa 0.0156 bits, kl_weight 0.1, seed 0: ended at step 300, KL 0.75 bits, " \
           "use 0.25 nats, valid 0.9" in ended[0]
    assert "used" not in stream.getvalue()
    assert ended[-1].startswith("[8/8 trials ended, 4m00s elapsed]")
    # 240 s of reports: tables (progress + header + 2 running trials) after 60 and 180 s
    tables = [i for i, line in enumerate(lines) if line.startswith("  kappa bits")]
    assert len(tables) == 2
    assert lines[tables[0] - 1].startswith("0/8 trials ended, 1m00s elapsed, about 3m04s left")
    assert lines[tables[1] - 1].startswith("4/8 trials ended, 3m00s elapsed")
    assert lines[tables[0]].split() == ["kappa", "bits", "kl_weight", "seed", "step", "KL",
                                        "bits", "use", "nats", "state"]
    assert len(lines) == 8 + 2 * 4
    text = stream.getvalue()
    for chatter in ("train/loss", "grad_norm", "train/lr", "lr "):
        assert chatter not in text


def test_status_tables_of_a_long_sweep_thin_out_to_one_per_five_minutes():
    console, stream, clock = _console()
    trial = _trial("t", 1.0, 1.0)
    console.on_trial_start(0, [], trial)
    for step in range(1, 3601):  # an hour of reports, one a second
        clock.now += 1.0
        console.on_trial_result(0, [], trial, {"step": step % 300})
    tables = [line for line in stream.getvalue().splitlines() if "elapsed" in line]
    # after 1, 3, 7 and 12 minutes, then every 5: 16 tables in the hour, not 60
    assert [t.split(", ")[1] for t in tables[:5]] == [
        "1m00s elapsed", "3m00s elapsed", "7m00s elapsed", "12m00s elapsed", "17m00s elapsed"]
    assert len(tables) == 4 + (60 - 12) // 5


def test_progress_estimates_the_time_left_from_the_steps_trained():
    console, stream, clock = _console(False, 1e9)
    a, b = _trial("a", 1.0, 0.1), _trial("b", 1.0, 1.0)
    console.on_trial_start(0, [], a)
    console.on_trial_start(0, [], b)
    clock.now = 100.0
    console.on_trial_result(0, [], a, {"step": 300})
    console.on_trial_result(0, [], b, {"step": 150})
    console.on_trial_complete(0, [], a)
    # 1.5 of 8 trials' steps in 100 s: 6.5 more take 433 s
    assert stream.getvalue().startswith("[1/8 trials ended, 1m40s elapsed, about 7m13s left]")
    assert console.progress().endswith("about 7m13s left")
    assert stream.getvalue().endswith("kappa 1 bits, kl_weight 0.1, seed 0: ended at step 300\n")


def test_stopped_failed_and_baseline_trials_say_so():
    console, stream, clock = _console()
    stopped, failed = _trial("s", 0.015625, 1.0), _trial("f", 4.0, 1.0)
    baseline = SimpleNamespace(trial_id="b", config={"model.latent_dim": 0})
    console.keys += ("model.latent_dim",)
    failed.config["model.latent_dim"] = 8
    for trial in (stopped, failed, baseline):
        console.on_trial_start(0, [], trial)
    console.on_trial_result(0, [], stopped, {"step": 170, "train/kl_bits": 0.001,
                                             STOP_REASON: "low_kl"})
    console.on_trial_complete(0, [], stopped)
    console.on_trial_error(0, [], failed)
    console.on_trial_result(0, [], baseline, {"step": 300, "eval/verdict": "baseline"})
    console.on_trial_complete(0, [], baseline)
    lines = stream.getvalue().splitlines()
    assert "low_kl (stopped) at step 170, KL 0.001 bits" in lines[0]
    assert "kappa 4 bits, kl_weight 1, seed 0, latent_dim=8: failed at step 0" in lines[1]
    assert "baseline, kl_weight 1, seed 0, latent_dim=0: ended at step 300" in lines[2]


def test_a_trial_ended_early_without_a_reason_says_it_was_stopped():
    """ASHA stops a trial without a reason of the stopper's: "ended (stopped)", not the
    table's empty state "-"."""
    console, stream, clock = _console()
    trial = _trial("t", 1.0, 0.1)
    console.on_trial_start(0, [], trial)
    console.on_trial_result(0, [], trial, {"step": 120, "eval/kl_bits": 0.5})
    console.on_trial_complete(0, [], trial)
    assert stream.getvalue().endswith(
        "] kappa 1 bits, kl_weight 0.1, seed 0: ended (stopped) at step 120, KL 0.5 bits\n")


def test_verbose_leaves_the_console_to_ray():
    console, stream, clock = _console(verbose=True)
    _run_grid(console, clock)
    assert stream.getvalue() == ""


@pytest.fixture
def _restore_logger_levels():
    saved = {name: logging.getLogger(name).level for name in (*QUIET_LOGGERS, "freetf")}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("_restore_logger_levels")
def test_quiet_console_silences_ray_and_mlflow_but_not_freetf():
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    setup_console(verbose=False)
    assert not logging.getLogger("ray.tune.tune").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("ray.train.v2").isEnabledFor(logging.INFO)
    assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    assert not logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.INFO)
    assert logging.getLogger("ray.tune").isEnabledFor(logging.ERROR)
    assert logging.getLogger("freetf.sweeps.sweep").isEnabledFor(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    setup_console(verbose=True)
    assert logging.getLogger("ray.tune.tune").isEnabledFor(logging.INFO)
    assert logging.getLogger("freetf.sweeps.sweep").isEnabledFor(logging.DEBUG)


@pytest.mark.heavy  # a real smoke sweep in a subprocess: about a minute on 2 cores
@pytest.mark.ray
def test_smoke_sweep_console_is_short_and_free_of_ray_chatter(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(ROOT / "tune" / "search_kl.py"), "--smoke"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    lines = output.splitlines()
    assert len(lines) <= 40, output
    for chatter in ("Reporting training result", "Trial status", "PreemptionWatcher",
                    "RayTrainWorker", "Configuration for experiment", "mlflow.store"):
        assert chatter not in output
    # one line per trial of the smoke boundary search (2 baselines + 2 probes x 2 seeds)
    assert sum(line.startswith("[") and "trials ended" in line for line in lines) == 6


def test_boundary_search_lines_show_each_trials_seed_and_baselines_without_kappa():
    """The boundary searcher adds the seed and the latent size to a trial's config."""
    sweep = load_sweep(SMOKE_BOUNDARY)
    stream = io.StringIO()
    console = SweepConsole(sweep, sweep.base(), stream=stream, clock=Clock())
    trials = [SimpleNamespace(trial_id=f"t{seed}", config={
        "training.free_bits_bits": 0.25, "training.kl_weight": 1.0, "training.seed": seed,
        "model.latent_dim": latent}) for seed, latent in ((0, 0), (2, 8))]
    for trial, verdict in zip(trials, ("baseline", "active"), strict=True):
        console.on_trial_start(0, [], trial)
        console.on_trial_result(0, [], trial, {"step": 20, "eval/verdict": verdict})
        console.on_trial_complete(0, [], trial)
    baseline, ft = [line for line in stream.getvalue().splitlines() if line.startswith("[")]
    assert "seed 0, latent_dim=0: ended" in baseline and "kappa" not in baseline
    assert "kappa 0.25 bits, kl_weight 1, seed 2, latent_dim=8: ended" in ft


def test_a_console_pickled_into_tunes_state_comes_back_without_its_trials():
    """Tune pickles its callbacks into its state (resume): the settings travel, the rows,
    the stream and the test's clock do not."""
    console, stream, clock = _console(False, 30.0)
    trial = _trial("t", 1.0, 0.1)
    clock.now = 5.0
    console.on_trial_start(0, [], trial)
    console.on_trial_complete(0, [], trial)
    state = console.__getstate__()
    assert (state["stream"], state["clock"], state["rows"]) == (None, None, {})
    assert console.stream is stream and console.clock is clock and console.rows  # untouched
    back = pickle.loads(pickle.dumps(console))
    assert (back.enabled, back.total, back.keys, back.max_steps, back.status_every_s) == (
        True, 8, console.keys, 300, 30.0)
    assert back.base == console.base
    assert back.clock is time.monotonic and back.stream is None
    assert (back.rows, back.ended, back._start, back._last_table, back._interval) == (
        {}, 0, None, None, 30.0)


def test_a_retried_trial_is_said_so_unless_verbose():
    for verbose in (False, True):
        console, stream, clock = _console(verbose)
        trial = _trial("t", 0.25, 1.0)
        console.on_trial_start(0, [], trial)
        console.on_trial_result(0, [], trial, {"step": 40})
        console.on_trial_recover(0, [], trial)
        assert stream.getvalue() == ("" if verbose else
                                     "retrying kappa 0.25 bits, kl_weight 1, seed 0: ended at "
                                     "step 40 after an error\n")


def test_the_status_table_shows_each_running_trials_cells():
    sweep = load_sweep(SMOKE_BOUNDARY)
    stream, clock = io.StringIO(), Clock()
    console = SweepConsole(sweep, sweep.base(), stream=stream, status_every_s=10.0, clock=clock)
    trials = [SimpleNamespace(trial_id=f"t{seed}", config={
        "training.free_bits_bits": np.float64(0.25), "training.kl_weight": 1.0,
        "training.seed": np.int64(seed), "model.latent_dim": latent})
        for seed, latent in ((0, 0), (1, 8), (2, 8))]
    for trial in trials:
        console.on_trial_start(0, [], trial)
    console.on_trial_result(0, [], trials[1], {"step": 12, "train/kl_bits": 0.123456,
                                               "eval/use_nats": 0.5, "eval/valid_rate": 1})
    console.on_trial_result(0, [], trials[2], {"step": 15, STOP_REASON: "low_kl"})
    console.on_trial_complete(0, [], trials[0])
    clock.now = 10.0
    console.on_trial_result(0, [], trials[2], {"step": 16, "eval/kl_bits": 2.0})
    table = stream.getvalue().splitlines()[1:]
    assert table[0].startswith("1/6 trials ended, 10s elapsed")
    # 1 + 12/20 + 16/20 of 6 trials' steps in 10 s: 15 s more
    assert table == [
        "1/6 trials ended, 10s elapsed, about 15s left",
        "  kappa bits  kl_weight  seed  step   KL bits  use nats  state             point",
        "  0.25        1          1     12/20  0.123    0.5       -                 latent_dim=8",
        "  0.25        1          2     16/20  2        -         low_kl (stopped)  latent_dim=8"]


def test_a_result_without_a_step_keeps_the_last_step():
    console, stream, clock = _console()
    trial = _trial("t", 1.0, 0.1)
    console.on_trial_start(0, [], trial)
    console.on_trial_result(0, [], trial, {"step": 300})
    console.on_trial_result(0, [], trial, {"train/kl_bits": 0.5})  # a report of no step
    console.on_trial_complete(0, [], trial)
    assert stream.getvalue().endswith("seed 0: ended at step 300, KL 0.5 bits\n")


def test_progress_counts_from_the_first_trials_start_and_estimates_after_a_second():
    console, stream, clock = _console(False, 1e9)
    assert console.progress() == "0/8 trials ended, 0s elapsed"  # before any trial
    clock.now = 100.0
    trial = _trial("t", 1.0, 0.1)
    console.on_trial_start(0, [], trial)
    clock.now = 101.0
    assert console.progress() == "0/8 trials ended, 1s elapsed"  # no step trained yet
    console.on_trial_result(0, [], trial, {"step": 150})
    # half of one of 8 trials in 1 s: 15 s more, said from the first second on
    assert console.progress() == "0/8 trials ended, 1s elapsed, about 15s left"
    clock.now = 100.5
    assert console.progress() == "0/8 trials ended, 0s elapsed"  # too early to say


def test_a_sweep_of_unknown_size_counts_its_trials_without_an_estimate():
    """``total`` 0: the number of trials is not known (the class's contract)."""
    console, stream, clock = _console(False, 1e9)
    console.total = 0
    trial = _trial("t", 1.0, 0.1)
    console.on_trial_start(0, [], trial)
    clock.now = 100.0
    console.on_trial_result(0, [], trial, {"step": 300})
    console.on_trial_complete(0, [], trial)
    assert stream.getvalue().startswith("[1/? trials ended, 1m40s elapsed] kappa 1 bits")


def test_a_base_without_max_steps_shows_bare_steps_and_no_estimate():
    sweep = load_sweep(GRID8)
    stream, clock = io.StringIO(), Clock()
    console = SweepConsole(sweep, sweep.base().replace({"training.max_steps": None}),
                           stream=stream, status_every_s=10.0, clock=clock)
    trial = _trial("t", 1.0, 0.1)
    console.on_trial_start(0, [], trial)
    clock.now = 10.0
    console.on_trial_result(0, [], trial, {"step": 12})
    console.on_trial_complete(0, [], trial)  # not counted as stopped early
    assert stream.getvalue().splitlines() == [
        "0/8 trials ended, 10s elapsed",
        "  kappa bits  kl_weight  seed  step  KL bits  use nats  state",
        "  1           0.1        0     12    -        -         -",
        "[1/8 trials ended, 10s elapsed] kappa 1 bits, kl_weight 0.1, seed 0: ended at step 12"]


def test_the_point_names_each_other_key_by_its_last_part():
    console, stream, clock = _console(False, 10.0,
                                      "space.training.kl_annealing.warmup_steps=[50, 100]",
                                      "space.model.latent_dim=[4, 8]")
    trial = SimpleNamespace(trial_id="t", config={
        "training.free_bits_bits": 1.0, "training.kl_weight": 0.1,
        "training.kl_annealing.warmup_steps": 50, "model.latent_dim": 8})
    console.on_trial_start(0, [], trial)
    clock.now = 10.0
    console.on_trial_result(0, [], trial, {"step": 12})
    assert stream.getvalue().splitlines()[2] == (
        "  1           0.1        0     12/300  -        -         -      "
        "warmup_steps=50,latent_dim=8")


def test_kappa_in_nats_is_shown_as_kappa_not_as_another_key(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"base_config: {ROOT / 'freetf' / 'configs' / 'synthetic.yaml'}\n"
                    "overrides: {training.max_steps: 300, training.free_bits_bits: null}\n"
                    "space: {training.free_bits: [0.5], training.kl_weight: [1.0]}\n")
    sweep = load_sweep(spec)
    stream = io.StringIO()
    console = SweepConsole(sweep, sweep.base(), stream=stream, clock=Clock())
    trial = SimpleNamespace(trial_id="t", config={"training.free_bits": 2 * math.log(2),
                                                  "training.kl_weight": 1.0})
    console.on_trial_start(0, [], trial)
    console.on_trial_result(0, [], trial, {"step": 300})
    console.on_trial_complete(0, [], trial)
    assert stream.getvalue().endswith("] kappa 2 bits, kl_weight 1, seed 0: ended at step 300\n")
