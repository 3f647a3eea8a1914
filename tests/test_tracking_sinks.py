"""Tests for freetf.tracking.sinks against a recording client: the MLflow sink's batches,
buffer, retries, start and end-of-run account (TensorBoard and W&B: test_tracking_backends.py)."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from freetf.config import load_config
from freetf.tracking import sinks
from freetf.tracking.sinks import _MlflowSink
from freetf.tracking.store import TrackingError

pytestmark = pytest.mark.timeout(60)


class Client:
    """An MLflow client that records log_batch and the other calls; ``down`` holds the
    errors that the next log_batch calls raise, one each."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.calls: list[tuple] = []
        self.down: list[Exception] = []

    def log_batch(self, run_id: str, **entities: list) -> None:
        if self.down:
            raise self.down.pop(0)
        self.batches.append({"run_id": run_id, **{
            kind: [_plain(e) for e in items] for kind, items in entities.items()}})

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
        call.__name__ = name
        return call


def _plain(entity) -> tuple:
    if hasattr(entity, "step"):
        return entity.key, entity.value, entity.step
    return entity.key, entity.value


def _rejected() -> MlflowException:
    return MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.monotonic() as the test sets it."""
    now = [100.0]
    monkeypatch.setattr(sinks.time, "monotonic", lambda: now[0])
    return now


def test_params_tags_and_metrics_go_in_batches_of_mlflows_limits(monkeypatch):
    monkeypatch.setattr(sinks.time, "time", lambda: 12.3456)
    client = Client()
    sink = _MlflowSink(client, "r1", logged_params={"kept": "1", "same": "2"})
    sink.log_params({f"p{i:03d}": str(i) for i in range(201)} | {"kept": "9", "same": "2"})
    sink.set_tags({f"t{i:03d}": "v" for i in range(101)})
    sink.log_metrics({f"m{i}": float(i) for i in range(1001)}, step=4)
    assert [b["run_id"] for b in client.batches] == ["r1"] * 7
    assert [len(b["params"]) for b in client.batches[:3]] == [100, 100, 1]
    assert client.batches[2]["params"] == [("p200", "200")]  # "kept" differs: MLflow's kept
    assert [len(b["tags"]) for b in client.batches[3:5]] == [100, 1]
    assert [len(b["metrics"]) for b in client.batches[5:]] == [1000, 1]
    assert client.batches[6]["metrics"] == [("m1000", 1000.0, 4)]
    assert sink.pending_metrics == 0
    assert sink._logged_params["p200"] == "200" and sink._logged_params["kept"] == "1"


def test_a_metric_point_carries_the_time_in_milliseconds(monkeypatch):
    monkeypatch.setattr(sinks.time, "time", lambda: 12.3456)
    client = Client()
    client.down = [ConnectionError("down")]
    sink = _MlflowSink(client, "r1")
    sink.log_metrics({"a": 1.0}, step=2)
    assert [(m.key, m.value, m.timestamp, m.step) for m in sink._pending_metrics] == [
        ("a", 1.0, 12345, 2)]


def test_a_rejected_batch_is_dropped_and_a_rejected_param_not_taken_as_logged(clock, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1")
    client.down = [_rejected(), _rejected(), _rejected()]
    with caplog.at_level(logging.ERROR, logger="freetf.tracking"):
        sink.log_params({"a": "1", "b": "2"})
        sink.set_tags({"t": "x"})
        sink.log_metrics({"m": 1.0}, step=1)
    assert [r.getMessage() for r in caplog.records] == [
        f"MLflow rejected {what} for run r1; dropping them: bad value"
        for what in ("2 params", "1 tags", "1 metrics")]
    assert sink._failures == 0 and sink.pending_metrics == 0 and sink._logged_params == {}
    assert sink._pending_params == {} and sink._pending_tags == {}
    sink.log_params({"a": "2"})  # not kept by MLflow: sent again, with the new value
    assert client.batches == [{"run_id": "r1", "params": [("a", "2")]}]


def test_a_strict_call_raises_the_stores_error(clock):
    client = Client()
    sink = _MlflowSink(client, "r1")
    client.down = [_rejected()]
    with pytest.raises(MlflowException, match="bad value"):
        sink.set_tags({"t": "x"}, strict=True)
    client.down = [ConnectionError("down")]
    with pytest.raises(ConnectionError):
        sink.log_params({"a": "1"}, strict=True)
    assert sink._failures == 0


def test_a_failing_store_is_retried_at_once_then_after_1_2_4_up_to_60_s(clock, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", uri="sqlite:///m.db")
    attempts = []
    for failures in range(1, 10):
        client.down = [ConnectionError("down" if failures == 1 else f"down {failures}")]
        sink.log_metrics({"m": float(failures)}, step=failures)
        attempts.append(sink._retry_at - clock[0])
        assert sink._failures == failures
        clock[0] = sink._retry_at  # the next call is the retry
    assert attempts == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert sink._cause == "ConnectionError: down"  # the first failure's, said once
    said = [r.getMessage() for r in caplog.records if " failed (" in r.getMessage()]
    assert len(said) == 1 and " failed (ConnectionError: down); buffering " in said[0]
    sink.log_metrics({"m": 10.0}, step=10)  # recovered: the buffer goes in one batch
    assert sink._failures == 0 and sink.pending_metrics == 0
    assert client.batches == [{"run_id": "r1", "metrics": [
        ("m", float(s), s) for s in range(1, 11)]}]


def test_no_send_before_the_retry_time_unless_forced(clock):
    client = Client()
    sink = _MlflowSink(client, "r1")
    client.down = [ConnectionError("down"), ConnectionError("down")]
    sink.log_metrics({"m": 1.0}, step=1)
    sink.log_metrics({"m": 2.0}, step=2)  # the first retry is at once: fails again
    assert sink._failures == 2 and sink._retry_at == 101.0
    clock[0] = 100.999
    sink.log_metrics({"m": 3.0}, step=3)
    sink.set_tags({"t": "x"})
    sink.log_params({"a": "1"})
    assert client.batches == [] and sink.pending_metrics == 3
    clock[0] = 101.0
    sink.log_metrics({"m": 4.0}, step=4)
    assert [list(b) for b in client.batches] == [["run_id", "params"], ["run_id", "tags"],
                                                  ["run_id", "metrics"]]
    assert len(client.batches[2]["metrics"]) == 4


@pytest.mark.parametrize("kind", ["params", "tags"])
def test_a_failed_params_or_tags_batch_stays_buffered(kind, clock):
    client = Client()
    sink = _MlflowSink(client, "r1")
    client.down = [ConnectionError("down")]
    getattr(sink, "log_params" if kind == "params" else "set_tags")({"a": "1"})
    sink.log_metrics({"m": 1.0}, step=1)  # the retry sends the params or tags first
    assert client.batches == [{"run_id": "r1", kind: [("a", "1")]},
                              {"run_id": "r1", "metrics": [("m", 1.0, 1)]}]
    if kind == "params":
        assert sink._logged_params == {"a": "1"}


def test_a_full_buffer_drops_the_oldest_points(clock, monkeypatch, caplog):
    monkeypatch.setattr(sinks, "MAX_BUFFERED_METRICS", 3)
    client = Client()
    sink = _MlflowSink(client, "r1")
    client.down = [ConnectionError("down")] * 3
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.log_metrics({"a": 0.0, "b": 0.0, "c": 0.0}, step=0)  # full, nothing dropped
    assert "buffer full" not in caplog.text and sink._dropped == 0
    sink._pending_metrics.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.log_metrics({"a": 1.0, "b": 1.0}, step=1)
        sink.log_metrics({"a": 2.0, "b": 2.0}, step=2)
        assert [(m.key, m.step) for m in sink._pending_metrics] == [
            ("b", 1), ("a", 2), ("b", 2)]
        sink.log_metrics({"a": 3.0, "b": 3.0}, step=3)
    assert [r.getMessage() for r in caplog.records if "buffer full" in r.getMessage()] == [
        "MLflow metric buffer full (3 points): dropped the oldest 1 (and so on, counted at "
        "the end)"]  # the first drop is said, the later ones counted
    assert sink._dropped == 3 and sink.pending_metrics == 3
    assert sink._unsent() == ("3 metric points (steps 2 to 3), 3 older points dropped "
                              "from the full buffer")


def test_the_end_says_what_was_not_recorded(clock, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", uri="sqlite:///m.db")
    client.down = [ConnectionError("down")] * 6
    sink.log_params({"a": "1", "b": "2"})
    sink.set_tags({"t": "x"})
    client.log_text = lambda *a: (_ for _ in ()).throw(OSError("no room"))
    client.log_artifact = lambda *a: (_ for _ in ()).throw(OSError("no room"))
    sink.log_text("hello", "notes.txt")
    sink.log_artifact(Path("/tmp/out/curves.png"), "plots")
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.finish("FAILED")
    assert caplog.records[-1].getMessage() == (
        "MLflow run r1 at sqlite:///m.db: 2 params, 1 tags, the artifacts notes.txt, "
        "curves.png not recorded (ConnectionError: down); the run is marked FAILED")
    assert ("set_terminated", ("r1", "FAILED"), {}) in client.calls


def test_the_end_sends_what_waits_for_its_retry_time(clock, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", uri="u")
    client.down = [ConnectionError("down")] * 2
    sink.log_metrics({"m": 1.0}, step=1)
    sink.log_metrics({"m": 2.0}, step=2)  # the second failure: the next try in 1 s
    clock[0] = 100.5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.finish("FINISHED")
    assert client.batches == [{"run_id": "r1", "metrics": [("m", 1.0, 1), ("m", 2.0, 2)]}]
    assert [r.getMessage() for r in caplog.records] == [
        "MLflow logging for run r1 recovered; buffered data sent"]
    assert client.calls == [("set_terminated", ("r1", "FINISHED"), {})]


def test_a_resumed_run_keeps_its_params_and_warns_only_of_a_changed_one(caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", {"a": "1", "b": "2"}, uri="u")
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.log_params({"a": "1", "b": "3", "c": "4"})
    assert [r.getMessage() for r in caplog.records] == [
        "param b='3' differs from the run's '2'; MLflow params are immutable, keeping '2'"]
    assert client.batches == [{"run_id": "r1", "params": [("c", "4")]}]
    assert sink._logged_params == {"a": "1", "b": "2", "c": "4"}


def test_a_failed_artifact_is_one_warning_then_counted(caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", uri="u")
    client.log_figure = lambda *a: (_ for _ in ()).throw(OSError("no room"))
    client.log_text = lambda *a: (_ for _ in ()).throw(ValueError("bad"))
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.log_figure(object(), "curves.png")
        sink.log_text("x", "notes.txt")
    assert len(caplog.records) == 1 and "OSError: no room" in caplog.text
    assert sink._cause == "OSError: no room" and sink._lost == ["curves.png", "notes.txt"]
    assert sink._unsent() == "the artifacts curves.png, notes.txt"


def test_artifacts_go_to_the_client_with_the_run(tmp_path, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1")
    figure = object()
    sink.log_artifact(tmp_path / "a.txt", "extra")
    sink.log_text("hello", "notes/n.txt")
    sink.log_figure(figure, "curves.png")
    assert client.calls == [("log_artifact", ("r1", str(tmp_path / "a.txt"), "extra"), {}),
                            ("log_text", ("r1", "hello", "notes/n.txt"), {}),
                            ("log_figure", ("r1", figure, "curves.png"), {})]
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.finish("FINISHED")
    assert client.calls[-1] == ("set_terminated", ("r1", "FINISHED"), {})
    assert sink._unsent() == "" and caplog.records == []  # all recorded: nothing to say


def test_a_run_with_everything_recorded_that_cannot_be_ended_says_how_to_end_it(caplog):
    client = Client()
    client.set_terminated = lambda *a: (_ for _ in ()).throw(OSError("gone"))
    sink = _MlflowSink(client, "r1", uri="u")
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.finish("KILLED")
    assert [r.getMessage() for r in caplog.records] == [
        "MLflow run r1 at u: the run could not be ended (OSError: gone) and shows RUNNING: "
        "end it with MlflowClient('u').set_terminated('r1', 'KILLED')"]


def test_flush_sends_or_says_what_is_lost_once(clock, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", uri="u")
    client.down = [ConnectionError("down")] * 2
    sink.log_metrics({"m": 1.0}, step=1)
    clock[0] = 100.5  # before the retry time: flush tries anyway
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.flush()
    assert caplog.records[-1].getMessage() == (
        "MLflow run r1 at u: 1 metric points (steps 1 to 1) not recorded "
        "(ConnectionError: down)")
    assert sink.pending_metrics == 0 and client.down == []
    sink.log_metrics({"m": 2.0}, step=2)
    sink.flush()
    assert client.batches == [{"run_id": "r1", "metrics": [("m", 2.0, 2)]}]


def test_a_flush_that_sends_everything_says_nothing_but_a_recovery(clock, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", uri="u")
    sink.log_metrics({"m": 1.0}, step=1)
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.flush()
    assert caplog.records == []
    client.down = [ConnectionError("down")]
    sink.log_metrics({"m": 2.0}, step=2)  # fails once, kept for the retry
    assert sink.pending_metrics == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "MLflow logging for run r1 recovered; buffered data sent"]
    assert client.batches == [{"run_id": "r1", "metrics": [("m", 1.0, 1)]},
                              {"run_id": "r1", "metrics": [("m", 2.0, 2)]}]


@pytest.mark.parametrize("kind", ["params", "tags"])
def test_flush_says_which_buffered_params_or_tags_are_lost(kind, clock, caplog):
    client = Client()
    sink = _MlflowSink(client, "r1", uri="u")
    client.down = [ConnectionError("down")] * 2
    if kind == "params":
        sink.log_params({"p": "1"})
    else:
        sink.set_tags({"t": "x"})
    with caplog.at_level(logging.WARNING, logger="freetf.tracking"):
        sink.flush()
    assert caplog.records[-1].getMessage() == (
        f"MLflow run r1 at u: 1 {kind} not recorded (ConnectionError: down)")


def _cfg(tmp_path: Path, **overrides):
    return load_config(overrides={"tracking.mlflow.experiment": "unit",
                                  "tracking.wandb.project": "proj", **overrides})


class StartClient(Client):
    """A client for _MlflowSink.start: one experiment, runs by id."""

    def __init__(self, params: dict[str, str] | None = None) -> None:
        super().__init__()
        self.params = params or {}

    def get_experiment_by_name(self, name):
        self.calls.append(("get_experiment_by_name", (name,), {}))
        return types.SimpleNamespace(experiment_id="7", lifecycle_stage="active",
                                     tags={"mlflow.experimentKind": "custom_model_development"})

    def create_run(self, experiment_id, run_name=None):
        self.calls.append(("create_run", (experiment_id,), {"run_name": run_name}))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="new1"))

    def get_run(self, run_id):
        self.calls.append(("get_run", (run_id,), {}))
        return types.SimpleNamespace(data=types.SimpleNamespace(params=self.params))


def test_start_creates_or_resumes_the_run_with_its_tags_params_and_config(tmp_path,
                                                                         monkeypatch):
    cfg = _cfg(tmp_path)
    client = StartClient()
    monkeypatch.setattr(sinks, "mlflow_client", lambda uri: client)
    sink = _MlflowSink.start(cfg, "u", run_id=None, parent_run_id="p1", run_name="trial",
                             params={"a": "1"}, tags={"t": "x"})
    assert (sink.client, sink.run_id, sink.uri) == (client, "new1", "u")
    assert client.calls[:2] == [("get_experiment_by_name", ("unit",), {}),
                                ("create_run", ("7",), {"run_name": "trial"})]
    assert client.batches == [{"run_id": "new1", "tags": [("t", "x"), ("mlflow.parentRunId",
                                                                     "p1")]},
                              {"run_id": "new1", "params": [("a", "1")]}]
    assert client.calls[-1] == ("log_text", ("new1", cfg.to_yaml(), "config.yaml"), {})

    client = StartClient(params={"a": "1"})
    monkeypatch.setattr(sinks, "mlflow_client", lambda uri: client)
    sink = _MlflowSink.start(cfg, "u", run_id="old1", parent_run_id=None, run_name=None,
                             params={"a": "2", "b": "3"}, tags={"t": "x"})
    assert (sink.run_id, sink.uri) == ("old1", "u")
    assert sink._logged_params == {"a": "1", "b": "3"}
    assert client.calls[:2] == [("get_run", ("old1",), {}),
                                ("update_run", ("old1",), {"status": "RUNNING"})]
    assert client.batches == [{"run_id": "old1", "tags": [("t", "x")]},
                              {"run_id": "old1", "params": [("b", "3")]}]


def test_a_run_that_cannot_start_is_failed_and_named_in_one_line(tmp_path, monkeypatch):
    client = StartClient()
    client.down = [ConnectionError("refused")]
    monkeypatch.setattr(sinks, "mlflow_client", lambda uri: client)
    db = tmp_path / "kept.db"
    db.write_text("tables")
    with pytest.raises(TrackingError) as info:
        _MlflowSink.start(_cfg(tmp_path), f"sqlite:///{db}", run_id=None, parent_run_id=None,
                          run_name=None, params={}, tags={"t": "x"})
    assert str(info.value) == (f"cannot start an MLflow run at sqlite:///{db}: "
                               f"ConnectionError: refused")
    assert client.calls[-1] == ("set_terminated", ("new1", "FAILED"), {})
    assert db.read_text() == "tables"  # only an empty file it made is removed
    empty = tmp_path / "empty.db"
    empty.touch()
    client.down = [ConnectionError("refused")]
    with pytest.raises(TrackingError):
        _MlflowSink.start(_cfg(tmp_path), f"sqlite:///{empty}", run_id=None,
                          parent_run_id=None, run_name=None, params={}, tags={"t": "x"})
    assert empty.is_file()  # empty, but there before


def test_a_run_whose_params_cannot_be_logged_does_not_start(tmp_path, monkeypatch):
    client = StartClient()

    def log_batch(run_id, **entities):
        if "params" in entities:
            raise ConnectionError("refused")

    client.log_batch = log_batch
    monkeypatch.setattr(sinks, "mlflow_client", lambda uri: client)
    with pytest.raises(TrackingError, match="^cannot start an MLflow run at u: ConnectionError: "
                                            "refused$"):
        _MlflowSink.start(_cfg(tmp_path), "u", run_id=None, parent_run_id=None,
                          run_name=None, params={"a": "1"}, tags={})
    assert client.calls[-1] == ("set_terminated", ("new1", "FAILED"), {})


def test_start_opens_its_uri_and_removes_the_empty_sqlite_file_it_made(tmp_path, monkeypatch):
    """The store is opened at the run's URI and the experiment looked up with it; a sqlite
    file that was not there before and that a failed start leaves empty is removed, also
    when the client itself could not be made."""
    db = tmp_path / "new.db"
    uri = f"sqlite:///{db}"
    opened, looked_up = [], []

    def open_store(at):
        opened.append(at)
        db.touch()  # MLflow made the file, then the disk was full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks, "mlflow_client", open_store)
    with pytest.raises(TrackingError, match=f"^cannot start an MLflow run at {uri}: OSError: "):
        _MlflowSink.start(_cfg(tmp_path), uri, run_id=None, parent_run_id=None, run_name=None,
                          params={}, tags={})
    assert opened == [uri] and not db.exists()

    client = StartClient()
    client.down = [ConnectionError("refused")]

    def experiment(client_, name, at):
        looked_up.append((client_, name, at))
        db.touch()
        return "7"

    monkeypatch.setattr(sinks, "mlflow_client", lambda at: client)
    monkeypatch.setattr(sinks, "_experiment_id", experiment)
    with pytest.raises(TrackingError):
        _MlflowSink.start(_cfg(tmp_path), uri, run_id=None, parent_run_id=None, run_name=None,
                          params={}, tags={"t": "x"})
    assert looked_up == [(client, "unit", uri)] and not db.exists()
    assert client.calls[-1] == ("set_terminated", ("new1", "FAILED"), {})
