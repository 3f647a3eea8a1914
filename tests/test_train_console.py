"""Tests for freetf.training.console: what `freetf train` prints, and what it keeps quiet."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from freetf import load_config
from freetf.cli import main
from freetf.logs import QUIET_LOGGERS
from freetf.training.console import MlflowProgress, TrainConsole, summary_lines
from freetf.training.run_folder import RunPlan, with_default_run_name

ROOT = Path(__file__).resolve().parent.parent
CHATTER = ("Reporting training result", "RayTrainWorker", "TrainController", "PreemptionWatcher",
           "core_worker", "mlflow.store", "Started a local Ray instance", "INFO")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    saved = {name: logging.getLogger(name).level for name in (*QUIET_LOGGERS, "freetf")}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def _console(*overrides: str, start_step: int = 0, verbose: bool = False):
    tiny = ROOT / "configs" / "tiny.yaml"
    cfg = with_default_run_name(load_config(tiny, list(overrides)), tiny)
    stream, clock = io.StringIO(), Clock()
    console = TrainConsole(verbose=verbose, stream=stream, clock=clock)
    folder = Path("ray_results") / "tiny"
    console.start(RunPlan(cfg, folder, str(folder / "step_000010") if start_step else None,
                          start_step))
    return console, stream, clock


def _train(step: int, loss: float = 2.5, kl_bits: float = 0.25) -> dict:
    return {"step": step, "train/loss": loss, "train/kl_bits": kl_bits,
            "train/tokens_per_s": 26241.9}


EVAL = {"eval/ce_prior_nats": 1.52301, "eval/ce_posterior_nats": 1.49804, "eval/kl_bits": 0.98,
        "eval/active_bits": 3.0, "eval/use_nats": 0.031, "eval/use_low_nats": 0.012,
        "eval/use_high_nats": 0.05, "eval/valid_rate": 0.94, "eval/valid_low": 0.9,
        "eval/valid_high": 0.96, "eval/verdict": "used", "eval/converged": 0.0}


def test_first_line_says_what_runs_where():
    _, stream, _ = _console("training.max_steps=600")
    assert stream.getvalue() == (
        "training tiny: free transformer (H=4 bits), 600 steps of 8 x 66 tokens on the "
        "synthetic task on 1 Ray Train worker (CPU) -> ray_results/tiny\n")
    _, stream, _ = _console("scaling.use_ray=false", "model.latent_dim=0",
                            "training.max_steps=null", "training.num_epochs=2", start_step=10)
    assert stream.getvalue() == (
        "training tiny: baseline (no latent), 2 epochs of 8 x 66 tokens on the synthetic "
        "task in this process -> ray_results/tiny; continuing from "
        "ray_results/tiny/step_000010 (step 10)\n")


def test_progress_lines_thin_out_and_estimate_the_time_left():
    console, stream, clock = _console("training.max_steps=600")
    for step in range(25, 601, 25):  # a log step every 5 s
        clock.now = step / 5
        console.report(_train(step), total_steps=600)
    lines = stream.getvalue().splitlines()[1:]
    assert lines[0] == "step 25/600  loss 2.5000  KL 0.250 bits  26.2k tokens/s"
    assert lines[1] == "step 75/600  loss 2.5000  KL 0.250 bits  26.2k tokens/s  about 1m45s left"
    assert [line.split()[1] for line in lines] == ["25/600", "75/600", "175/600", "375/600",
                                                   "600/600"]  # after 10, 20, 40 s, and the last
    assert "left" not in lines[-1]


def test_evaluations_are_short_lines_but_the_last_is_the_summarys():
    console, stream, clock = _console("training.max_steps=20")
    console.report({"step": 10, **EVAL}, total_steps=20)  # before any log step: no progress
    console.report({**_train(20), **EVAL}, total_steps=20)
    assert stream.getvalue().splitlines()[1:] == [
        "eval at step 10: CE 1.5230 nats (prior Z), 1.4980 (encoder Z); KL 0.980 bits; "
        "use of Z 0.031 nats; valid 0.940",
        "step 20/20  loss 2.5000  KL 0.250 bits  26.2k tokens/s"]


def test_summary_prints_measurements_not_an_unconverged_verdict():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    metrics = {**_train(10), "train/ce_nats": 2.2297, **EVAL, "eval/samples": ["K>__", "A>__"]}
    summary = SimpleNamespace(metrics=metrics, wall_s=49.6, checkpoint=Path("/r/step_000010"),
                              run_id=None)
    lines = summary_lines(summary, cfg)
    assert lines == [
        "finished 10 steps in 50 s",
        "  train  loss 2.5000, CE 2.2297 nats, KL 0.250 bits per token, 26.2k tokens/s",
        "  eval   CE 1.5230 nats with Z from the prior, 1.4980 from the encoder; KL 0.980 bits, "
        "3 of 4 bits active",
        "         use of Z 0.031 nats [0.012, 0.050]; valid generations 0.940 [0.900, 0.960]",
        "  sample: K>__", "  sample: A>__", "checkpoint: /r/step_000010"]
    assert not any("used" in line or "collapsed" in line for line in lines)
    summary.metrics = {**metrics, "eval/converged": 1.0}
    assert "  latent used (the last evaluations agree; per-run thresholds, diagnostics.*)" in \
        summary_lines(summary, cfg)


def test_verbose_leaves_progress_to_the_log():
    console, stream, _ = _console(verbose=True)
    console.report({**_train(20), **EVAL}, total_steps=20)
    console.report({**_train(10), **EVAL}, total_steps=20)
    assert len(stream.getvalue().splitlines()) == 1  # the first line only


class FakeClient:
    """What MlflowProgress reads: the run's latest metrics, params and one history."""

    def __init__(self, params: dict | None = None) -> None:
        self.metrics: dict = {}
        self.evals: list[int] = []
        self.params = {"total_steps": "600"} if params is None else params
        self.polls = threading.Event()

    def get_run(self, run_id):
        assert run_id == "run"  # (poll swallows the error: the line is missing)
        self.polls.set()
        return SimpleNamespace(data=SimpleNamespace(metrics=dict(self.metrics),
                                                    params=self.params))

    def get_metric_history(self, run_id, key):
        assert (run_id, key) == ("run", "eval/ce_prior_nats")
        return [SimpleNamespace(step=s) for s in self.evals]


def test_ray_progress_is_read_from_mlflow():
    console, stream, clock = _console("training.max_steps=600")
    client = FakeClient()
    progress = MlflowProgress(client, "run", console, interval_s=3600)
    progress.poll()  # nothing logged yet
    client.metrics = {"train/steps_done": 200.0, **_train(200), **EVAL}
    client.evals = [200]
    progress.poll()
    progress.poll()  # no news: no line
    client.metrics = {"train/steps_done": 600.0, **_train(600), **EVAL}
    client.evals = [200, 400, 600]
    with progress:
        pass  # leaving reads once more
    assert [line.split(":")[0].split("  ")[0] for line in stream.getvalue().splitlines()[1:]] \
        == ["step 200/600", "eval at step 200", "step 600/600"]


def test_a_failing_read_never_stops_the_run():
    console, stream, _ = _console()

    class Broken:
        def get_run(self, run_id):
            raise RuntimeError("database is locked")

    MlflowProgress(Broken(), "run", console).poll()
    assert len(stream.getvalue().splitlines()) == 1


def test_in_process_train_is_short_and_says_each_thing_once(tmp_path, capfd):
    """`freetf train --no-ray` (MLflow on): the console's lines, freetf's INFO log and
    MLflow's database set-up not among them, and no line twice."""
    assert main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--no-ray",
                 "--max-steps", "10", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "--set", "data.num_samples=128", "--set", "diagnostics.free_generations=16"]) == 0
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    assert len(lines) <= 25, out + err
    assert len(set(lines)) == len(lines), out + err
    assert not [chatter for chatter in CHATTER if chatter in out + err]
    assert lines[0].startswith("training tiny: free transformer (H=4 bits), 10 steps")
    assert "step 10/10  loss " in out and "finished 10 steps in " in out
    assert f"checkpoint: {tmp_path / 'ckpt' / 'step_000010'}" in out and "MLflow run " in out
    assert not [word for word in ("verdict", "latent", "used", "collapsed") if word in out]


def test_a_ray_workers_log_lines_are_not_printed_twice():
    """Ray Train gives each worker a root logger that prints every record it gets: the
    worker's freetf logger, which prints its own, does not hand them on."""
    from freetf.logs import setup_logging

    root, stream = logging.getLogger(), io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        setup_logging(propagate=False)
        logging.getLogger("freetf.training.loop").warning("step 5/10")
        assert stream.getvalue() == ""
    finally:
        root.removeHandler(handler)
        setup_logging()
    assert logging.getLogger("freetf").propagate  # the CLI's default: pytest's caplog sees it


@pytest.mark.heavy  # a real Ray run in a subprocess: about a minute on 2 cores
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_ray_train_console_is_short_and_free_of_ray_chatter(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "freetf", "train", "--config",
                           str(ROOT / "configs" / "tiny.yaml"), "--max-steps", "10"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=380)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    lines = output.splitlines()
    assert len(lines) <= 25, output
    assert len(set(lines)) == len(lines), output
    assert not [chatter for chatter in CHATTER if chatter in output], output
    assert lines[0].startswith("training tiny: ") and lines[0].endswith("-> ray_results/tiny")
    assert "step 10/10  loss " in done.stdout
    assert f"checkpoint: {tmp_path / 'ray_results' / 'tiny' / 'step_000010'}" in done.stdout


def _first_line(*overrides: str) -> str:
    _, stream, _ = _console(*overrides)
    return stream.getvalue()


@pytest.mark.timeout(30)
def test_first_line_for_each_kind_of_run():
    head = "training tiny: free transformer (H=4 bits), 20 steps of "
    assert _first_line("scaling.num_workers=0") == (
        f"{head}8 x 66 tokens on the synthetic task in Ray Train's local mode (this process) "
        "-> ray_results/tiny\n")
    assert _first_line("scaling.num_workers=2", "scaling.use_gpu=true") == (
        f"{head}16 x 66 tokens on the synthetic task on 2 Ray Train workers (GPU) "
        "-> ray_results/tiny\n")
    assert _first_line("training.device=cuda") == (
        f"{head}8 x 66 tokens on the synthetic task on 1 Ray Train worker (GPU) "
        "-> ray_results/tiny\n")
    assert _first_line("scaling.use_ray=false", "scaling.num_workers=2",
                       "training.max_steps=null", "training.num_epochs=1") == (
        "training tiny: free transformer (H=4 bits), 1 epoch of 8 x 66 tokens on the "
        "synthetic task in this process -> ray_results/tiny\n")
    assert _first_line("data.dataset_name=text", "data.path=data/notes.txt",
                       "model.vocab_size=256") == (
        f"{head}8 x 66 tokens on text data/notes.txt on 1 Ray Train worker (CPU) "
        "-> ray_results/tiny\n")


@pytest.mark.timeout(30)
def test_a_console_that_was_not_started_prints_from_step_one(capsys):
    console = TrainConsole(clock=Clock())  # stdout, not verbose
    console.report({**_train(1), **EVAL})  # no total: no "/N", no time left
    assert capsys.readouterr().out.splitlines() == [
        "step 1  loss 2.5000  KL 0.250 bits  26.2k tokens/s",
        "eval at step 1: CE 1.5230 nats (prior Z), 1.4980 (encoder Z); KL 0.980 bits; "
        "use of Z 0.031 nats; valid 0.940"]
    console.summary(SimpleNamespace(metrics={"step": 1, **EVAL}, wall_s=1.0, checkpoint=None,
                                    run_id="abc"))  # no config: no MLflow lines
    assert capsys.readouterr().out.splitlines()[-1] == \
        "         use of Z 0.031 nats [0.012, 0.050]; valid generations 0.940 [0.900, 0.960]"


@pytest.mark.timeout(30)
def test_the_last_step_is_printed_once_and_a_zero_interval_prints_every_report():
    console, stream, clock = _console("training.max_steps=20")
    console.report(_train(20), total_steps=20)
    console.report(_train(20), total_steps=20)  # read again (MlflowProgress on leaving)
    assert stream.getvalue().splitlines()[1:] == [
        "step 20/20  loss 2.5000  KL 0.250 bits  26.2k tokens/s"]
    stream, clock = io.StringIO(), Clock()
    console = TrainConsole(stream=stream, clock=clock, progress_every_s=0.0)
    console.report(_train(5), total_steps=20)
    console.report(_train(10), total_steps=20)  # at the same time: no rate yet
    clock.now = 5.0
    console.report(_train(15), total_steps=20)
    assert stream.getvalue().splitlines() == [
        "step 5/20  loss 2.5000  KL 0.250 bits  26.2k tokens/s",
        "step 10/20  loss 2.5000  KL 0.250 bits  26.2k tokens/s",
        "step 15/20  loss 2.5000  KL 0.250 bits  26.2k tokens/s  about 2s left"]


@pytest.mark.timeout(30)
def test_the_summary_says_what_was_measured_and_nothing_else():
    metrics = {"eval/ce_prior_nats": 1.5, "eval/kl_bits": 0.98, "eval/active_bits": 3.0,
               "eval/use_nats": 0.031, "eval/use_low_nats": 0.012}  # no high end: no interval
    summary = SimpleNamespace(metrics=metrics, wall_s=4.6, checkpoint=None, run_id=None)
    assert summary_lines(summary, None) == [
        "finished ? steps in 5 s",
        "  eval   CE 1.5000 nats; KL 0.980 bits, 3 bits active",
        "         use of Z 0.031 nats"]
    console, stream, _ = _console()
    console.summary(SimpleNamespace(metrics={"step": 20, "eval/kl_bits": 0.5,
                                             "eval/active_bits": 2.0},
                                    wall_s=9.0, checkpoint=None, run_id=None))
    assert stream.getvalue().splitlines()[1:] == [
        "finished 20 steps in 9 s", "  eval   KL 0.500 bits, 2 of 4 bits active"]


@pytest.mark.timeout(30)
def test_the_summary_names_the_mlflow_run_and_its_page(monkeypatch):
    import freetf.tracking

    asked = []

    class Client:
        def __init__(self, uri):
            asked.append(uri)

        def get_run(self, run_id):
            asked.append(run_id)
            return SimpleNamespace(info=SimpleNamespace(experiment_id="7"))

    monkeypatch.setattr(freetf.tracking, "mlflow_client", Client)
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["tracking.mlflow.tracking_uri=sqlite:////r/mlflow.db",
                       "tracking.mlflow.experiment=tiny-runs"])
    summary = SimpleNamespace(metrics={"step": 3}, wall_s=2.0, checkpoint=Path("/r/step_3"),
                              run_id="abc123")
    assert summary_lines(summary, cfg) == [
        "finished 3 steps in 2 s", "checkpoint: /r/step_3",
        "MLflow run abc123 in experiment 'tiny-runs'; compare runs with: mlflow ui "
        "--backend-store-uri sqlite:////r/mlflow.db",
        "  then open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"]
    assert asked == ["sqlite:////r/mlflow.db", "abc123"]


def test_numbers_and_counts_are_printed_short():
    from freetf.training.console import _count, _num

    assert [_num(v) for v in (None, 3, 0.0, 0.001, 0.0009, 0.0005, 0.1348)] == [
        "-", "3", "0.000", "0.001", "9.0e-04", "5.0e-04", "0.135"]
    assert [_count(v) for v in (999.0, 1000.0, 26241.9, 1e6, 2.5e6)] == [
        "999", "1.0k", "26.2k", "1.0M", "2.5M"]


@pytest.mark.timeout(30)
def test_progress_without_a_total_and_from_the_polling_thread():
    console, stream, _ = _console()
    client = FakeClient(params={})  # no total_steps param
    client.metrics = {"train/steps_done": 5.0, **_train(5)}
    with MlflowProgress(client, "run", console, interval_s=0.01) as progress:
        assert client.polls.wait(10)  # the thread polls before the exit's own read
        thread = next(t for t in threading.enumerate() if t.name == "freetf-progress")
        assert thread.daemon  # a hung MLflow never keeps the process alive
        assert progress._thread is thread
    assert stream.getvalue().splitlines()[1:] == [
        "step 5  loss 2.5000  KL 0.250 bits  26.2k tokens/s"]


@pytest.mark.timeout(30)
def test_leaving_waits_at_most_ten_intervals_for_a_hung_read():
    console, stream, _ = _console()
    entered, release = threading.Event(), threading.Event()

    class Hanging(FakeClient):
        def get_run(self, run_id):
            if threading.current_thread().name == "freetf-progress":
                entered.set()
                release.wait(3)  # a read that hangs (bounded, for the test's sake)
            return super().get_run(run_id)

    try:
        with MlflowProgress(Hanging(), "run", console, interval_s=0.01):
            assert entered.wait(10)
            start = time.monotonic()
        assert time.monotonic() - start < 1.5  # 10 x 0.01 s, not the hung read's 3 s
    finally:
        release.set()
