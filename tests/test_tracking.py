"""Tests for freetf.tracking: real MLflow stores (sqlite and an HTTP server)."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from freetf import tracking
from freetf.config import Config, load_config
from freetf.tracking import (
    NullTracker,
    Tracker,
    TrackingError,
    check_tracking_server,
    make_tracker,
    plot_training_curves,
    resolve_tracking_uri,
)

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(uri: str, **overrides: object) -> Config:
    return load_config(overrides={"tracking.mlflow.tracking_uri": uri,
                                  "tracking.mlflow.experiment": "unit", **overrides})


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", *tracking.HTTP_CLIENT_DEFAULTS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _transient() -> MlflowException:
    return MlflowException("server hiccup", error_code=TEMPORARILY_UNAVAILABLE)


# ----------------------------------------------------------------------------- URIs


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(Config()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert resolve_tracking_uri(Config()) == "http://tracker:5000"
    cfg = _config("sqlite:///runs/x.db")  # config wins over the env; made absolute
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert resolve_tracking_uri(_config("./mlruns")) == (tmp_path / "mlruns").resolve().as_uri()


def test_file_store_is_opted_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = make_tracker(_config("file:./mlruns"))
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.finish()
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.metrics["train/loss"] == 1.0
    assert (tmp_path / "mlruns").is_dir()


def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")) as info:
        check_tracking_server(uri, timeout_s=5)
    assert "mlflow server" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TrackingError):
        make_tracker(_config(uri))
    assert time.monotonic() - start < 15
    check_tracking_server(f"sqlite:///{tmp_path}/x.db")  # local stores: no-op


# ----------------------------------------------------------------------------- sqlite


def test_sqlite_run_roundtrip(sqlite_uri: str, tmp_path: Path) -> None:
    cfg = _config(sqlite_uri)
    tracker = make_tracker(cfg, run_name="roundtrip", tags={"purpose": "unit"})
    for step in range(5):
        tracker.log_metrics({"train/loss": 3.0 - step, "train/kl_nats": 0.1 * step}, step=step)
    tracker.set_tags({"stage": "done"})
    tracker.log_params({"grid": {f"p{i:03d}": i for i in range(250)}})  # 3 log_batch chunks
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note, artifact_path="extra")
    tracker.log_text("some text", "notes/readme.txt")
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).info.status == "RUNNING"
    tracker.finish()

    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "roundtrip"
    params = run.data.params  # the compared keys by short names, not the whole config
    assert params["latent_dim"] == "16" and params["kl_annealing"] == "constant"
    assert params["free_bits_bits"] == "0.5" and params["log2_free_bits_bits"] == "-1"
    assert "optimizer.betas" not in params and "model.num_kv_heads" not in params
    assert params["grid.p249"] == "249"
    assert len(params) == len(tracking.run_params(cfg)) + 250
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 3.0 - s) for s in range(5)]
    tags = run.data.tags
    assert tags["freetf.model_kind"] == "free_transformer"
    assert tags["freetf.latent_bits"] == "16"
    assert tags["purpose"] == "unit" and tags["stage"] == "done"
    from freetf.tracking.tracker import _git_commit

    commit = _git_commit()  # None outside a git checkout (an sdist, a copied tree)
    if commit is None:
        assert "git.commit" not in tags
    else:
        assert tags["git.commit"] == commit and len(commit) == 40
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "extra", "notes"} <= names
    config_file = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config_file).read_text()) == cfg.to_dict()
    # Artifacts live beside the database, not under whatever the cwd happens to be.
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_baseline_tag_nested_and_failed(sqlite_uri: str) -> None:
    parent = make_tracker(_config(sqlite_uri), run_name="sweep")
    child = make_tracker(_config(sqlite_uri, **{"model.latent_dim": 0}),
                         parent_run_id=parent.run_id)
    child.finish("FAILED")
    parent.finish()
    client = MlflowClient(sqlite_uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["freetf.model_kind"] == "baseline"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        child.finish("DONE")


def test_resume_run(sqlite_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    first = make_tracker(_config(sqlite_uri))
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.finish("FAILED")
    changed = _config(sqlite_uri, **{"training.learning_rate": 0.5})
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        resumed = make_tracker(changed, run_id=first.run_id)
    assert resumed.run_id == first.run_id
    assert "learning_rate" in caplog.text  # immutable param: warned, kept
    client = MlflowClient(sqlite_uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_metrics({"train/loss": 1.0}, step=2)
    resumed.finish()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.0003"
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [1, 2]


def test_transient_failure_is_buffered_and_retried(
        sqlite_uri: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    tracker = make_tracker(_config(sqlite_uri))
    real_log_batch = tracker.client.log_batch
    calls = {"n": 0}

    def flaky_log_batch(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise _transient()
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", flaky_log_batch)
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        tracker.log_metrics({"train/loss": 5.0, "train/kl_hinged_nats": 0.5},
                            step=1)  # must not raise
    assert "buffering" in caplog.text
    client = MlflowClient(sqlite_uri)
    assert client.get_metric_history(tracker.run_id, "train/loss") == []
    tracker.log_metrics({"train/loss": 4.0}, step=2)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 5.0), (2, 4.0)]
    hinged = client.get_metric_history(tracker.run_id, "train/kl_hinged_nats")
    assert [m.step for m in hinged] == [1]

    calls["n"] = 0  # params are buffered the same way
    tracker.log_params({"extra": {"seed_note": "retry me"}})
    tracker.log_metrics({"train/loss": 3.0}, step=3)
    tracker.finish()
    assert client.get_run(tracker.run_id).data.params["extra.seed_note"] == "retry me"


def test_metric_buffer_is_bounded(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    tracker = make_tracker(_config(sqlite_uri))
    real_log_batch = tracker.client.log_batch
    monkeypatch.setattr(tracking.sinks, "MAX_BUFFERED_METRICS", 3)
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(
        ConnectionError("down")))
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        for step in range(6):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
    assert "dropped the oldest" in caplog.text
    assert tracker._mlflow.pending_metrics == 3
    monkeypatch.setattr(tracker.client, "log_batch", real_log_batch)
    tracker.finish()
    history = MlflowClient(sqlite_uri).get_metric_history(tracker.run_id, "train/loss")
    assert sorted(m.step for m in history) == [3, 4, 5]


def test_start_failure_is_tracking_error(sqlite_uri: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise _transient()

    monkeypatch.setattr(tracking.mlflow.MlflowClient, "log_batch", broken)
    with pytest.raises(TrackingError, match="cannot start an MLflow run"):
        make_tracker(_config(sqlite_uri))


def _fill_the_database(tracker) -> None:
    """The sqlite store may grow no more (PRAGMA max_page_count): its writes fail with
    the error a full disk gives, 'database or disk is full', through MLflow's own code."""
    from sqlalchemy import event, text

    engine = tracker.client._tracking_client.store.engine
    with engine.connect() as connection:
        pages = connection.execute(text("PRAGMA page_count")).scalar()
    event.listen(engine, "connect", lambda dbapi, _: dbapi.execute(
        f"PRAGMA max_page_count = {pages}"))
    engine.dispose()  # new connections, with the limit


def test_a_store_that_fills_mid_run_is_two_warnings_and_the_run_still_ends(
        sqlite_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture) -> None:
    """No traceback per report (MLflow logs each database error with its traceback, 126
    of them in the probe), a retry that backs off instead of one per log step, one
    warning saying what is kept, one at the end saying what was not recorded; the run
    is ended (the update needs no new page; on a full disk it cannot, next test)."""
    tracker = make_tracker(_config(sqlite_uri))
    attempts = {"n": 0}
    real_log_batch = tracker.client.log_batch

    def counted(*args: object, **kwargs: object) -> object:
        attempts["n"] += 1
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", counted)
    _fill_the_database(tracker)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        for step in range(1, 301):
            tracker.log_metrics({f"train/m{i}": float(step + i) for i in range(14)}, step=step)
        tracker.finish("FAILED")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "SQLAlchemy database error" not in err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "failed (OperationalError: database or disk is full); buffering its metrics" \
        in warnings[0]
    assert re.search(r": \d+ metric points \(steps \d+ to 300\) not recorded "
                     r"\(OperationalError: database or disk is full\); the run is marked "
                     r"FAILED$", warnings[1]), warnings[1]
    assert attempts["n"] < 20  # not one per log step
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_a_run_the_store_cannot_end_says_how_to_end_it(
        sqlite_uri: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On a full disk even ending the run fails: the warning says so and how to end it
    later.  A Ray worker's tracker (the driver ends the run) says what it could not send."""
    tracker = make_tracker(_config(sqlite_uri))
    full = MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: ...]")
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(full))
    monkeypatch.setattr(tracker.client, "set_terminated",
                        lambda *a, **k: (_ for _ in ()).throw(full))
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        tracker.flush()
        assert caplog.records[-1].getMessage().endswith(
            "1 metric points (steps 1 to 1) not recorded (MlflowException: (sqlite3."
            "OperationalError) database or disk is full)")
        tracker.log_metrics({"train/loss": 0.5}, step=2)
        tracker.finish("KILLED")
    message = caplog.records[-1].getMessage()
    assert message.endswith(
        f"the run could not be ended (MlflowException: (sqlite3.OperationalError) database "
        f"or disk is full) and shows RUNNING: end it with MlflowClient({sqlite_uri!r})"
        f".set_terminated({tracker.run_id!r}, 'KILLED')"), message
    assert "\n" not in message


def test_a_store_that_cannot_be_created_is_one_line_and_leaves_no_empty_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sqlite store on a full disk: sqlite makes the file, then cannot write its tables
    (before: an SQLAlchemy traceback, and a 0-byte file left)."""
    from mlflow.exceptions import MlflowException as Wrapped

    db = tmp_path / "m.db"

    def full_disk(uri: str) -> None:
        db.touch()
        try:
            raise OSError(28, "database or disk is full")
        except OSError as cause:
            raise Wrapped("(sqlite3.OperationalError) database or disk is full\n[SQL: \n"
                          "CREATE TABLE experiments (\n...)]") from cause

    monkeypatch.setattr(tracking.sinks, "mlflow_client", full_disk)
    with pytest.raises(TrackingError) as info:
        make_tracker(_config(f"sqlite:///{db}"))
    assert str(info.value) == (f"cannot start an MLflow run at sqlite:///{db}: OSError: "
                               f"[Errno 28] database or disk is full")
    assert not db.exists()


# ----------------------------------------------------------------------------- rank / null


def test_null_tracker_and_other_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = make_tracker(Config(), rank=1)
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.set_tags({"t": "v"})
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.log_text("x", "x.txt")
    tracker.finish("KILLED")
    disabled = load_config(overrides={"tracking.mlflow.enabled": False})
    assert isinstance(make_tracker(disabled), NullTracker)
    assert list(tmp_path.iterdir()) == []  # nothing was written anywhere


# ----------------------------------------------------------------------------- TB / W&B


def test_tensorboard_and_wandb_mirror_guide_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scalars: list[tuple[str, float, int]] = []
    wandb_calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, key: str, value: float, step: int) -> None:
            scalars.append((key, value, step))

        def add_text(self, *args: object) -> None: ...
        def close(self) -> None: ...

    class FakeRun:
        config = types.SimpleNamespace(update=lambda *a, **k: None)

        def log(self, data: dict, step: int) -> None:
            wandb_calls["log"].append((data, step))

        def finish(self, exit_code: int) -> None:
            wandb_calls["finish"].append(exit_code)

    def fake_init(**kwargs: object) -> FakeRun:
        wandb_calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake_init))
    cfg = load_config(overrides={"tracking.mlflow.enabled": False,
                                 "tracking.tensorboard.enabled": True,
                                 "tracking.tensorboard.log_dir": str(tmp_path / "tb"),
                                 "tracking.wandb.enabled": True})
    tracker = make_tracker(cfg, run_name="mirror")
    metrics = {"train/ce_nats": 2.0, "train/kl_hinged_nats": 0.3, "train/loss": 2.3,
               "train/lr": 1e-4, "train/kl_nats": 0.4}
    tracker.log_metrics(metrics, step=7)
    tracker.finish("FAILED")

    logged = {key: (value, step) for key, value, step in scalars}
    for key, alias in [("train/ce_nats", "Loss/Reconstruction"),
                       ("train/kl_hinged_nats", "Loss/KL"),
                       ("train/loss", "Loss/Total"), ("train/lr", "Learning_Rate")]:
        assert logged[key] == logged[alias] == (metrics[key], 7)
    assert logged["train/kl_nats"] == (0.4, 7)
    assert wandb_calls["init"][0]["mode"] == "offline"
    assert wandb_calls["init"][0]["config"]["model.latent_dim"] == "16"
    data, step = wandb_calls["log"][0]
    assert step == 7 and data["loss/reconstruction"] == 2.0 and data["loss/kl"] == 0.3
    assert data["loss/total"] == 2.3 and data["learning_rate"] == 1e-4
    assert data["train/loss"] == 2.3
    assert wandb_calls["finish"] == [1]


@pytest.mark.parametrize("module, extra", [("torch.utils.tensorboard", "freetf[tensorboard]"),
                                           ("wandb", "freetf[wandb]")])
def test_missing_extra_names_it(module: str, extra: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    section = "tensorboard" if "tensorboard" in module else "wandb"
    cfg = load_config(overrides={"tracking.mlflow.enabled": False,
                                 f"tracking.{section}.enabled": True,
                                 "tracking.tensorboard.log_dir": str(tmp_path)})
    with pytest.raises(TrackingError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        make_tracker(cfg)


# ----------------------------------------------------------------------------- plots


def test_plot_training_curves(tmp_path: Path, sqlite_uri: str) -> None:
    history = [{"step": s, "train/loss": 3.0 / (s + 1), "train/ce_nats": 2.5 / (s + 1),
                "train/kl_nats": 0.05 * s, "train/free_bits_nats": 0.35} for s in range(20)]
    path = plot_training_curves(history, tmp_path / "plots" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tracker = make_tracker(_config(sqlite_uri))
    tracker.log_artifact(path)
    tracker.finish()
    names = {a.path for a in MlflowClient(sqlite_uri).list_artifacts(tracker.run_id)}
    assert "curves.png" in names


# ----------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real ``mlflow server`` on a free local port, torn down after the module."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not come up:\n"
                                f"{(root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_real_mlflow_server_end_to_end(mlflow_server: str, tmp_path: Path) -> None:
    check_tracking_server(mlflow_server)
    cfg = _config(mlflow_server)
    with make_tracker(cfg, run_name="over-http", tags={"purpose": "e2e"}) as tracker:
        assert isinstance(tracker, Tracker) and tracker.run_id
        for step in range(3):
            tracker.log_metrics({"train/loss": 2.0 - step, "eval/ce_prior_nats": 1.5}, step=step)
        tracker.log_params({"sweep": {"trial": 3}})
    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["kl_weight"] == "1"
    assert run.data.params["sweep.trial"] == "3"
    assert run.data.tags["purpose"] == "e2e"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    config_file = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config_file).read_text()) == cfg.to_dict()


def test_a_local_store_is_refused_on_a_cluster_of_several_hosts() -> None:
    two = {"10.0.0.1", "10.0.0.2"}
    for uri in ("sqlite:////data/mlflow.db", "file:///data/mlruns", "/data/mlruns"):
        with pytest.raises(tracking.TrackingError, match="start an MLflow server"):
            tracking.check_store_shared_by(uri, two)
        tracking.check_store_shared_by(uri, {"10.0.0.1"})  # one host: the file is shared
    tracking.check_store_shared_by("http://10.0.0.1:5000", two)


def test_git_commit_is_optional_outside_a_checkout(monkeypatch, tmp_path):
    """An sdist or a copied tree has no .git: no commit, no error."""
    import subprocess

    from freetf.tracking import tracker as tracker_module

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git", stderr="not a git repository")
    monkeypatch.setattr(tracker_module.subprocess, "run", no_git)
    assert tracker_module._git_commit() is None
